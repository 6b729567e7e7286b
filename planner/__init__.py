"""The residency planner: `planner.optimize(profile, budget)` returns a `Plan`.

The solver (PuLP) loads on first use of `optimize`/`candidate_plans`, so code that only reads
plans or the cost model (the executor on a GPU server) does not need it.
"""

from planner.cost_model import CostModel, StepShape, StepTime, TierCounts
from planner.plan import LayerPlan, Plan, Prediction, WorkloadShape

__all__ = ["CostModel", "LayerPlan", "Plan", "Prediction", "StepShape", "StepTime", "TierCounts", "WorkloadShape",
           "candidate_plans", "optimize"]


def __getattr__(name: str):
    if name in ("optimize", "candidate_plans"):
        import importlib

        return getattr(importlib.import_module("planner.search"), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")

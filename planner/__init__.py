"""The residency planner: `planner.optimize(profile, budget)` returns a `Plan`."""

from planner.cost_model import CostModel, StepShape, StepTime, TierCounts
from planner.optimize import candidate_plans, optimize
from planner.plan import LayerPlan, Plan, Prediction, WorkloadShape

__all__ = ["CostModel", "LayerPlan", "Plan", "Prediction", "StepShape", "StepTime", "TierCounts", "WorkloadShape",
           "candidate_plans", "optimize"]

"""SimPy discrete-event model of a vLLM-like serving engine running FluxMoE plans and baselines.

`simulate(profile, workload, plan=plan)` replays a workload; `simulate_systems` compares
FluxMoE with plain vLLM and vLLM with CPU offload; `verified_optimize` lets the simulator
pick among the planner's best candidates.
"""

from simulator.compare import simulate_systems, verified_optimize
from simulator.engine import SimulationResult, simulate
from simulator.workload import Lengths, Request, Workload

__all__ = ["Lengths", "Request", "SimulationResult", "Workload", "simulate", "simulate_systems",
           "verified_optimize"]

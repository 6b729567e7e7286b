"""FluxMoE: serve MoE LLMs on GPUs with too little memory by paging experts between tiers.

The packages beside this one are the system: `profiles` (what we know about models and
GPUs), `planner` (which expert lives in which tier), `simulator` (what a plan does to a
workload) and `executor` (the real paging on a GPU). This package holds what they share:
errors, units and JSON (de)serialization of their dataclasses, and the `fluxmoe` CLI.
"""

__version__ = "0.1.0"

"""FluxMoE as a vLLM plugin (vLLM 0.26.0, the `vllm` extra).

vLLM calls `register()` in every one of its processes through the `vllm.general_plugins`
entry point. Without `FLUXMOE_PLAN` in the environment it does nothing, so vLLM behaves
exactly as without FluxMoE; with it (a plan file, as `fluxmoe serve` writes), each MoE layer's
experts are placed in the plan's tiers and paged during the forward pass.
"""

from __future__ import annotations

import os

PLAN_ENV = "FLUXMOE_PLAN"
# Under "vllm.": vLLM's processes configure that logger tree (handler, level); a logger of our
# own name would print nothing there.
LOG_NAME = "vllm.fluxmoe"


def register() -> None:
    """Entry point; safe to call many times and in many processes."""
    path = os.environ.get(PLAN_ENV)
    if not path:
        return
    if not os.path.isfile(path):
        from fluxmoe.errors import ConfigError

        raise ConfigError(f"{PLAN_ENV}: no plan file at {path!r}")
    from fluxmoe.vllm_plugin.experts import install  # imports vLLM: only when a plan is given

    install(path)

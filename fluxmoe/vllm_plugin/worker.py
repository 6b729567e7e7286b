"""What vLLM's worker answers for FluxMoE over `collective_rpc`.

vLLM mixes this class into its worker when started with
`--worker-extension-cls fluxmoe.vllm_plugin.worker.FluxMoEWorkerExtension` (`fluxmoe serve`
passes it), so the API server (`fluxmoe.vllm_plugin.endpoint`) or an offline `LLM` can call
`collective_rpc("fluxmoe_stats")`. vLLM runs such calls between steps.
"""

from __future__ import annotations

EXTENSION = "fluxmoe.vllm_plugin.worker.FluxMoEWorkerExtension"


class FluxMoEWorkerExtension:
    def fluxmoe_stats(self) -> dict:
        """This worker's pager stats; {"plan": None} where no FluxMoE plan runs."""
        from fluxmoe.vllm_plugin.runtime import current_runtime

        runtime = current_runtime()
        if runtime is None:
            return {"plan": None}
        return {"plan": runtime.plan.model, "budget_gib": round(runtime.plan.budget_bytes / 2**30, 3),
                **runtime.stats()}

    def fluxmoe_swap(self, swaps: list) -> int:
        """Resident-host swaps, each [model layer, expert into the GPU, expert out], made between
        steps in place (CUDA graphs stay valid); how many were made."""
        return _running().swap(swaps)

    def fluxmoe_rebuild(self, plan_path: str) -> dict:
        """The same experts in the tiers of the plan at `plan_path` (another budget, made for this
        engine: `Replanner.rebudget(live=True)`), between steps; only with CUDA graphs off, as
        they hold the expert arena's addresses. Answers the expert bytes before and after, the
        seconds it took and the free GPU memory the driver reports afterwards."""
        import torch

        from fluxmoe.errors import ConfigError
        from planner.plan import Plan

        runtime = _running()
        config = getattr(self, "vllm_config", None)  # set by vLLM on its worker
        if config is not None and not config.model_config.enforce_eager:
            raise ConfigError("this engine runs CUDA graphs, which hold the expert arena's addresses: a plan with "
                              "other tier counts needs a restart (or a server started with --enforce-eager)")
        answer = runtime.rebuild(Plan.load(plan_path))
        if runtime.device.type == "cuda":
            answer["driver_free_bytes"] = torch.cuda.mem_get_info(runtime.device)[0]
            answer["torch_reserved_bytes"] = torch.cuda.memory_reserved(runtime.device)
            answer["torch_allocated_bytes"] = torch.cuda.memory_allocated(runtime.device)
        return answer


def _running():
    """This worker's paging runtime, for calls that act on it (refused where no plan runs)."""
    from fluxmoe.vllm_plugin.runtime import current_runtime

    runtime = current_runtime()
    if runtime is None:
        raise RuntimeError("no FluxMoE plan runs in this worker")
    return runtime

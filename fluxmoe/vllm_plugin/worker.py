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
        from fluxmoe.vllm_plugin.runtime import current_runtime

        runtime = current_runtime()
        if runtime is None:
            raise RuntimeError("no FluxMoE plan runs in this worker")
        return runtime.swap(swaps)

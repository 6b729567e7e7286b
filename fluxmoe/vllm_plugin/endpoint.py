"""`GET /v1/fluxmoe/stats` on vLLM's OpenAI-compatible server: every worker's pager stats.

A `vllm.endpoint_plugins` entry point (named `fluxmoe-stats`). vLLM loads endpoint plugins
only when they are named in `VLLM_PLUGINS`; `fluxmoe serve` names it. The route sits under
`/v1`, so a server started with `--api-key` asks the same key for it as for the API. It reaches
the workers through `collective_rpc("fluxmoe_stats")`, which needs the worker extension
(`fluxmoe.vllm_plugin.worker`).
"""

# No `from __future__ import annotations`: FastAPI reads the handler's `Request` annotation.

STATS_PATH = "/v1/fluxmoe/stats"


class StatsEndpoint:
    name = "fluxmoe-stats"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get(STATS_PATH)
        async def fluxmoe_stats(request: Request):
            engine = getattr(request.app.state, "fluxmoe_engine", None)
            if engine is None:
                return JSONResponse({"error": "no engine behind this server"}, status_code=503)
            try:
                workers = await engine.collective_rpc("fluxmoe_stats")
            except NotImplementedError:
                return JSONResponse({"error": "vLLM was started without the FluxMoE worker extension "
                                              "(--worker-extension-cls fluxmoe.vllm_plugin.worker."
                                              "FluxMoEWorkerExtension; fluxmoe serve passes it)"}, status_code=501)
            return {"workers": workers}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.fluxmoe_engine = engine_client

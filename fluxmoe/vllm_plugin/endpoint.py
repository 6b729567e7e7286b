"""`GET /v1/fluxmoe/stats` on vLLM's OpenAI-compatible server: every worker's pager stats; with
adaptation on (`fluxmoe serve --adapt`), `GET /v1/fluxmoe/adapt` (the closed loop's decisions)
and `POST /v1/fluxmoe/budget` (a plan for another budget, and what applying it takes; see
fluxmoe/vllm_plugin/adapt.py). Admin routes sit under `/v1` like the API, so they take the
same `--api-key`.

A `vllm.endpoint_plugins` entry point (named `fluxmoe-stats`). vLLM loads endpoint plugins
only when they are named in `VLLM_PLUGINS`; `fluxmoe serve` names it. The route sits under
`/v1`, so a server started with `--api-key` asks the same key for it as for the API. It reaches
the workers through `collective_rpc("fluxmoe_stats")`, which needs the worker extension
(`fluxmoe.vllm_plugin.worker`).
"""

# No `from __future__ import annotations`: FastAPI reads the handler's `Request` annotation.

STATS_PATH = "/v1/fluxmoe/stats"
ADAPT_PATH = "/v1/fluxmoe/adapt"
BUDGET_PATH = "/v1/fluxmoe/budget"


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

        @router.get(ADAPT_PATH)
        async def fluxmoe_adapt(request: Request):
            loop = getattr(request.app.state, "fluxmoe_loop", None)
            if loop is None:
                return JSONResponse({"error": "adaptation is off (fluxmoe serve --adapt turns it on)"}, status_code=404)
            return {"swaps_made": loop.swaps_made, "decisions": loop.history}

        @router.post(BUDGET_PATH)
        async def fluxmoe_budget(request: Request):
            from pathlib import Path

            from fluxmoe.errors import FluxMoEError

            loop = getattr(request.app.state, "fluxmoe_loop", None)
            if loop is None:
                return JSONResponse({"error": "adaptation is off (fluxmoe serve --adapt turns it on)"}, status_code=404)
            body = await request.json()
            budget = body.get("budget") if isinstance(body, dict) else None
            if not isinstance(budget, str):
                return JSONResponse({"error": f"field 'budget': expected a string like \"40GiB\", got {budget!r}"},
                                    status_code=400)
            try:
                return await loop.rebudget(budget, Path(request.app.state.fluxmoe_plan_dir))
            except FluxMoEError as e:  # a bad budget, or none that fits: the message says which
                return JSONResponse({"error": str(e)}, status_code=400)

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        import asyncio
        import os
        from pathlib import Path

        from fluxmoe.vllm_plugin import PLAN_ENV
        from fluxmoe.vllm_plugin.adapt import AdaptSettings, ServerLoop

        state.fluxmoe_engine = engine_client
        settings = AdaptSettings.from_env()
        if settings is not None and engine_client is not None:
            plan_path = os.environ[PLAN_ENV]
            state.fluxmoe_loop = ServerLoop.from_settings(engine_client, settings, plan_path)
            state.fluxmoe_plan_dir = str(Path(plan_path).parent)
            state.fluxmoe_task = asyncio.get_running_loop().create_task(state.fluxmoe_loop.run())

"""The closed loop inside a running server, and the admin routes that show and steer it.

`ServerLoop` runs in vLLM's API server process (started by the endpoint plugin when
`FLUXMOE_ADAPT` is set; `fluxmoe serve --adapt` sets it): every `interval_s` it asks the
workers for their stats (`collective_rpc("fluxmoe_stats")`: the GPU's route counts, read
without a sync), lets the `Replanner` (planner/replan.py) decide, and where it acts sends the
resident-host swaps to the workers in batches (`collective_rpc("fluxmoe_swap")`, which vLLM
runs between steps), one batch a step as `swap_schedule` paces them. No request is dropped or
changed: a swap moves bytes bit-exactly and the id maps follow in place.

`POST /v1/fluxmoe/budget` re-plans for another GPU budget under the measured popularity, for
this engine as it runs (vLLM 0.26 cannot resize its KV cache or sequence limit, so those stay
and only experts and staging move), and applies it: with --enforce-eager every worker rebuilds
its tiers between steps (`collective_rpc("fluxmoe_rebuild")`; requests wait through it, none
is dropped, and the GPU memory given up goes back to the driver); under CUDA graphs, which hold
the arena's addresses, the answer is the restart command with the new plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fluxmoe.errors import ConfigError
from fluxmoe.vllm_plugin import LOG_NAME

ADAPT_ENV = "FLUXMOE_ADAPT"  # JSON: {"model": folder, "gpu": profile name, "expert_parallel": bool, "interval_s": s}
log = logging.getLogger(LOG_NAME)


@dataclass
class AdaptSettings:
    model: str  # the model folder (its config.json gives the shapes)
    gpu: str  # the GPU profile the plan was made for ("h200x2": one rank of two)
    interval_s: float = 10.0
    expert_parallel: bool = False
    max_slowdown: float = 0.1

    @classmethod
    def from_env(cls) -> "AdaptSettings | None":
        raw = os.environ.get(ADAPT_ENV)
        if not raw:
            return None
        try:
            settings = cls(**json.loads(raw))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{ADAPT_ENV}: expected JSON with model, gpu (and interval_s), got {raw!r}: {e}") \
                from None
        if not settings.interval_s > 0:
            raise ConfigError(f"{ADAPT_ENV}: interval_s must be > 0, got {settings.interval_s!r}")
        return settings


def refuse_expert_parallel(expert_parallel: bool) -> None:
    """Under expert parallel each rank counts only its own experts' picks, and the cost model has
    no per-expert popularity for a rank's shard yet: no closed loop there (tensor parallel is fine,
    every rank routes every token)."""
    if expert_parallel:
        raise ConfigError("--adapt: the closed loop does not run under expert parallel yet (each rank sees only "
                          "its own experts' picks); serve without --adapt, or with tensor parallel only")


def engine_load(registry=None) -> dict:
    """vLLM's own gauges in this API server process (its stat loggers keep them in
    prometheus_client's registry): the share of the KV cache in use and the requests running,
    summed over engines; {} where they are not there (stats logging off, several API servers)."""
    if registry is None:
        try:
            from prometheus_client import REGISTRY as registry  # vLLM's dependency
        except ImportError:
            return {}
    use, running, found = [], 0.0, False
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "vllm:kv_cache_usage_perc":
                use.append(sample.value)
            elif sample.name == "vllm:num_requests_running":
                running, found = running + sample.value, True
    if not use or not found:
        return {}
    load = {"kv_use": sum(use) / len(use)}
    if running > 0:
        load["mean_batch"] = running
    return load


@dataclass
class ServerLoop:
    engine: object  # anything with `async collective_rpc(method, args=())`
    replanner: object  # planner.replan.Replanner
    interval_s: float = 10.0
    max_slowdown: float = 0.1
    sleep: object = asyncio.sleep
    load: object = field(default=lambda: engine_load())  # the engine's KV use and running sequences
    history: list[dict] = field(default_factory=list)  # one entry per decision, newest last
    swaps_made: int = 0

    @classmethod
    def from_settings(cls, engine, settings: AdaptSettings, plan_path: str) -> "ServerLoop":
        import profiles
        from planner.plan import Plan
        from planner.replan import Replanner

        refuse_expert_parallel(settings.expert_parallel)
        profile = profiles.load(settings.model, settings.gpu, expert_parallel=settings.expert_parallel)
        return cls(engine, Replanner(profile, Plan.load(plan_path)), settings.interval_s, settings.max_slowdown)

    async def run(self) -> None:
        while True:
            await self.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception as e:  # the loop must never take the server down
                log.warning("FluxMoE adaptation: %s", e)
                self._log({"error": str(e)})

    async def tick(self):
        """One window: read, decide, and make the swaps where the decision says so."""
        from planner.moves import swap_seconds
        from profiles.feedback import RuntimeFeedback

        workers = await self.engine.collective_rpc("fluxmoe_stats")
        first = workers[0] if workers else {}
        if "route_counts" not in first:
            return None
        load = self.load()
        decision = await asyncio.to_thread(self.replanner.consider, RuntimeFeedback.from_stats({**first, **load}))
        self._log({"act": decision.act, "reason": decision.reason, "gain": round(decision.gain, 4),
                   "swaps": len(decision.swaps), **load,
                   "context_tokens": round(self.replanner.workload.prompt_tokens
                                           + self.replanner.workload.output_tokens / 2)})
        if not decision.act:
            return decision
        step_s = decision.current_s
        self.replanner.begin_change(decision, step_s, swap_seconds(self.replanner.profile), self.max_slowdown)
        while self.replanner.changing:
            batch = self.replanner.next_swaps()
            if batch:
                await self.engine.collective_rpc("fluxmoe_swap", args=([[s.layer, s.into_gpu, s.out_of_gpu]
                                                                         for s in batch],))
                self.swaps_made += len(batch)
            await self.sleep(step_s)  # about one engine step between batches
        log.info("FluxMoE adaptation: %d swaps made (%s)", len(decision.swaps), decision.reason)
        return decision

    def _log(self, entry: dict) -> None:
        """One decision (or error) for `GET /v1/fluxmoe/adapt`, timed; the newest 100 are kept."""
        self.history = (self.history + [{"time": time.time(), **entry}])[-100:]

    async def rebudget(self, budget: str, out_dir: Path) -> dict:
        """A plan for another GPU budget, made for this engine (its KV cache and sequence limit
        stay), and applied where it can be: the same tier counts need nothing (the loop re-places
        experts as their popularity asks); other counts are rebuilt between steps in a server
        started with --enforce-eager, and need a restart with the plan under CUDA graphs."""
        from planner.moves import swaps_between

        current = self.replanner.plan
        plan = await asyncio.to_thread(self.replanner.rebudget, budget, live=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{plan.model}-{plan.budget_bytes}.json"
        plan.save(path)
        answer = {"budget_bytes": plan.budget_bytes, "plan": str(path),
                  "predicted_output_tokens_per_s": plan.predicted.output_tokens_per_s,
                  "kv_cache_bytes": plan.kv_cache_bytes, "max_num_seqs": plan.max_num_seqs}
        try:
            swaps_between(current, plan)
            answer["apply"] = ("no change needed: the tier counts are the same; the adaptation loop re-places "
                               "experts as their popularity asks")
            return answer
        except ConfigError:
            pass
        try:
            answer["workers"] = await self.engine.collective_rpc("fluxmoe_rebuild", args=(str(path),))
        except Exception as e:  # refused (CUDA graphs) or did not fit: the workers run the old plan still
            answer["apply"] = (f"not applied ({e}); restart: fluxmoe serve --model "
                               f"{self.replanner.profile.model.name} --plan {path}")
            return answer
        self.replanner.adopt(plan)
        self._log({"act": True, "reason": f"budget {budget}: rebuilt", "gain": 0.0, "swaps": 0})
        answer["apply"] = "applied: every worker rebuilt its tiers between steps; no request was dropped"
        return answer

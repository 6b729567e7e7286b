"""Closing the loop: from what the running executor measured to a better plan, without flapping.

`Replanner.consider(feedback)` takes the executor's counters (cumulative; it works on the window
since its previous call), smooths the measured expert popularity over windows, prices the
current plan and its re-assignment under it (same tier counts, hot experts resident, cold ones
on the host: planner/moves.py) with the link and decode rates the executor achieved, and says
to act only when the predicted gain passes `min_gain` in `patience` windows in a row, and not
again within `cooldown` windows of a change. Changing budgets re-plan in full (`rebudget`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fluxmoe.errors import ConfigError
from planner.cost_model import CostModel, StepShape
from planner.moves import Swap, apply_swaps, reassign, swap_schedule, swaps_between
from planner.plan import Plan, WorkloadShape
from planner.popularity import ExpertPopularity
from profiles.feedback import RuntimeFeedback
from profiles.hardware import CodecRates, Curve
from profiles.registry import Profile


def calibrated(profile: Profile, feedback: RuntimeFeedback) -> Profile:
    """`profile` with the link and decode rates the executor achieved, where it measured them:
    the link curve scaled to pass through the measured rate at one expert's bytes."""
    hw = profile.hardware
    changes = {}
    if feedback.h2d_gbps > 0:
        scale = feedback.h2d_gbps / hw.h2d_gbps(profile.model.expert_bytes)
        changes["h2d_gbps"] = Curve(list(hw.h2d_gbps.x), [y * scale for y in hw.h2d_gbps.y], hw.h2d_gbps.log_x)
    if feedback.decode_gbps > 0:
        changes["codec"] = CodecRates(feedback.decode_gbps, hw.codec.compressed_ratio)
    if not changes:
        return profile
    return Profile(profile.model, dataclasses.replace(hw, name=f"{hw.name} (as measured)", **changes))


def measured_workload(profile: Profile, plan: Plan, kv_use: float, batch: float) -> WorkloadShape:
    """The plan's workload with the context the engine's KV use says its sequences hold: the
    mean sequence keeps `kv_use` of the plan's KV cache over `batch` sequences, and a steady
    decode step sees prompt + output / 2 tokens of context (StepShape.steady_decode)."""
    w, m = plan.workload, profile.model
    per_sequence = kv_use * plan.kv_cache_bytes / max(batch, 1.0)
    lo, hi = 1, m.max_context
    while lo < hi:  # the longest context whose KV fits in `per_sequence` (KV grows with context)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if m.kv_bytes_per_sequence(mid) <= per_sequence else (lo, mid - 1)
    return dataclasses.replace(w, prompt_tokens=max(1, round(lo - w.output_tokens / 2)))


def predicted_step_s(profile: Profile, plan: Plan, popularity: ExpertPopularity | None, batch: float,
                     workload: WorkloadShape | None = None) -> float:
    """The plan's decode step at `batch` sequences of `workload` (default: the plan's), its host
    experts priced by their own popularity (the ids it puts there, not the coldest)."""
    workload = workload or plan.workload
    cost = CostModel(profile, workload.routing_skew, popularity)
    layers = sorted(plan.layers, key=lambda lp: lp.layer)
    step = StepShape.steady_decode(max(1, round(batch)), workload.prompt_tokens, workload.output_tokens)
    return cost.step_time(plan.tier_counts(), step, plan.prefetch_depth, plan.routed_fetch,
                          host_ids=[lp.host for lp in layers]).total_s


@dataclass
class ReplanPolicy:
    min_gain: float = 0.05  # act when the new plan predicts steps at least this much faster
    patience: int = 2  # ... in this many windows in a row
    cooldown: int = 3  # windows after a change before another
    min_tokens: int = 1024  # a window with fewer routed tokens is noise: skipped
    smoothing: float = 0.5  # weight of the newest window in the popularity estimate

    def __post_init__(self) -> None:
        if not self.min_gain >= 0:
            raise ConfigError(f"field 'min_gain': must be >= 0, got {self.min_gain!r}")
        for name in ("patience", "cooldown", "min_tokens"):
            if getattr(self, name) < (1 if name == "patience" else 0):
                raise ConfigError(f"field '{name}': must be >= {1 if name == 'patience' else 0}, "
                                  f"got {getattr(self, name)!r}")
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"field 'smoothing': must be in (0, 1], got {self.smoothing!r}")


@dataclass
class ReplanDecision:
    act: bool
    reason: str
    current_s: float = 0.0  # predicted step of the plan in force, under the measured popularity
    proposed_s: float = 0.0  # ... of the proposed plan
    plan: Plan | None = None  # the proposal (where there is one)
    swaps: list[Swap] = field(default_factory=list)  # what the executor does to get there

    @property
    def gain(self) -> float:
        return self.current_s / self.proposed_s - 1 if self.proposed_s else 0.0


class Replanner:
    def __init__(self, profile: Profile, plan: Plan, policy: ReplanPolicy | None = None):
        self.profile, self.plan, self.policy = profile, plan, policy or ReplanPolicy()
        self.popularity: ExpertPopularity | None = None
        self._previous: RuntimeFeedback | None = None
        self._streak = 0
        self._cooldown = 0
        self._schedule: list[list[Swap]] = []  # per coming step, the swaps of a change in progress
        self._target: Plan | None = None  # where that change ends
        self.workload = plan.workload  # as measured: the engine's KV use gives the sequences' context

    def _observe(self, feedback: RuntimeFeedback) -> RuntimeFeedback | None:
        """The window since the previous call, folded into the popularity estimate (None: too few tokens)."""
        window = feedback if self._previous is None else feedback.since(self._previous)
        if window.routed_tokens < self.policy.min_tokens:
            return None
        self._previous = feedback
        measured = ExpertPopularity.from_counts(window.route_counts, window.routed_tokens,
                                                self.profile.model.experts_per_token)
        if self.popularity is not None:
            a = self.policy.smoothing
            measured = ExpertPopularity([[a * x + (1 - a) * y for x, y in zip(new, old)]
                                         for new, old in zip(measured.picks, self.popularity.picks)],
                                        measured.tokens + self.popularity.tokens)
        self.popularity = measured
        return window

    def consider(self, feedback: RuntimeFeedback) -> ReplanDecision:
        if feedback.kv_use is not None and feedback.mean_batch:  # the engine's gauges now, not a window's counts
            self.workload = measured_workload(self.profile, self.plan, feedback.kv_use, feedback.mean_batch)
        window = self._observe(feedback)
        if window is None:
            return ReplanDecision(False, f"fewer than {self.policy.min_tokens} routed tokens since the last window")
        profile = calibrated(self.profile, window)
        batch = window.mean_batch or self.plan.max_num_seqs
        proposal = reassign(self.plan, self.popularity)
        current = predicted_step_s(profile, self.plan, self.popularity, batch, self.workload)
        proposed = predicted_step_s(profile, proposal, self.popularity, batch, self.workload)
        swaps = swaps_between(self.plan, proposal)
        decision = ReplanDecision(False, "", current, proposed, proposal, swaps)
        if self._cooldown > 0:
            self._cooldown -= 1
            decision.reason = "cooling down after a change"
            return decision
        if not swaps or decision.gain < self.policy.min_gain:
            self._streak = 0
            decision.reason = f"predicted gain {decision.gain:.1%} is under {self.policy.min_gain:.0%}"
            return decision
        self._streak += 1
        if self._streak < self.policy.patience:
            decision.reason = f"gain {decision.gain:.1%} in {self._streak} of {self.policy.patience} windows"
            return decision
        decision.act, decision.reason = True, f"gain {decision.gain:.1%} in {self._streak} windows: {len(swaps)} swaps"
        return decision

    def begin_change(self, decision: ReplanDecision, step_s: float, swap_s: float, max_slowdown: float = 0.1) -> None:
        """Start making an acted decision's swaps, paced by `swap_schedule`: `next_swaps()` hands
        them out a step at a time, and the plan it reaches is adopted after the last."""
        self._target = apply_swaps(self.plan, decision.swaps)
        self._schedule = swap_schedule(decision.swaps, step_s, swap_s, max_slowdown)

    @property
    def changing(self) -> bool:
        return self._target is not None

    def next_swaps(self) -> list[Swap]:
        """The swaps to make before the next step (none between changes; an empty list is a step
        the pacing leaves free)."""
        if self._target is None:
            return []
        todo = self._schedule.pop(0)
        if not self._schedule:
            self.adopt(self._target)
            self._target = None
        return todo

    def adopt(self, plan: Plan) -> None:
        """The executor now runs `plan`: later windows are priced against it."""
        self.plan, self._streak, self._cooldown = plan, 0, self.policy.cooldown

    def rebudget(self, budget: int | str, live: bool = False, **options) -> Plan:
        """A new plan for another GPU budget, under the measured popularity and context lengths
        where there are some.
        live: for the running engine, whose KV cache and sequence limit stay as they are (vLLM
        0.26 cannot resize them): only experts and staging move within the new budget."""
        from planner.search import optimize

        options.setdefault("workload", self.workload)
        if live:
            options.update(kv_cache_bytes=self.plan.kv_cache_bytes, max_num_seqs=self.plan.max_num_seqs)
        return optimize(self.profile, budget, popularity=self.popularity, **options)

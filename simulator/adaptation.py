"""Routing that drifts, and the closed loop that follows it, as the simulator plays them.

`RoutingDrift`: expert popularity over simulated time (phases). `Adaptation`: the executor's
loop (planner/replan.py) run on the simulated clock: every `window_steps` steps the
`Replanner` reads pick counts (their expected values under the popularity in force: no
sampling noise), one window late as the executor's non-blocking read returns them
(executor/route_counts.py), and where it acts the swaps it lists are made between steps as
`swap_schedule` spreads them, each costing its three copies (resident row to scratch, host row
in, scratch out) on the GPU's timeline, as `ExpertPager.swap` makes them. The re-plan delay is
therefore the windows the policy waits (patience, cooldown), plus the moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fluxmoe.errors import ConfigError
from planner.moves import Swap, swap_seconds
from planner.plan import Plan
from planner.popularity import ExpertPopularity
from planner.replan import ReplanPolicy, Replanner
from profiles.feedback import RuntimeFeedback
from profiles.registry import Profile


@dataclass
class RoutingDrift:
    """`popularity[i]` holds from engine step `starts_step[i]` on (the first from step 0)."""

    starts_step: list[int]
    popularity: list[ExpertPopularity]

    def __post_init__(self) -> None:
        if not self.popularity or len(self.starts_step) != len(self.popularity) or self.starts_step[0] != 0:
            raise ConfigError("field 'starts_step': one start per phase of popularity, the first at step 0")
        if any(b <= a for a, b in zip(self.starts_step, self.starts_step[1:])):
            raise ConfigError(f"field 'starts_step': must increase, got {self.starts_step!r}")

    def at(self, step: int) -> ExpertPopularity:
        phase = max(i for i, start in enumerate(self.starts_step) if start <= step)
        return self.popularity[phase]


@dataclass
class Adaptation:
    window_steps: int = 150
    policy: ReplanPolicy = field(default_factory=ReplanPolicy)
    max_slowdown: float = 0.1
    swap_s: float | None = None  # one swap, as measured (None: priced from the profile's rates)

    def __post_init__(self) -> None:
        if self.window_steps < 1:
            raise ConfigError(f"field 'window_steps': must be >= 1, got {self.window_steps!r}")
        if self.swap_s is not None and not self.swap_s > 0:
            raise ConfigError(f"field 'swap_s': must be > 0, got {self.swap_s!r}")


class AdaptiveLoop:
    """The re-planner on the simulated clock: counts picks per step, decides per window, and
    hands the execution the swaps to make before each step."""

    def __init__(self, profile: Profile, plan: Plan, adaptation: Adaptation):
        self.profile, self.adaptation = profile, adaptation
        self.replanner = Replanner(profile, plan, adaptation.policy)
        m = profile.model
        self.counts = [[0.0] * m.num_experts for _ in range(m.num_moe_layers)]
        self.tokens = 0
        self.steps = 0
        self.swap_s = adaptation.swap_s or swap_seconds(profile)
        self._recent_s: list[float] = []
        self._lagged: RuntimeFeedback | None = None  # the counts as of the previous window
        self.decisions: list[tuple[int, bool, str]] = []  # (step, acted, reason) per window
        self.swaps_made = 0

    def after_step(self, tokens: int, step_s: float, popularity: ExpertPopularity) -> None:
        self.steps += 1
        self.tokens += tokens
        for row, shares in zip(self.counts, popularity.picks):
            for e, share in enumerate(shares):
                row[e] += tokens * share
        self._recent_s = (self._recent_s + [step_s])[-self.adaptation.window_steps:]
        if self.steps % self.adaptation.window_steps or self.replanner.changing:
            return
        feedback, self._lagged = self._lagged, RuntimeFeedback(self.steps, self.tokens, [list(r) for r in self.counts])
        if feedback is None:
            return
        decision = self.replanner.consider(feedback)
        self.decisions.append((self.steps, decision.act, decision.reason))
        if decision.act:
            step = sum(self._recent_s) / len(self._recent_s)
            self.replanner.begin_change(decision, step, self.swap_s, self.adaptation.max_slowdown)

    def swaps_before_step(self) -> list[Swap]:
        """The swaps to make before the next step (the change is adopted after its last)."""
        todo = self.replanner.next_swaps()
        self.swaps_made += len(todo)
        return todo

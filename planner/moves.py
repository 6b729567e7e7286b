"""A change of residency as moves the executor can make between steps.

The executor swaps a host expert with a resident one in place (executor/pager.py,
`ExpertPager.swap`): same rows, same tensors, so CUDA graphs captured before stay valid, and
each swap moves one expert each way over the link (full duplex). A plan change that keeps
each layer's tier counts (the popularity moved, the budget did not) is exactly a list of such
swaps; `reassign` makes that plan, `swaps_between` lists the swaps, hottest first, and
`swap_schedule` spreads them over steps so that serving slows by at most a set share.
After any prefix of the swaps every expert is in exactly one tier (`apply_swaps` checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fluxmoe.errors import ConfigError
from planner.plan import LayerPlan, Plan
from planner.popularity import ExpertPopularity


@dataclass(frozen=True)
class Swap:
    """In model layer `layer`, host expert `into_gpu` and resident expert `out_of_gpu` trade places."""

    layer: int
    into_gpu: int
    out_of_gpu: int


def reassign(plan: Plan, popularity: ExpertPopularity) -> Plan:
    """`plan` with the same tier counts per layer, its resident and host experts re-chosen by
    `popularity`: the hottest of them resident, the coldest on the host. Compressed and
    host-compressed experts stay where they are (they are decoded whole every step)."""
    layers = sorted(plan.layers, key=lambda lp: lp.layer)
    if popularity.num_layers != len(layers):
        raise ConfigError(f"popularity: covers {popularity.num_layers} layers, the plan has {len(layers)}")
    out = []
    for i, lp in enumerate(layers):
        order = popularity.order(i)
        movable = set(lp.resident) | set(lp.host)
        ranked = [e for e in order if e in movable]
        out.append(LayerPlan(lp.layer, ranked[:len(lp.resident)], list(lp.compressed), ranked[len(lp.resident):],
                             expert_order=order, host_compressed=list(lp.host_compressed)))
    return replace(plan, layers=out)


def swaps_between(old: Plan, new: Plan) -> list[Swap]:
    """The swaps that take `old` to `new` (same tier counts per layer), each layer's hottest
    incoming expert first (by `new`'s expert order), paired with its coldest outgoing one."""
    swaps = []
    new_layers = {lp.layer: lp for lp in new.layers}
    for lp in sorted(old.layers, key=lambda lp: lp.layer):
        target = new_layers.get(lp.layer)
        if target is None:
            raise ConfigError(f"plan: layer {lp.layer} is in the old plan but not the new one")
        same = (len(lp.resident), len(lp.host), set(lp.compressed), set(lp.host_compressed)) == \
               (len(target.resident), len(target.host), set(target.compressed), set(target.host_compressed))
        if not same:
            raise ConfigError(f"layer {lp.layer}: the new plan changes more than which experts are resident "
                              f"({len(lp.resident)}/{len(lp.compressed)}/{len(lp.host)} resident/compressed/host "
                              f"to {len(target.resident)}/{len(target.compressed)}/{len(target.host)}); only "
                              f"resident-host swaps are made in place")
        rank = {e: i for i, e in enumerate(target.expert_order or range(len(target.all_ids)))}
        incoming = sorted(set(target.resident) - set(lp.resident), key=lambda e: rank[e])
        outgoing = sorted(set(lp.resident) - set(target.resident), key=lambda e: -rank[e])
        swaps += [Swap(lp.layer, a, b) for a, b in zip(incoming, outgoing)]
    return swaps


def apply_swaps(plan: Plan, swaps: list[Swap]) -> Plan:
    """`plan` after `swaps`, in order; refuses a swap whose experts are not where it says."""
    layers = {lp.layer: replace(lp, resident=list(lp.resident), host=list(lp.host)) for lp in plan.layers}
    for swap in swaps:
        lp = layers.get(swap.layer)
        if lp is None or swap.into_gpu not in lp.host or swap.out_of_gpu not in lp.resident:
            raise ConfigError(f"swap {swap}: expert {swap.into_gpu} must be on the host and {swap.out_of_gpu} "
                              f"resident in layer {swap.layer}")
        lp.resident[lp.resident.index(swap.out_of_gpu)] = swap.into_gpu
        lp.host[lp.host.index(swap.into_gpu)] = swap.out_of_gpu
    return replace(plan, layers=[layers[lp.layer] for lp in plan.layers])  # validated again


def swap_seconds(profile) -> float:
    """One in-place swap as `ExpertPager.swap` makes it: an expert copied within HBM, one in over
    PCIe, one out, in order on one stream (measured where a run can time it)."""
    hw, nbytes = profile.hardware, profile.model.expert_bytes
    return 2 * nbytes / (hw.hbm_gbps * 1e9 * hw.memory_efficiency) + hw.h2d_seconds(nbytes) \
        + nbytes / (hw.d2h_gbps(nbytes) * 1e9)


def swap_schedule(swaps: list[Swap], step_s: float, swap_s: float, max_slowdown: float = 0.1) -> list[list[Swap]]:
    """`swaps` spread over steps, one list per step (empty: a step without swaps), so that the
    swap time added to the steps of the change is at most `max_slowdown` of their time: as
    many swaps per step as fit in that share, or one swap every so many steps."""
    if not 0 < max_slowdown <= 1:
        raise ConfigError(f"max_slowdown: must be in (0, 1], got {max_slowdown!r}")
    if step_s <= 0 or swap_s <= 0:
        raise ConfigError(f"step_s and swap_s: must be > 0, got {step_s!r} and {swap_s!r}")
    allowance = max_slowdown * step_s
    per_step = int(allowance // swap_s)
    if per_step >= 1:
        return [swaps[i:i + per_step] for i in range(0, len(swaps), per_step)]
    every = math.ceil(swap_s / allowance)  # one swap, then every - 1 steps without
    schedule: list[list[Swap]] = []
    for swap in swaps:
        schedule += [[swap]] + [[] for _ in range(every - 1)]
    return schedule

"""Plans as readable tables for the terminal."""

from __future__ import annotations

from itertools import groupby

from fluxmoe.units import format_bytes
from fluxmoe.names import System
from planner.plan import Plan


def _layer_rows(plan: Plan) -> list[str]:
    """One row per run of consecutive MoE layers with the same tier counts."""
    rows = []
    counts = [(lp.layer, len(lp.resident), len(lp.compressed), len(lp.host), len(lp.host_compressed))
              for lp in plan.layers]
    for key, run in groupby(counts, key=lambda c: c[1:]):
        run = list(run)
        first, last = run[0][0], run[-1][0]
        span = f"{first}" if first == last else f"{first}-{last}"
        rows.append(f"  {span:>9}  {key[0]:>9}  {key[1]:>10}  {key[2]:>6}  {key[3]:>15}")
    return rows


def plan_table(plan: Plan) -> str:
    mem = plan.memory
    split = ""
    if plan.tensor_parallel > 1:
        how = "expert parallel" if plan.expert_parallel > 1 else "tensor parallel"
        split = (f" per GPU ({plan.tensor_parallel} GPUs, {how}; every rank holds this plan, "
                 f"{'its own experts' if plan.expert_parallel > 1 else 'its cut of every expert'})")
    lines = [
        f"FluxMoE plan: {plan.model} on {plan.gpu}, budget {format_bytes(plan.budget_bytes)}{split} "
        f"(workload {plan.workload.prompt_tokens} in / {plan.workload.output_tokens} out)",
        "",
        "  MoE layers   resident  compressed    host  host-compressed",
        *_layer_rows(plan),
        "",
        f"  prefetch depth {plan.prefetch_depth}, staging slots {plan.staging_slots}, "
        f"max_num_seqs {plan.max_num_seqs}"
        + (", host experts fetched routed-only (after the router)" if plan.routed_fetch else ""),
        "",
        "  GPU memory",
        f"    non-expert weights   {format_bytes(mem.non_expert_bytes):>12}",
        f"    resident experts     {format_bytes(mem.resident_expert_bytes):>12}",
        f"    compressed experts   {format_bytes(mem.compressed_expert_bytes):>12}",
        f"    staging + landing    {format_bytes(mem.staging_bytes):>12}",
        f"    KV cache             {format_bytes(mem.kv_cache_bytes):>12}",
        f"    reserve              {format_bytes(mem.reserve_bytes):>12}",
        f"  host (pinned) experts  {format_bytes(mem.host_expert_bytes):>12}",
        "",
        "  closed-form prediction  batch   step ms   output tok/s   total tok/s   FluxMoE / it",
    ]
    ours = plan.predicted.output_tokens_per_s
    entries = [(System.FLUXMOE, plan.predicted)] + [(System(b.name), b.prediction) for b in plan.baselines]
    for system, pred in entries:
        if pred is None:
            lines.append(f"  {system.label:<22}  {'does not fit the budget':>44}")
            continue
        ratio = ours / pred.output_tokens_per_s if pred.output_tokens_per_s else float("inf")
        lines.append(f"  {system.label:<22} {pred.batch_size:>6} {pred.step_time_s * 1e3:>9.1f} "
                     f"{pred.output_tokens_per_s:>14.0f} {pred.tokens_per_s:>13.0f}   {ratio:>11.2f}x")
    if plan.simulated:
        lines += ["", *simulated_lines(plan)]
    lines += ["", f"  solver: {plan.solver_status}, {plan.candidates_solved} candidates, {plan.solve_time_s:.2f} s"]
    return "\n".join(lines)


def simulated_lines(plan: Plan) -> list[str]:
    """The simulated figure beside the closed form, and why they differ where they do."""
    sim, pred = plan.simulated, plan.predicted
    diff = sim.output_tokens_per_s / pred.output_tokens_per_s - 1
    lines = [f"  simulated on {sim.workload} (best of {sim.candidates_simulated} candidates): "
             f"{sim.output_tokens_per_s:,.0f} output tok/s ({diff:+.0%} against the closed form), TTFT p50 "
             f"{sim.ttft_p50_s:.2f} s, TPOT p50 {sim.tpot_p50_s * 1e3:.1f} ms"]
    if abs(diff) > 0.05:
        reasons = []
        if sim.mean_batch < 0.9 * pred.batch_size:
            reasons.append(f"the workload keeps {sim.mean_batch:.0f} sequences per step on average, not the "
                           f"plan's {pred.batch_size} (ramp-up, tail, prefill chunks)")
        if sim.preemptions:
            reasons.append(f"the KV cache ran out {sim.preemptions} times (preemptions)")
        if sim.pcie_busy > 0.9:
            reasons.append(f"the PCIe link binds (busy {sim.pcie_busy:.0%} of the time)")
        elif sim.gpu_busy > 0.9:
            reasons.append(f"the GPU binds (busy {sim.gpu_busy:.0%} of the time)")
        lines.append("  they differ by more than 5%: " + ("; ".join(reasons) or
                                                          "prefill and decode mix differently from the steady state"))
    return lines

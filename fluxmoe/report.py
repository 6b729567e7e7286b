"""Plans as readable tables for the terminal."""

from __future__ import annotations

from itertools import groupby

from fluxmoe.units import format_bytes
from planner.plan import Plan


def _layer_rows(plan: Plan) -> list[str]:
    """One row per run of consecutive MoE layers with the same tier counts."""
    rows = []
    counts = [(lp.layer, len(lp.resident), len(lp.compressed), len(lp.host)) for lp in plan.layers]
    for key, run in groupby(counts, key=lambda c: c[1:]):
        run = list(run)
        first, last = run[0][0], run[-1][0]
        span = f"{first}" if first == last else f"{first}-{last}"
        rows.append(f"  {span:>9}  {key[0]:>9}  {key[1]:>10}  {key[2]:>6}")
    return rows


def plan_table(plan: Plan) -> str:
    mem = plan.memory
    lines = [
        f"FluxMoE plan: {plan.model} on {plan.gpu}, budget {format_bytes(plan.budget_bytes)} "
        f"(workload {plan.workload.prompt_tokens} in / {plan.workload.output_tokens} out)",
        "",
        "  MoE layers   resident  compressed    host",
        *_layer_rows(plan),
        "",
        f"  prefetch depth {plan.prefetch_depth}, staging slots {plan.staging_slots}, "
        f"max_num_seqs {plan.max_num_seqs}",
        "",
        "  GPU memory",
        f"    non-expert weights   {format_bytes(mem.non_expert_bytes):>12}",
        f"    resident experts     {format_bytes(mem.resident_expert_bytes):>12}",
        f"    compressed experts   {format_bytes(mem.compressed_expert_bytes):>12}",
        f"    staging pool         {format_bytes(mem.staging_bytes):>12}",
        f"    KV cache             {format_bytes(mem.kv_cache_bytes):>12}",
        f"    reserve              {format_bytes(mem.reserve_bytes):>12}",
        f"  host (pinned) experts  {format_bytes(mem.host_expert_bytes):>12}",
        "",
        "  predicted           batch   step ms   output tok/s   total tok/s   vs FluxMoE",
    ]
    ours = plan.predicted.output_tokens_per_s
    entries = [("FluxMoE", plan.predicted)] + [
        ({"vllm": "vLLM", "vllm_offload": "vLLM + CPU offload"}.get(b.name, b.name), b.prediction)
        for b in plan.baselines]
    for label, pred in entries:
        if pred is None:
            lines.append(f"  {label:<18}  {'does not fit':>44}")
            continue
        ratio = ours / pred.output_tokens_per_s if pred.output_tokens_per_s else float("inf")
        lines.append(f"  {label:<18} {pred.batch_size:>6} {pred.step_time_s * 1e3:>9.1f} "
                     f"{pred.output_tokens_per_s:>14.0f} {pred.tokens_per_s:>13.0f}   {ratio:>8.2f}x")
    lines += ["", f"  solver: {plan.solver_status}, {plan.candidates_solved} MILPs, {plan.solve_time_s:.2f} s"]
    return "\n".join(lines)

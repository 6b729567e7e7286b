#!/usr/bin/env python3
"""End to end on the H200: FluxMoE against vLLM's own offloaders, same machine, same workload,
each beside the simulator's prediction (GPU machine, vLLM 0.26.0 carried; see
../shared/device/README.md).

Each system runs in its own process (bench/vllm_run.py: offline engine, dummy weights,
token-id prompts, fixed lengths or the Azure code trace's) with a time limit; results are
written to bench/results/e2e_<setting>_<date>.json after every run, so nothing is lost when
a later run fails or the machine goes back. Systems, per setting:
- plain vLLM, where the model fits the budget;
- vLLM's UVA offloader (`cpu_offload_gb`) at several sizes, and vLLM's prefetch offloader
  (group / number offloaded per group / prefetch step) at several settings, experts only
  (`*_params=w13_weight,w2_weight`); the fastest of each is that baseline's figure. vLLM 0.26
  sizes its KV without the prefetch offloader's static buffers, which then come on top of
  --gpu-memory-utilization; its `_in_budget` runs lower the utilization by the buffers, as a
  user must to stay within the GPU (a run whose measured peak exceeds the budget is reported
  but is not a baseline's best);
- FluxMoE with every non-resident expert in the bf16 host tier;
- FluxMoE with the planner's plan made with the paper's three tiers (resident, compressed, host);
- FluxMoE with the planner's plan (simulator-verified, as `fluxmoe plan --no-routed-fetch` picks
  it; four tiers);
- where the setting asks, the planner's plan with routed-only fetch allowed (`fluxmoe plan`'s
  default), and the host-tier plan with its host experts fetched routed-only.
Settings too slow for one machine's 30 minutes run on a stand-in of the model with fewer
layers at a budget scaled to keep the same share of each layer's bytes on the GPU
(`standin_budget`); the table says so.

    python3 bench/e2e.py --setting a40_standin [--only fluxmoe_plan,uva_16]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.environ.get("FLUXMOE_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))
from bench.vllm_run import launch  # noqa: E402

GiB = 2**30
TRACE = os.path.join(ROOT, "simulator", "traces", "azure_llm_2023_code_head.csv")


def standin_budget(full, standin, budget: float) -> float:
    """A budget for `standin` (same layers, fewer of them) that keeps what `budget` leaves per
    layer of `full` after vLLM's reserve and the embeddings, which do not scale with layers."""
    from planner.memory import vllm_reserve_bytes

    fixed_full = vllm_reserve_bytes(full) + full.embedding_params * 2
    fixed_standin = vllm_reserve_bytes(standin) + standin.embedding_params * 2
    return fixed_standin + (budget - fixed_full) * standin.num_layers / full.num_layers


@dataclass
class Setting:
    model: str
    budget_gib: float
    input_len: int = 512
    output_len: int = 128
    num_prompts: int = 256
    trace: bool = False
    max_model_len: int = 2048
    plain: bool = False
    uva_gib: list[float] = field(default_factory=list)
    prefetch: list[str] = field(default_factory=list)
    note: str = ""
    timeout_s: int = 540
    extra: list[str] = field(default_factory=list)  # more vllm_run.py options for every run
    routed: bool = False  # also plans whose host experts are fetched routed-only


# The A40-class stand-in's budget as every run of that setting has used it (UVA and prefetch
# sweeps, FluxMoE's plans, 2026-11-24 on): `standin_budget` under the flat 1 GiB reserve of the
# time. Under the measured reserve (4.38 GiB full model, 4.06 the stand-in) it would now say
# 14.83 GiB; the setting keeps 15.53 so that its rows stay comparable across days.
A40_STANDIN_BUDGET_GIB = 15.53


def _standin_46() -> float:
    """What `standin_budget` gives for 46 GiB of Mixtral-8x7B today (for reference; see above)."""
    import profiles

    return round(standin_budget(profiles.load_model(os.path.join(ROOT, "models/mixtral-8x7b")),
                                profiles.load_model(os.path.join(ROOT, "models/mixtral-8x7b-8layers")), 46 * GiB) / GiB, 2)


SETTINGS = {
    # A40-class budget: 46 GiB of Mixtral-8x7B, on the 8-layer stand-in (the offloaders need
    # minutes to load the full model and the prefetch one exceeds host RAM at this budget).
    "a40_standin": lambda: Setting("models/mixtral-8x7b-8layers", A40_STANDIN_BUDGET_GIB, uva_gib=[13.0, 16.0, 19.0],
                                   prefetch=["8/5/1", "8/6/1", "8/7/1", "8/8/1"],
                                   note="Mixtral-8x7B at 46 GiB, as its 8-layer stand-in at the scaled budget"),
    "a40_standin_code": lambda: Setting("models/mixtral-8x7b-8layers", A40_STANDIN_BUDGET_GIB, trace=True, num_prompts=256,
                                        max_model_len=8192, uva_gib=[16.0, 19.0], prefetch=["8/6/1", "8/7/1"],
                                        note="as a40_standin, with the Azure code trace's lengths"),
    # Does not fit one H200: Qwen3-Next-80B-A3B (148 GiB of bf16) at 0.9 of the GPU. The prefetch
    # offloader keeps 2 of every 8 layers' experts on the host (37 GiB; more exceeds host RAM
    # once pinned beside the UVA runs' needs).
    "qwen3_next_full": lambda: Setting("models/qwen3-next-80b-a3b", 0.9 * 139.8, uva_gib=[40.0], prefetch=["8/2/1"],
                                       extra=["--gdn-prefill-backend", "triton"],
                                       note="Qwen3-Next-80B-A3B at 0.9 of the H200 (does not fit)"),
    # As above with dummy weights of +-0.1: the 11-24 runs used vLLM's +-1e-3, whose router logits
    # tie so that every token picks the same experts, and UVA offload read only those. UVA sizes
    # around the simulator's best (44 GiB; 40 was the 11-24 run's); each run can take 10 minutes.
    "qwen3_next_full_spread": lambda: dataclasses.replace(
        SETTINGS["qwen3_next_full"](), uva_gib=[40.0, 44.0, 48.0], timeout_s=900,
        extra=["--gdn-prefill-backend", "triton", "--dummy-scale", "0.1"],
        note="Qwen3-Next-80B-A3B at 0.9 of the H200 (does not fit), dummy weights +-0.1: routing spread"),
    # Small steps of fine-grained experts, where routed-only fetch pays: Qwen3-Next's shapes on
    # 8 layers (24 GiB of experts) at 14 GiB, 8 sequences of 64 in / 256 out.
    "qwen3_next_small_batch_standin": lambda: Setting(
        "models/qwen3-next-80b-a3b-8layers", 14.0, input_len=64, output_len=256, num_prompts=8, max_model_len=512,
        uva_gib=[16.0, 19.0], prefetch=["8/4/1", "8/5/1"], extra=["--gdn-prefill-backend", "triton"], routed=True,
        note="Qwen3-Next-80B-A3B's layers (8 of them) at 14 GiB, 8 sequences: small steps"),
    # As above with dummy weights of +-0.1 (vLLM's +-1e-3 make router logits tie, and every token
    # picks the same experts): tokens spread over the experts as random routing does.
    "qwen3_next_small_batch_standin_spread": lambda: dataclasses.replace(
        SETTINGS["qwen3_next_small_batch_standin"](), extra=["--gdn-prefill-backend", "triton", "--dummy-scale", "0.1"],
        note="as qwen3_next_small_batch_standin, dummy weights +-0.1: routing spread over the experts"),
    # Qwen3-Next's compute and paging where a run takes seconds, not minutes: its 8-layer stand-in
    # at the full setting's budget scaled by `standin_budget` (24.43 GiB), the UVA sizes scaled
    # (40/44/48 GiB of 48 layers; the prefetch offloader's 8/2/1 held within it leaves no KV), and
    # the stand-in at 0.9 of the GPU, where it fits, for plain vLLM's figure (Qwen3-Next's compute,
    # never measured whole: the full model does not fit), on 1,024 requests (256 take 1.5 s).
    "qwen3_next_standin_spread": lambda: Setting(
        "models/qwen3-next-80b-a3b-8layers", 24.43, uva_gib=[6.67, 7.33, 8.0],
        extra=["--gdn-prefill-backend", "triton", "--dummy-scale", "0.1", "--routing"],
        note="Qwen3-Next-80B-A3B's layers (8 of them) at the full setting's scaled budget, dummy weights +-0.1"),
    "qwen3_next_standin_fits": lambda: Setting(
        "models/qwen3-next-80b-a3b-8layers", 0.9 * 139.8, plain=True, num_prompts=1024,
        extra=["--gdn-prefill-backend", "triton", "--dummy-scale", "0.1", "--routing"],
        note="Qwen3-Next-80B-A3B's layers (8 of them) at 0.9 of the H200, where they fit"),
    "fits_short": lambda: Setting("models/mixtral-8x7b", 0.9 * 139.8, plain=True, note="fits: short prompts"),
    "fits_long": lambda: Setting("models/mixtral-8x7b", 0.9 * 139.8, input_len=4096, output_len=512, num_prompts=128,
                                 max_model_len=4608, plain=True, note="fits: long prompts, KV-starved"),
}


def plans(setting: Setting, out_dir: str) -> dict[str, str]:
    """The planner's plan for the setting (all four tiers); its plan with the paper's three tiers
    (no host-compressed experts); and that one with every paged expert in the bf16 host tier."""
    import profiles
    from fluxmoe.names import Tier
    from planner.plan import LayerPlan
    from simulator.compare import verified_optimize

    profile = profiles.Profile(profiles.load_model(os.path.join(ROOT, setting.model)), profiles.load_gpu("h200"))
    budget, wl = int(setting.budget_gib * GiB), workload(setting)
    plan = verified_optimize(profile, budget, wl, routed_fetch=False)  # whole-layer fetch, as these rows were run
    three = verified_optimize(profile, budget, wl, host_compressed=False, routed_fetch=False)
    host = dataclasses.replace(three, layers=[LayerPlan(layer=lp.layer, resident=list(lp.resident), compressed=[],
                                                        host=sorted([*lp.host, *lp.compressed]))
                                              for lp in three.layers])
    chosen = [("fluxmoe_plan", plan), ("fluxmoe_3tier", three), ("fluxmoe_host", host)]
    if setting.routed:
        chosen += [("fluxmoe_routed", verified_optimize(profile, budget, wl, routed_fetch=True)),
                   ("fluxmoe_host_routed", dataclasses.replace(host, routed_fetch=True))]
    paths = {}
    for name, p in chosen:
        paths[name] = os.path.join(out_dir, f"{name}.json")
        p.save(paths[name])
    assert all(t in (Tier.RESIDENT, Tier.HOST) for lp in host.layers for t in lp.tiers())
    return paths


def workload(setting: Setting):
    """What vllm_run.py serves: fixed lengths, or the trace's first requests that fit, all at t=0."""
    from simulator.workload import Request, Workload, parse_workload

    if setting.trace:
        from bench.vllm_run import _lengths

        args = argparse.Namespace(trace=TRACE, num_prompts=setting.num_prompts, max_model_len=setting.max_model_len)
        return Workload("code-trace lengths", [Request(i, 0.0, n_in, n_out)
                                               for i, (n_in, n_out) in enumerate(_lengths(args))])
    return parse_workload(f"fixed:n={setting.num_prompts},prompt={setting.input_len},output={setting.output_len}")


def prefetch_in_budget_util(setting: Setting, label: str, gpu_total_bytes: int) -> float:
    """--gpu-memory-utilization that holds the prefetch offloader at `label` within the budget:
    the budget less its static buffers, which vLLM 0.26 places beyond the utilization."""
    import profiles
    from simulator.prefetch_offload import PrefetchOffload

    model = profiles.load_model(os.path.join(ROOT, setting.model))
    held = setting.budget_gib * GiB - PrefetchOffload.parse(label).buffer_bytes(model)
    return round(held / gpu_total_bytes, 4)


def predictions(setting: Setting, plan_paths: dict[str, str]) -> dict[str, dict]:
    """The simulator's figures for the systems it models (FluxMoE plans, plain vLLM, UVA offload, the
    prefetch offloader)."""
    import profiles
    from planner.memory import MemoryModel
    from planner.plan import Plan
    from simulator.compare import baseline_settings
    from simulator.engine import simulate
    from simulator.prefetch_offload import PrefetchOffload

    profile = profiles.Profile(profiles.load_model(os.path.join(ROOT, setting.model)), profiles.load_gpu("h200"))
    wl, budget = workload(setting), int(setting.budget_gib * GiB)
    memory = MemoryModel.of(profile)
    out = {}
    for name, path in plan_paths.items():
        out[name] = simulate(profile, wl, plan=Plan.load(path), keep_timeline=False)
    for label in setting.prefetch:  # vLLM's prefetch offloader: KV as vLLM sizes it, and held within the budget
        chosen = PrefetchOffload.parse(label)
        for name, kv in ((f"prefetch_{label.replace('/', '_')}", chosen.vllm_kv_cache_bytes(memory, budget)),
                         (f"prefetch_{label.replace('/', '_')}_in_budget", chosen.kv_cache_bytes(memory, budget))):
            try:
                out[name] = simulate(profile, wl, system="vllm_prefetch", prefetch_offload=chosen, max_num_seqs=256,
                                     kv_cache_bytes=kv, keep_timeline=False)
            except Exception as e:  # noqa: BLE001 - a setting the simulator cannot hold is reported, not fatal
                out[name] = str(e)
    baselines = [("plain", "vllm", 0)] if setting.plain else []
    baselines += [(f"uva_{gib:g}", "vllm_offload", int(gib * GiB)) for gib in setting.uva_gib]
    for name, system, offload in baselines:
        config = baseline_settings(memory, system, budget, offload)
        config["max_num_seqs"] = min(config["max_num_seqs"], 256)  # as the runs pass --max-num-seqs
        try:
            out[name] = simulate(profile, wl, system=system, keep_timeline=False, **config)
        except Exception as e:  # noqa: BLE001 - a setting the simulator cannot hold is reported, not fatal
            out[name] = str(e)
    return {k: (v if isinstance(v, str) else {"output_tok_s": round(v.output_tokens_per_s, 1),
                                               "total_tok_s": round(v.tokens_per_s, 1)}) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    ap.add_argument("--only", default="", help="comma-separated system names")
    ap.add_argument("--repeat", type=int, default=1,
                    help="serve the workload this many times per engine and time the last (vllm_run.py --repeat)")
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="serve the setting's first N requests only (a slow setting in the time a machine has)")
    ap.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                    help="profile each timed run's GPU kernels (vllm_run.py --kernel-profile N); the runs go to "
                         "e2e_<setting>_kernels_<date>.json, apart from the timed rows the profiler would slow")
    ap.add_argument("--step-log", action="store_true",
                    help="record each timed run's engine steps (vllm_run.py --step-log) into "
                         "e2e_<setting>_steps_<date>.json, for bench/step_times.py --analyze")
    a = ap.parse_args()
    setting = SETTINGS[a.setting]()
    if a.num_prompts:
        setting = dataclasses.replace(setting, num_prompts=a.num_prompts)
    date = datetime.date.today().isoformat()
    out_dir = os.path.join(RESULTS, f"e2e_{a.setting}")
    os.makedirs(out_dir, exist_ok=True)
    total = _gpu_total()
    util = round(setting.budget_gib * GiB / total, 4)
    common = ["--model", setting.model, "--util", str(util), "--num-prompts", str(setting.num_prompts),
              "--input-len", str(setting.input_len), "--output-len", str(setting.output_len),
              "--max-model-len", str(setting.max_model_len), "--fast-dummy", "--max-num-seqs", "256",
              "--repeat", str(a.repeat)]
    if setting.trace:
        common += ["--trace", TRACE]
    if a.kernel_profile:
        common += ["--kernel-profile", str(a.kernel_profile)]
    if a.step_log:
        common += ["--step-log"]
    common += setting.extra
    plan_paths = plans(setting, out_dir)
    systems = []
    if setting.plain:
        systems.append(("plain", []))
    systems += [(f"uva_{g:g}", ["--cpu-offload-gb", str(g)]) for g in setting.uva_gib]
    systems += [(f"prefetch_{p.replace('/', '_')}", ["--offload-prefetch", p]) for p in setting.prefetch]
    systems += [(f"prefetch_{p.replace('/', '_')}_in_budget", ["--offload-prefetch", p, "--util",
                                                              str(prefetch_in_budget_util(setting, p, total))])
                for p in setting.prefetch]
    systems += [(name, ["--plan", path]) for name, path in plan_paths.items()]
    if a.only:  # in the order given
        named = dict(systems)
        systems = [(n, named[n]) for n in a.only.split(",") if n in named]
    commit = os.environ.get("FLUXMOE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {"what": "offline throughput and latency, one engine per process, dummy weights", "setting": a.setting,
              "note": setting.note, "config": dataclasses.asdict(setting), "util": util, "date": date,
              "commit": commit, "runs": {}, "predicted": {}}
    path = os.path.join(RESULTS, f"e2e_{a.setting}{'_kernels' if a.kernel_profile else ''}{'_steps' if a.step_log else ''}_{date}.json")
    if os.path.exists(path):  # earlier runs of the day (another command, a machine given back) are kept
        with open(path) as f:
            report["runs"] = json.load(f).get("runs", {})

    def save():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    try:
        report["predicted"] = predictions(setting, plan_paths)
    except Exception as e:  # noqa: BLE001 - the measurement still runs
        report["predicted"] = {"error": repr(e)}
    save()
    with open(os.path.join(out_dir, f"runs_{date}.log"), "a") as log:
        for name, extra in systems:
            r = launch([*common, *extra, "--label", name], log, setting.timeout_s)
            r.pop("probe", None)
            report["runs"][name] = r
            report["device"] = r.get("gpu", report.get("device"))
            save()
            print(name, "error: " + r["error"] if "error" in r else f"{r['output_tok_s']} output tok/s", flush=True)
    print(table(report))


def table(report: dict) -> str:
    runs, predicted = report["runs"], report["predicted"]
    ok = {k: v for k, v in runs.items() if "error" not in v}
    budget = report["config"]["budget_gib"] * GiB
    over = {k for k, v in ok.items() if v.get("max_allocated_bytes", 0) > budget}  # torch's peak alone
    best = {}
    for family in ("plain", "uva", "prefetch"):
        cands = [(v["output_tok_s"], k) for k, v in ok.items() if k.split("_")[0] == family and k not in over]
        if cands:
            best[family] = max(cands)
    lines = [f"{report['setting']}: {report['note']} (util {report['util']})",
             f"{'system':<26} {'out tok/s':>9} {'total':>8} {'TTFT p50/p99 s':>15} {'TPOT p50/p99 ms':>16} "
             f"{'KV tok':>7} {'start s':>7} {'sim out':>8} {'sim err':>7}"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"{name:<26} {r['error'][:100]}")
            continue
        p = predicted.get(name)
        sim = p["output_tok_s"] if isinstance(p, dict) else None
        err = f"{(sim / r['output_tok_s'] - 1) * 100:+.0f}%" if sim else "-"
        lines.append(f"{name:<26} {r['output_tok_s']:>9.1f} {r['total_tok_s']:>8.1f} "
                     f"{r.get('ttft_p50_s', 0):>7.2f}/{r.get('ttft_p99_s', 0):<7.2f} "
                     f"{r.get('tpot_p50_s', 0) * 1e3:>8.1f}/{r.get('tpot_p99_s', 0) * 1e3:<7.1f} "
                     f"{r['kv_tokens'] / 1e3:>6.0f}k {r['startup_s']:>7.0f} "
                     f"{sim if sim else '-':>8} {err:>7}"
                     + (f"  peak {r['max_allocated_bytes'] / GiB:.2f} GiB: over the budget" if name in over else ""))
    ours = ok.get("fluxmoe_plan")
    if ours:
        for family, (value, name) in best.items():
            lines.append(f"FluxMoE plan / best {family} within the budget ({name}): "
                         f"{ours['output_tok_s'] / value:.2f}x output tok/s")
    return "\n".join(lines)


def _gpu_total() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


if __name__ == "__main__":
    main()

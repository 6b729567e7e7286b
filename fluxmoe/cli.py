"""The `fluxmoe` command: list what ships, plan, simulate, and profile a GPU.

User errors (bad names, files, budgets, options) print one line to stderr and exit with
status 2, before any long work starts and without leaving half-written files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fluxmoe.errors import ConfigError, FluxMoEError, InfeasibleError
from fluxmoe.names import System

DEFAULT_WORKLOAD = "fixed:n=256,prompt=512,output=128"


# ---------------------------------------------------------------------- checks before work
def check_output(path: str | None, option: str, suffixes: tuple[str, ...]) -> Path | None:
    """An output path that can be written: its folder exists, it is no folder, its suffix fits."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if not out.parent.is_dir():
        raise ConfigError(f"{option} {path}: folder {str(out.parent)!r} does not exist")
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path}: expected a {' or '.join(suffixes)} file")
    return out


def positive(kind, allow_zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if allow_zero else '>'} 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_sweep(spec: str, gpu_memory_bytes: int) -> list[int]:
    """'budget=20GiB:140GiB:10GiB' -> budgets in bytes, every one checked before any is simulated."""
    from fluxmoe.units import format_bytes, parse_bytes

    key, _, rng = spec.partition("=")
    if key != "budget":
        raise ConfigError(f"--sweep: only 'budget=START:STOP:STEP' is supported, got {spec!r}")
    parts = rng.split(":")
    if len(parts) != 3:
        raise ConfigError(f"--sweep {spec!r}: expected budget=START:STOP:STEP")
    start, stop, step = (parse_bytes(x, "--sweep") for x in parts)
    if step <= 0 or stop < start or start <= 0:
        raise ConfigError(f"--sweep {spec!r}: need START > 0, STEP > 0 and STOP >= START")
    if stop > gpu_memory_bytes:
        raise ConfigError(f"--sweep {spec!r}: STOP {format_bytes(stop)} exceeds the GPU's "
                          f"{format_bytes(gpu_memory_bytes)}")
    budgets = list(range(start, stop + 1, step))
    if len(budgets) > 200:
        raise ConfigError(f"--sweep {spec!r}: {len(budgets)} budgets; at most 200 (take a larger STEP)")
    return budgets


def _workload(args):
    from simulator.workload import parse_workload

    if args.prompt_tokens is not None or args.output_tokens is not None:
        if args.workload != DEFAULT_WORKLOAD:
            raise ConfigError("give --workload or --prompt-tokens/--output-tokens, not both")
        return parse_workload(f"fixed:n=256,prompt={args.prompt_tokens or 512},output={args.output_tokens or 128}")
    return parse_workload(args.workload)


def _planning_options(args) -> dict:
    options = dict(host_budget=args.host_budget, host_compressed=not args.no_host_compressed,
                   routed_fetch=not args.no_routed_fetch)
    if args.tpot_ms is not None:
        options.update(objective="throughput_under_latency", tpot_limit_s=args.tpot_ms / 1e3)
    return options


def make_plan(args, profile, workload):
    """The one way both commands pick a plan: simulator-verified unless --no-verify."""
    import planner
    from simulator.compare import verified_optimize

    shape = dataclasses.replace(workload.shape(), routing_skew=args.routing_skew)
    if args.no_verify:
        return planner.optimize(profile, args.budget, workload=shape, requests=len(workload),
                                **_planning_options(args))
    return verified_optimize(profile, args.budget, workload, top_k=args.top_k, shape=shape,
                             **_planning_options(args))


# ---------------------------------------------------------------------- commands
def _cmd_profiles(args: argparse.Namespace) -> None:
    import profiles
    from fluxmoe.units import format_bytes

    rows = []
    for name in profiles.list_models():
        m = profiles.load_model(name)
        rows.append(dict(name=name, params_b=m.total_params / 1e9, bf16_bytes=m.total_bytes,
                         experts=f"{m.num_moe_layers} x {m.num_experts}, top-{m.experts_per_token}",
                         expert_bytes=m.expert_bytes))
    gpus = []
    for name in profiles.list_gpus():
        g = profiles.load_gpu(name)
        gpus.append(dict(name=name, memory_bytes=g.gpu_memory_bytes, provenance=g.provenance.kind,
                         measured_on=f"{g.provenance.device} {g.provenance.date}".strip()))
    if args.json:
        print(json.dumps({"models": rows, "gpus": gpus}, indent=2))
        return
    print(f"models\n  {'name':<22} {'params':>9} {'bf16 size':>11}  {'MoE layers x experts':<24} {'per expert':>11}")
    for r in rows:
        print(f"  {r['name']:<22} {r['params_b']:>8.1f}B {format_bytes(r['bf16_bytes']):>11}  {r['experts']:<24} "
              f"{format_bytes(r['expert_bytes']):>11}")
    print(f"\ngpus\n  {'name':<22} {'memory':>11}  profile")
    for g in gpus:
        kind = f"measured ({g['measured_on']})" if g["provenance"] == "measured" else "datasheet"
        print(f"  {g['name']:<22} {format_bytes(g['memory_bytes']):>11}  {kind}")
    print("\n  '<gpu>xN' (e.g. h200x2) is N such GPUs of one host in tensor parallel (--expert-parallel for "
          f"expert parallel), budgets per GPU; interconnects: {', '.join(profiles.list_interconnects())}.\n"
          "  A path to a config.json or a hardware profile JSON works too.")


def _cmd_plan(args: argparse.Namespace) -> None:
    import profiles
    from fluxmoe.report import plan_table

    out = check_output(args.out, "--out", (".json",))
    profile = profiles.load(args.model, gpu=args.gpu, expert_parallel=args.expert_parallel)
    plan = make_plan(args, profile, _workload(args))
    if out:
        plan.save(out)
    if args.json:
        from fluxmoe.serde import to_dict

        print(json.dumps(to_dict(plan), indent=2))
        return
    print(plan_table(plan))
    if out:
        print(f"\nplan written to {out}")


def _result_row(system: System, result, vs: float | None) -> str:
    if result is None:
        return f"  {system.label:<24} {'does not fit the budget':>40}"
    ratio = f"{vs / result.output_tokens_per_s:>9.2f}x" if vs else f"{'':>10}"
    return (f"  {system.label:<24} {result.output_tokens_per_s:>12,.0f} {result.tokens_per_s:>11,.0f} "
            f"{result.ttft_s.p50:>10.2f} {result.tpot_s.p50 * 1e3:>10.1f} {result.kv_utilization:>7.0%} "
            f"{result.preemptions:>8} {result.pcie_busy:>7.0%} {ratio}")


def _result_dict(result) -> dict | None:
    if result is None:
        return None
    return dict(output_tokens_per_s=result.output_tokens_per_s, tokens_per_s=result.tokens_per_s,
                ttft_p50_s=result.ttft_s.p50, ttft_p99_s=result.ttft_s.p99, tpot_p50_s=result.tpot_s.p50,
                tpot_p99_s=result.tpot_s.p99, kv_utilization=result.kv_utilization, preemptions=result.preemptions,
                pcie_busy=result.pcie_busy, mean_batch=result.mean_batch, makespan_s=result.makespan_s,
                setting=result.setting)


def _cmd_simulate(args: argparse.Namespace) -> None:
    import planner
    import profiles
    from fluxmoe.report import plan_table
    from fluxmoe.serde import to_dict
    from fluxmoe.units import GiB
    from simulator.compare import SYSTEMS, baseline_configs, simulate_systems

    given = [name for name, v in (("--budget", args.budget), ("--plan", args.plan), ("--sweep", args.sweep)) if v]
    if len(given) != 1:
        raise ConfigError("give exactly one of --budget (make a plan), --plan plan.json (simulate it) or --sweep "
                          f"(what-if over budgets); got {', '.join(given) or 'none'}")
    plot = check_output(args.plot, "--plot", (".png",))
    timeline = check_output(args.timeline, "--timeline", (".csv",))
    save_plan = check_output(args.save_plan, "--save-plan", (".json",))
    if args.find_max_rate and (args.sweep or plot or timeline or not args.slo):
        raise ConfigError("--find-max-rate needs --slo, and is for one plan (not with --sweep, --plot, --timeline)")
    if args.slo and not args.find_max_rate:
        raise ConfigError("--slo goes with --find-max-rate")
    if args.sweep and (timeline or save_plan):
        raise ConfigError("--timeline and --save-plan are for one budget, not a --sweep")
    profile = profiles.load(args.model, gpu=args.gpu, expert_parallel=args.expert_parallel)
    workload = _workload(args)
    systems = SYSTEMS if args.baselines else (System.FLUXMOE,)
    say = (lambda *a, **k: None) if args.json else print
    say(f"workload: {workload.name} (mean {workload.mean_prompt_tokens:.0f} in / "
        f"{workload.mean_output_tokens:.0f} out)")
    if args.sweep:
        _sweep(args, profile, workload, systems, plot, say)
        return
    if args.plan:
        plan = planner.Plan.load(args.plan)
        plan.check_matches(profile)
    else:
        plan = make_plan(args, profile, workload)
    if save_plan:
        plan.save(save_plan)
    if args.find_max_rate:
        _max_rates(args, profile, plan, workload, systems)
        return
    from tqdm import tqdm

    runs = sum(1 if s is System.FLUXMOE else len(baseline_configs(profile, plan, workload, s)) for s in systems)
    with tqdm(total=len(workload) * runs, desc="simulating", unit="req", disable=args.json) as bar:
        results = simulate_systems(profile, plan, workload, systems, progress=bar.update,
                                   keep_timeline=bool(plot or timeline))
    ours = results[System.FLUXMOE]
    if args.json:
        print(json.dumps({"plan": to_dict(plan), "workload": workload.name,
                          "results": {s.value: _result_dict(r) for s, r in results.items()}}, indent=2))
    else:
        print("\n" + plan_table(plan) + "\n")
        print(f"simulated: {profile.model.name} on {profile.hardware.name}, budget "
              f"{plan.budget_bytes / GiB:.2f} GiB, {workload.name}\n"
              f"  {'system':<24} {'output tok/s':>12} {'total tok/s':>11} {'TTFT p50 s':>10} {'TPOT p50 ms':>10} "
              f"{'KV used':>7} {'preempt':>8} {'PCIe busy':>7} {'FluxMoE / it':>10}")
        for system, result in results.items():
            print(_result_row(system, result, None if system is System.FLUXMOE else ours.output_tokens_per_s))
        tuned = results.get(System.VLLM_OFFLOAD)
        if tuned is not None and tuned.setting:
            print(f"  vLLM + CPU offload as tuned: {tuned.setting['offload_bytes'] / GiB:.1f} GiB offloaded, "
                  f"{tuned.setting['kv_cache_bytes'] / GiB:.1f} GiB of KV (best of {tuned.setting['tried']} settings "
                  f"simulated)")
        tuned = results.get(System.VLLM_PREFETCH)
        if tuned is not None and tuned.setting:
            print(f"  vLLM + prefetch offload as tuned: group/offloaded/step {tuned.setting['prefetch_offload']}, "
                  f"{tuned.setting['kv_cache_bytes'] / GiB:.1f} GiB of KV, its buffers within the budget (best of "
                  f"{tuned.setting['tried']} settings simulated)")
    if timeline:
        from simulator.plots import write_timeline

        write_timeline(ours, timeline)
        say(f"timeline written to {timeline}")
    if plot:
        from simulator.plots import plot_timeline

        kv = {System.FLUXMOE: plan.kv_cache_bytes, **{System(b.name): b.kv_cache_bytes for b in plan.baselines}}
        kv.update({s: r.setting["kv_cache_bytes"] for s, r in results.items() if r is not None and r.setting})
        plot_timeline([(s, r, kv[s]) for s, r in results.items() if r is not None], plot)
        say(f"plot written to {plot}")
    if save_plan:
        say(f"plan written to {save_plan}")


def _concurrency(profile, plan, workload, system: System) -> int:
    """Sequences a system can hold at once: FluxMoE its plan's batch; a baseline what its largest
    KV holds of the workload's mean request, up to its max_num_seqs."""
    from simulator.compare import baseline_configs

    if system is System.FLUXMOE:
        return plan.max_num_seqs
    configs = baseline_configs(profile, plan, workload, system)
    if not configs:
        return 1
    per_seq = profile.model.kv_bytes_per_sequence(round(workload.mean_prompt_tokens + workload.mean_output_tokens))
    return max(min(c["max_num_seqs"], c["kv_cache_bytes"] // per_seq) for c in configs)


def _max_rates(args, profile, plan, workload, systems) -> None:
    """Each system's highest Poisson arrival rate under the SLO (its goodput), on the workload's
    request lengths repeated until a queue can form."""
    from tqdm import tqdm

    from simulator.capacity import QUEUE_FACTOR, parse_slo, system_max_rate
    from simulator.compare import simulate_systems

    slo = parse_slo(args.slo)
    found = {}
    with tqdm(desc="searching rates", unit="sim", disable=args.json) as bar:
        for system in systems:
            def run(wl, system=system):
                bar.update()
                return simulate_systems(profile, plan, wl, [system], keep_timeline=False)[system]

            concurrency = max(1, _concurrency(profile, plan, workload, system))
            found[system] = (system_max_rate(run, workload, slo, concurrency), concurrency)
    if args.json:
        print(json.dumps({"slo_s": slo.limits, "max_rate": {
            s.value: dict(requests_per_s=c.rate, requests=max(len(workload), QUEUE_FACTOR * n),
                          output_tokens_per_s=c.result.output_tokens_per_s if c.result else 0.0,
                          ttft_p99_s=c.result.ttft_s.p99 if c.result else None,
                          tpot_p99_s=c.result.tpot_s.p99 if c.result else None)
            for s, (c, n) in found.items()}}, indent=2))
        return
    print(f"highest Poisson arrival rate under {slo} (the workload's lengths; requests: {QUEUE_FACTOR}x what each "
          f"system holds at once, at least {len(workload)}):")
    print(f"  {'system':<24} {'requests/s':>10} {'output tok/s':>12} {'TTFT p99 s':>10} {'TPOT p99 ms':>11} "
          f"{'requests':>8}")
    for system, (c, n) in found.items():
        if c.result is None:
            print(f"  {system.label:<24} {'none: not even 0.01 requests/s meets the SLO, or it does not fit':>64}")
            continue
        requests = max(len(workload), QUEUE_FACTOR * n)
        print(f"  {system.label:<24} {c.rate:>10.3g} {c.result.output_tokens_per_s:>12,.0f} "
              f"{c.result.ttft_s.p99:>10.2f} {c.result.tpot_s.p99 * 1e3:>11.1f} {requests:>8}")


def _sweep(args, profile, workload, systems, plot, say) -> None:
    from tqdm import tqdm

    from fluxmoe.units import GiB
    from simulator.compare import simulate_systems

    budgets = parse_sweep(args.sweep, profile.hardware.gpu_memory_bytes)
    rows = []
    for budget in tqdm(budgets, desc="sweep", unit="budget", disable=args.json):
        args.budget = budget
        row = {"budget_gib": budget / GiB, **{s.value: None for s in systems}, "note": ""}
        try:
            plan = make_plan(args, profile, workload)
            results = simulate_systems(profile, plan, workload, systems, keep_timeline=False)
            row.update({s.value: (r.output_tokens_per_s if r else None) for s, r in results.items()})
        except InfeasibleError:
            row["note"] = "no plan fits"
        except FluxMoEError as e:  # keep the other budgets' results
            row["note"] = str(e)
        rows.append(row)
    if args.json:
        print(json.dumps({"workload": workload.name, "output_tokens_per_s": rows}, indent=2))
    else:
        print("\noutput tokens/s (simulated)\n  budget GiB " + "".join(f"{s.label:>24}" for s in systems))
        for r in rows:
            print(f"  {r['budget_gib']:>10.2f} " + "".join(
                f"{r[s.value]:>24,.0f}" if r[s.value] else f"{'-':>24}" for s in systems)
                + (f"   {r['note']}" if r["note"] else ""))
    if plot:
        from simulator.plots import plot_sweep

        plot_sweep(rows, plot, f"{profile.model.name} on {profile.hardware.name}: {workload.name}")
        say(f"\nplot written to {plot}")


def _cmd_profile(args: argparse.Namespace) -> None:
    from profiles.profiler import remeasure_expert_ffn, run

    out = check_output(args.out, "--out", (".json",))
    if args.expert_ffn_only:
        print(f"written {remeasure_expert_ffn(args.gpu_name, out, args.ffn_kernel)}")
    elif args.ffn_kernel != "torch":
        raise ConfigError("--ffn-kernel goes with --expert-ffn-only")
    else:
        print(f"written {run(args.gpu_name, out)}")


# ---------------------------------------------------------------------- parser
class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _cmd_serve(args: argparse.Namespace) -> None:
    import os
    import shlex

    from fluxmoe.report import plan_table
    from fluxmoe.serve import prepare
    from fluxmoe.vllm_plugin.endpoint import ADAPT_PATH, STATS_PATH
    from fluxmoe.vllm_plugin.stats import DEFAULT_INTERVAL_S, INTERVAL_ENV

    launch = prepare(args, args.vllm_args, lambda profile: make_plan(args, profile, _workload(args)))
    print(plan_table(launch.plan))
    print(f"\nplan written to {launch.plan_path}")
    print(f"vLLM gets --gpu-memory-utilization {launch.gpu_memory_utilization} (the plan's budget)")
    print(f"pager stats: GET {STATS_PATH} (same --api-key as the API), and a log line every "
          f"${INTERVAL_ENV} seconds (default {DEFAULT_INTERVAL_S:g})")
    if args.adapt:
        print(f"adaptation on: every {args.adapt_interval:g} s the server re-places experts by their measured "
              f"popularity (GET {ADAPT_PATH}); `fluxmoe budget` asks for a plan at another budget")
    print("starting: " + " ".join(shlex.quote(a) for a in launch.argv), flush=True)
    if args.dry_run:
        return
    if not os.path.isabs(launch.argv[0]):
        raise ConfigError("vLLM is not installed here: pip install 'fluxmoe[vllm]' (vLLM 0.26.0)")
    os.execvpe(launch.argv[0], launch.argv, launch.env)


def _cmd_budget(args: argparse.Namespace) -> None:
    import json
    import urllib.error
    import urllib.request

    from fluxmoe.units import parse_bytes
    from fluxmoe.vllm_plugin.endpoint import BUDGET_PATH

    parse_bytes(args.budget, "budget")  # refused here, before the server is asked
    request = urllib.request.Request(args.url.rstrip("/") + BUDGET_PATH, method="POST",
                                     data=json.dumps({"budget": args.budget}).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise ConfigError(f"{args.url}: {e.code} {e.read().decode(errors='replace')}") from None
    except urllib.error.URLError as e:
        raise ConfigError(f"{args.url}: no FluxMoE server answers ({e.reason})") from None
    print(json.dumps(answer, indent=2))


class _Parser(argparse.ArgumentParser):
    """Bad options are one line too (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _planning_arguments(p: argparse.ArgumentParser) -> None:
    from simulator.workload import WORKLOAD_HELP

    p.add_argument("--model", required=True, help="shipped model name (see `fluxmoe profiles`) or path to a HF "
                                                   "config.json")
    p.add_argument("--gpu", default="h200", help="shipped GPU name, '<gpu>xN' for N of them in tensor parallel "
                                                 "(the budget is per GPU), or a hardware profile JSON")
    p.add_argument("--expert-parallel", action="store_true",
                   help="with '<gpu>xN': split each layer's experts whole over the N GPUs, as vLLM's "
                        "--enable-expert-parallel does (attention stays tensor parallel)")
    p.add_argument("--host-budget", default=None, help="pinned host memory for experts, e.g. 100GiB "
                                                       "(default: the GPU profile's)")
    p.add_argument("--workload", default=DEFAULT_WORKLOAD, help=f"requests to plan for and simulate: {WORKLOAD_HELP}")
    p.add_argument("--prompt-tokens", type=positive(int), default=None,
                   help="shortcut for --workload fixed:n=256,prompt=P,output=O")
    p.add_argument("--output-tokens", type=positive(int), default=None, help="see --prompt-tokens")
    p.add_argument("--tpot-ms", type=positive(float), default=None,
                   help="per-token latency limit in ms: the best throughput under it")
    p.add_argument("--top-k", type=positive(int), default=3, help="planner candidates the simulator checks; the "
                                                                  "best simulated wins")
    p.add_argument("--no-verify", action="store_true", help="take the planner's closed-form best without "
                                                             "simulating candidates")
    p.add_argument("--no-host-compressed", action="store_true",
                   help="plan with three tiers (resident, compressed, host): no experts kept FXMC-encoded on the host")
    p.add_argument("--routing-skew", type=positive(float, allow_zero=True), default=0.0,
                   help="Zipf exponent of expert popularity within a layer (0: uniform routing); skewed routing "
                        "touches fewer experts per step")
    p.add_argument("--no-routed-fetch", action="store_true",
                   help="always fetch host experts whole, ahead of their layer; by default a plan may fetch only the "
                        "ones a step's tokens route to, after the router, where that is faster (small steps, many "
                        "experts)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def build_parser() -> argparse.ArgumentParser:
    from importlib import metadata

    try:
        version = metadata.version("fluxmoe")
    except metadata.PackageNotFoundError:
        version = "unknown"
    parser = _Parser(prog="fluxmoe", description="Serve MoE models on GPUs with too little memory: "
                                                                  "plan expert tiers, simulate, profile.")
    parser.add_argument("--version", action="version", version=f"fluxmoe {version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profiles", help="list shipped models and GPU profiles", formatter_class=_Help,
                       description="Shipped models (sizes, experts) and GPU profiles (measured or datasheet).")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_profiles)

    p = sub.add_parser("plan", help="choose expert tiers, KV and batch for a GPU memory budget",
                       formatter_class=_Help,
                       description="Choose which experts stay resident, compressed or on the host, the prefetch "
                                   "depth, KV cache and batch size for a GPU memory budget. By default the "
                                   "planner's best candidates are simulated on the workload and the best simulated "
                                   "wins (the same plan `fluxmoe simulate` runs).")
    p.add_argument("--budget", required=True, help="GPU memory budget, e.g. 46GiB")
    _planning_arguments(p)
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("simulate", help="simulate a plan against vLLM baselines on a workload, or sweep budgets",
                       formatter_class=_Help,
                       description="Replay a workload against a FluxMoE plan (made for --budget, or read from "
                                   "--plan) and, with --baselines, against plain vLLM and vLLM + CPU offload in "
                                   "the same budget; or --sweep budgets for a what-if study.")
    p.add_argument("--budget", default=None, help="GPU memory budget for a new plan, e.g. 46GiB")
    p.add_argument("--plan", default=None, help="simulate this plan JSON instead of making one")
    p.add_argument("--sweep", default=None, help="what-if over budgets: budget=START:STOP:STEP, e.g. "
                                                 "budget=40GiB:120GiB:20GiB")
    _planning_arguments(p)
    p.add_argument("--baselines", action="store_true", help="also simulate plain vLLM and vLLM + CPU offload")
    p.add_argument("--plot", default=None, help="write a PNG: throughput against budget (--sweep), or each "
                                                "system's step timeline")
    p.add_argument("--timeline", default=None, help="write FluxMoE's per-step timeline as CSV")
    p.add_argument("--save-plan", default=None, help="write the plan that was simulated as JSON")
    p.add_argument("--find-max-rate", action="store_true",
                   help="find each system's highest Poisson arrival rate under --slo (its goodput), on the "
                        "workload's request lengths")
    p.add_argument("--slo", default=None, help="latency limits for --find-max-rate, e.g. ttft_p99=2s,tpot_p99=200ms")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("serve", help="plan for a GPU budget and serve the model with vLLM (OpenAI API)",
                       formatter_class=_Help,
                       description="Plan for --gpu-budget (or take --plan), print the plan, then start vLLM's "
                                   "OpenAI-compatible server with the FluxMoE plugin serving the plan. Options "
                                   "FluxMoE does not know go to `vllm serve` unchanged (e.g. --port, --api-key, "
                                   "--max-model-len); the server binds to 127.0.0.1 unless --host is given. "
                                   "Bad inputs (no config.json, a plan for another model or GPU, a budget below "
                                   "the smallest plan) are refused before vLLM starts. The pager's stats are "
                                   "served at GET /v1/fluxmoe/stats, which asks the same --api-key as the API.")
    p.add_argument("--gpu-budget", dest="budget", default=None, help="GPU memory budget, e.g. 46GiB")
    p.add_argument("--plan", default=None, help="serve this saved plan (refused if made for another model/GPU)")
    _planning_arguments(p)
    p.add_argument("--save-plan", default=None, help="where to write the plan vLLM reads (default: a file in "
                                                     "~/.cache/fluxmoe/plans)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the vLLM command, start nothing")
    p.add_argument("--adapt", action="store_true",
                   help="close the loop: count each expert's picks on the GPU and, when the predicted gain passes "
                        "5%% twice in a row, swap hot host experts with cold resident ones between steps (at most "
                        "10%% of a step's time); also serves GET /v1/fluxmoe/adapt and POST /v1/fluxmoe/budget, "
                        "which take the same --api-key as the API")
    p.add_argument("--adapt-interval", type=positive(float), default=10.0, help="seconds between adaptation windows")
    p.set_defaults(func=_cmd_serve, vllm_args=[])

    p = sub.add_parser("budget", help="ask a running `fluxmoe serve --adapt` for a plan at another GPU budget",
                       formatter_class=_Help,
                       description="POST /v1/fluxmoe/budget: the server re-plans for the budget under the expert "
                                   "popularity it measured (its KV cache and sequence limit stay: vLLM 0.26 cannot "
                                   "resize them), writes the plan beside its own and applies it. A server started "
                                   "with --enforce-eager rebuilds its experts' tiers between steps and gives the "
                                   "memory back to the driver; under CUDA graphs, which hold the expert arena, the "
                                   "answer is the restart command. The route is an admin route under /v1: give the "
                                   "server's --api-key.")
    p.add_argument("budget", help="GPU memory budget, e.g. 40GiB")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api-key", default=None, help="the server's --api-key (sent as a bearer token)")
    p.add_argument("--timeout", type=positive(float), default=120.0, help="seconds to wait for the new plan")
    p.set_defaults(func=_cmd_budget)

    p = sub.add_parser("profile", help="measure this GPU into a hardware profile (needs CUDA)", formatter_class=_Help,
                       description="Measure PCIe curves, HBM copy and matmul rates, the codec and expert FFN times "
                                   "of this GPU into profiles/gpus/<name>-measured.json, which the planner and "
                                   "simulator then use by default.")
    p.add_argument("--gpu-name", required=True, help="profile name, e.g. h200 (the datasheet one fills gaps)")
    p.add_argument("--out", default=None, help="where to write (default profiles/gpus/<name>-measured.json)")
    p.add_argument("--expert-ffn-only", action="store_true",
                   help="re-measure only the expert FFN tables of the measured profile, keeping its other figures")
    p.add_argument("--ffn-kernel", choices=("torch", "vllm"), default="torch",
                   help="expert FFN timed as batched torch matmuls (the shipped profile's way) or as vLLM's Triton "
                        "fused-MoE kernel replayed from a CUDA graph (needs vLLM)")
    p.set_defaults(func=_cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":
        parser.parse_args(argv)  # the usual one-line error for unknown options
    if args.command == "serve":
        args.vllm_args = [a for a in unknown if a != "--"]
    try:
        args.func(args)
    except FluxMoEError as e:
        print(f"fluxmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

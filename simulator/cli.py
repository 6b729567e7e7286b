"""`fluxmoe simulate`: a plan (given or made) against the baselines on a workload, or a sweep."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from fluxmoe.errors import ConfigError, InfeasibleError
from fluxmoe.units import GiB, parse_bytes
from simulator.workload import Lengths, Workload

WORKLOAD_HELP = ("fixed:n=256,prompt=512,output=128[,rate=R] | poisson:n=..,rate=..,prompt=..,output=..[,cv_len=..] | "
                 "gamma:n=..,rate=..,cv=..,prompt=..,output=.. | trace:PATH[,limit=N,scale=X,offline=1]")


def parse_workload(spec: str) -> Workload:
    """A workload from a short spec string (see WORKLOAD_HELP)."""
    kind, _, rest = spec.partition(":")
    if kind == "trace":
        path, *opts = rest.split(",")
        kv = _options(opts, spec)
        return Workload.from_trace(path, limit=int(kv["limit"]) if "limit" in kv else None,
                                   time_scale=float(kv.get("scale", 1.0)), offline=kv.get("offline") == "1")
    if kind not in ("fixed", "poisson", "gamma"):
        raise ConfigError(f"workload: unknown kind {kind!r} in {spec!r}; expected {WORKLOAD_HELP}")
    kv = _options(rest.split(",") if rest else [], spec)
    try:
        n = int(kv.pop("n", 256))
        cv_len = float(kv.pop("cv_len", 0.0))
        prompt = Lengths(float(kv.pop("prompt", 512)), cv_len)
        output = Lengths(float(kv.pop("output", 128)), cv_len)
        rate = float(kv.pop("rate")) if "rate" in kv else None
        cv = float(kv.pop("cv", 1.0))
    except ValueError as e:
        raise ConfigError(f"workload {spec!r}: {e}") from None
    if kv:
        raise ConfigError(f"workload {spec!r}: unknown option(s) {', '.join(kv)}")
    if kind != "fixed" and rate is None:
        raise ConfigError(f"workload {spec!r}: {kind} arrivals need rate=<requests per second>")
    return Workload.synthetic(n, prompt, output, rate=rate, arrivals="gamma" if kind == "gamma" else "poisson", cv=cv)


def _options(parts: list[str], spec: str) -> dict[str, str]:
    out = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"workload {spec!r}: expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def parse_sweep(spec: str) -> list[int]:
    """'budget=20GiB:140GiB:10GiB' -> budgets in bytes."""
    key, _, rng = spec.partition("=")
    if key != "budget":
        raise ConfigError(f"--sweep: only 'budget=START:STOP:STEP' is supported, got {spec!r}")
    parts = rng.split(":")
    if len(parts) != 3:
        raise ConfigError(f"--sweep {spec!r}: expected budget=START:STOP:STEP")
    start, stop, step = (parse_bytes(x, "--sweep") for x in parts)
    if step <= 0 or stop < start:
        raise ConfigError(f"--sweep {spec!r}: need STEP > 0 and STOP >= START")
    return list(range(start, stop + 1, step))


def _row(label: str, result) -> str:
    if result is None:
        return f"  {label:<20} {'does not fit':>14}"
    return (f"  {label:<20} {result.output_tokens_per_s:>14,.0f} {result.tokens_per_s:>12,.0f} "
            f"{result.ttft_s.p50:>9.2f} {result.tpot_s.p50 * 1e3:>9.1f} {result.kv_utilization:>6.0%} "
            f"{result.preemptions:>6} {result.pcie_busy:>6.0%}")


def _cmd_simulate(args: argparse.Namespace) -> None:
    import planner
    import profiles
    from simulator.compare import SYSTEMS, baseline_config, simulate_systems, verified_optimize
    from simulator.plots import LABELS, plot_sweep, plot_timeline, write_timeline

    profile = profiles.load(args.model, gpu=args.gpu)
    workload = parse_workload(args.workload)
    systems = SYSTEMS if args.baselines else ("fluxmoe",)
    print(f"workload: {workload.name} (mean {workload.mean_prompt_tokens:.0f} in / {workload.mean_output_tokens:.0f} out)")
    if args.sweep:
        budgets = parse_sweep(args.sweep)
        rows = []
        for budget in tqdm(budgets, desc="sweep", unit="budget"):
            try:
                plan = verified_optimize(profile, budget, workload, top_k=args.top_k)
            except InfeasibleError:
                rows.append({"budget_gib": budget / GiB, **{s: None for s in systems}})
                continue
            results = simulate_systems(profile, plan, workload, systems, keep_timeline=False)
            rows.append({"budget_gib": budget / GiB,
                         **{s: (r.output_tokens_per_s if r else None) for s, r in results.items()}})
        header = "  budget GiB " + "".join(f"{LABELS[s]:>20}" for s in systems)
        print("\noutput tokens/s (simulated)\n" + header)
        for r in rows:
            print(f"  {r['budget_gib']:>10.1f} " + "".join(
                f"{r[s]:>20,.0f}" if r[s] else f"{'-':>20}" for s in systems))
        if args.plot:
            plot_sweep(rows, args.plot, f"{profile.model.name} on {profile.hardware.name}: {workload.name}")
            print(f"\nplot written to {args.plot}")
        return
    if args.budget is None and args.plan is None:
        raise ConfigError("give --budget (to make a plan) or --plan plan.json")
    plan = planner.Plan.load(args.plan) if args.plan else verified_optimize(profile, args.budget, workload,
                                                                          top_k=args.top_k)
    plan.check_matches(profile)
    runnable = [s for s in systems if s == "fluxmoe" or baseline_config(profile, plan, s) is not None]
    with tqdm(total=len(workload) * len(runnable), desc="simulating", unit="req") as bar:
        results = simulate_systems(profile, plan, workload, systems, progress=bar.update)
    print(f"\n{profile.model.name} on {profile.hardware.name}, budget {plan.budget_bytes / GiB:.1f} GiB\n"
          f"  {'system':<20} {'output tok/s':>14} {'total tok/s':>12} {'TTFT p50':>9} {'TPOT ms':>9} "
          f"{'KV':>6} {'preempt':>6} {'PCIe':>6}")
    for system, result in results.items():
        print(_row(LABELS[system], result))
    ours = results["fluxmoe"]
    for system in systems[1:]:
        if results[system]:
            print(f"  FluxMoE / {LABELS[system]}: {ours.output_tokens_per_s / results[system].output_tokens_per_s:.2f}x")
    if args.timeline:
        write_timeline(ours, args.timeline)
        print(f"timeline written to {args.timeline}")
    if args.plot:
        plot_timeline(ours, args.plot, plan.kv_cache_bytes)
        print(f"plot written to {args.plot}")


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a plan against vLLM baselines on a workload, or sweep budgets")
    p.add_argument("--model", required=True, help="shipped model name or path to a HF config.json")
    p.add_argument("--gpu", default="h200", help="shipped GPU name (e.g. a40, h200, a40x2) or profile JSON")
    p.add_argument("--budget", default=None, help="GPU memory budget for a new plan, e.g. 46GiB")
    p.add_argument("--plan", default=None, help="simulate this plan JSON instead of making one")
    p.add_argument("--workload", default="fixed:n=256,prompt=512,output=128", help=WORKLOAD_HELP)
    p.add_argument("--baselines", action="store_true", help="also simulate plain vLLM and vLLM + CPU offload")
    p.add_argument("--sweep", default=None, help="what-if over budgets: budget=START:STOP:STEP")
    p.add_argument("--top-k", type=int, default=3, help="planner candidates to simulate; the best simulated wins")
    p.add_argument("--plot", default=None, help="write a PNG (throughput vs budget, or the run's timeline)")
    p.add_argument("--timeline", default=None, help="write the per-step timeline as CSV")
    p.set_defaults(func=_cmd_simulate)

"""The `fluxmoe` command: plan, simulate, profile and list what ships.

User errors (bad names, files, budgets) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from fluxmoe.errors import FluxMoEError


def _cmd_profiles(args: argparse.Namespace) -> None:
    import profiles

    print("models: " + ", ".join(profiles.list_models()))
    print("gpus:   " + ", ".join(profiles.list_gpus()))


def _cmd_plan(args: argparse.Namespace) -> None:
    import planner
    import profiles
    from fluxmoe.report import plan_table

    profile = profiles.load(args.model, gpu=args.gpu)
    plan = planner.optimize(
        profile, args.budget, workload=planner.WorkloadShape(args.prompt_tokens, args.output_tokens),
        host_budget=args.host_budget, objective="throughput_under_latency" if args.tpot_ms else "throughput",
        tpot_limit_s=args.tpot_ms / 1e3 if args.tpot_ms else None)
    print(plan_table(plan))
    if args.out:
        plan.save(args.out)
        print(f"\nplan written to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxmoe", description="Serve MoE models on GPUs with too little memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("profiles", help="list shipped models and GPUs").set_defaults(func=_cmd_profiles)

    plan = sub.add_parser("plan", help="choose expert tiers, KV and batch for a GPU memory budget")
    plan.add_argument("--model", required=True, help="shipped model name or path to a HF config.json")
    plan.add_argument("--gpu", default="h200", help="shipped GPU name or path to a hardware profile JSON")
    plan.add_argument("--budget", required=True, help="GPU memory budget, e.g. 46GiB")
    plan.add_argument("--host-budget", default=None, help="pinned host memory for experts (default: the profile's)")
    plan.add_argument("--prompt-tokens", type=int, default=512, help="mean prompt length of the workload")
    plan.add_argument("--output-tokens", type=int, default=128, help="mean output length of the workload")
    plan.add_argument("--tpot-ms", type=float, default=None, help="per-token latency bound (ms); maximize throughput under it")
    plan.add_argument("--out", default=None, help="write the plan as JSON here")
    plan.set_defaults(func=_cmd_plan)

    from simulator.cli import register as register_simulate

    register_simulate(sub)
    # Listed for --help; main() hands its arguments to the profiler's own parser.
    sub.add_parser("profile", help="measure this GPU into profiles/gpus/<name>-measured.json (needs CUDA)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        from profiles.profiler import main as profile_main

        try:
            return profile_main(argv[1:])
        except FluxMoEError as e:
            print(f"fluxmoe profile: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FluxMoEError as e:
        print(f"fluxmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

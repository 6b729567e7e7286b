"""`fluxmoe serve`: plan for a GPU budget (or take a saved plan), then start vLLM's
OpenAI-compatible server with the plan.

Everything that can be wrong with the inputs is refused here, before vLLM starts loading: a
model folder without a config.json, a plan made for other model shapes or another GPU, a
budget below the smallest plan. The plan goes to a file that vLLM's processes read through the
FluxMoE plugin (`FLUXMOE_PLAN`); vLLM's memory utilization is set from the plan's budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fluxmoe.errors import ConfigError
from fluxmoe.vllm_plugin.endpoint import STATS_PATH, StatsEndpoint
from fluxmoe.vllm_plugin.worker import EXTENSION as WORKER_EXTENSION

ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
# Options that FluxMoE sets from the plan: giving them too would make vLLM run another budget.
PLAN_OWNED = ("--gpu-memory-utilization",)


@dataclass
class Launch:
    plan: object
    plan_path: Path
    argv: list[str]
    env: dict[str, str]
    gpu_memory_utilization: float


def model_config(folder: str) -> dict:
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"--model: {folder!r} is not a folder (give a model folder with a config.json, e.g. "
                          f"models/mixtral-8x7b)")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"--model: {folder!r} has no config.json")
    from profiles.hf_config import read_config

    return read_config(config)[0]


def _gpu_memory_bytes(hardware) -> int:
    """What vLLM's --gpu-memory-utilization is a fraction of: the CUDA device's memory where
    there is one, else the GPU profile's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return hardware.gpu_memory_bytes


def _plan_file(plan, where: str | None) -> Path:
    from fluxmoe.serde import to_dict

    if where:
        path = Path(where)
    else:
        digest = hashlib.sha256(json.dumps(to_dict(plan), sort_keys=True).encode()).hexdigest()[:12]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluxmoe" / "plans"
        path = cache / f"{plan.model}-{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return path


def prepare(args, vllm_args: list[str], make_plan) -> Launch:
    """The plan (made or loaded, and checked) and the vLLM command line that serves it."""
    import profiles
    from planner.plan import Plan
    from fluxmoe.vllm_plugin import PLAN_ENV
    from fluxmoe.vllm_plugin.runtime import check_plan_for_model

    for option in PLAN_OWNED:
        if _given(option, vllm_args):
            raise ConfigError(f"{option}: set by FluxMoE from the plan's budget; give --gpu-budget instead")
    config = model_config(args.model)
    tensor_parallel, expert_parallel = vllm_parallelism(vllm_args)
    gpu = f"{args.gpu}x{tensor_parallel}" if tensor_parallel > 1 else args.gpu
    profile = profiles.load(args.model, gpu, expert_parallel=expert_parallel)  # one rank's view
    if args.plan:
        if args.budget:
            raise ConfigError("give --gpu-budget or --plan, not both")
        plan = Plan.load(args.plan)
        check_plan_for_model(plan, config, tensor_parallel, expert_parallel)
        plan.check_matches(dataclasses.replace(profile, model=dataclasses.replace(profile.model, name=plan.model)))
    else:
        if not args.budget:
            raise ConfigError("give --gpu-budget (e.g. 46GiB, per GPU) or --plan")
        plan = make_plan(profile)
    total = _gpu_memory_bytes(profile.hardware)
    utilization = int(plan.budget_bytes / total * 1e4) / 1e4  # rounded down: never more than the budget
    if not 0 < utilization <= 1:
        raise ConfigError(f"plan's budget of {plan.budget_bytes} bytes is not within this GPU's {total}")
    plan_path = _plan_file(plan, args.save_plan)
    vllm = shutil.which("vllm") or "vllm"
    argv = [vllm, "serve", str(args.model), "--gpu-memory-utilization", f"{utilization}", "--dtype", "bfloat16"]
    if not _given("--max-num-seqs", vllm_args):
        argv += ["--max-num-seqs", str(plan.max_num_seqs)]
    if not _given("--host", vllm_args):
        argv += ["--host", "127.0.0.1"]  # localhost unless told otherwise
    if not _given("--worker-extension-cls", vllm_args):
        argv += ["--worker-extension-cls", WORKER_EXTENSION]  # answers the stats endpoint
    argv += list(vllm_args)
    env = dict(os.environ, **{PLAN_ENV: str(plan_path.resolve())})
    env["VLLM_PLUGINS"] = _plugins_with_stats(os.environ.get("VLLM_PLUGINS"))
    if getattr(args, "adapt", False):
        from fluxmoe.vllm_plugin.adapt import ADAPT_ENV, refuse_expert_parallel

        refuse_expert_parallel(expert_parallel)

        env[ADAPT_ENV] = json.dumps({"model": str(Path(args.model).resolve()), "gpu": gpu,
                                     "expert_parallel": expert_parallel, "interval_s": args.adapt_interval})
        # A budget change frees experts among live tensors: torch's expandable segments give those
        # pages back to the driver (measured: 7.72 of 8.40 GiB, against 5.50 in fixed segments).
        env.setdefault(ALLOC_ENV, "expandable_segments:True")
    return Launch(plan, plan_path, argv, env, utilization)


def vllm_parallelism(vllm_args: list[str]) -> tuple[int, bool]:
    """(tensor-parallel size, expert parallel on) as vLLM reads them from its options, which
    pass through to it: the plan must be made for the same split."""
    size = 1
    for i, a in enumerate(vllm_args):
        value = None
        if a in ("--tensor-parallel-size", "-tp"):
            value = vllm_args[i + 1] if i + 1 < len(vllm_args) else ""
        elif a.startswith(("--tensor-parallel-size=", "-tp=")):
            value = a.split("=", 1)[1]
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--tensor-parallel-size: expected a whole number >= 1, got {value!r}")
            size = int(value)
    return size, any(a in ("--enable-expert-parallel", "-ep") for a in vllm_args)


def _given(option: str, args: list[str]) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def _plugins_with_stats(allowed: str | None) -> str:
    """vLLM loads endpoint plugins only when VLLM_PLUGINS names them, and then loads only the
    general plugins it names: keep every general plugin that would have loaded, add ours."""
    from importlib.metadata import entry_points

    if allowed is None:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    else:
        names = [n for n in allowed.split(",") if n]
    for ours in ("fluxmoe", StatsEndpoint.name):
        if ours not in names:
            names.append(ours)
    return ",".join(names)

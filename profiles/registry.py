"""Shipped model configs and GPU profiles, found by name, and the `Profile` that pairs them.

A GPU profile named `<gpu>-measured.json` (written by the profiler) wins over the datasheet
one, so measuring a GPU changes every later plan without a flag. "<gpu>x<n>" is n such GPUs
of one host under vLLM's tensor (or expert) parallelism: the Profile is then one rank's
(profiles/parallel.py), and an interconnect profile for those n GPUs must be shipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fluxmoe.errors import ConfigError, UnknownNameError
from fluxmoe.serde import load_json
from profiles.hardware import HardwareProfile
from profiles.model_spec import ModelSpec
from profiles.parallel import INTERCONNECTS_DIR, Parallelism, load_interconnect

MODELS_DIR = Path(__file__).parent / "models"
GPUS_DIR = Path(__file__).parent / "gpus"


@dataclass(frozen=True)
class Profile:
    """A model on a GPU: what `planner.optimize` takes. Under tensor or expert parallelism,
    `model` is one rank's shard and `hardware` one rank's GPU (`parallel` says how they split)."""

    model: ModelSpec
    hardware: HardwareProfile
    parallel: Parallelism = Parallelism()

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.hardware.name}"

    @classmethod
    def split(cls, model: ModelSpec, gpu: HardwareProfile, parallel: Parallelism) -> "Profile":
        """`model` over `parallel`'s GPUs of kind `gpu`, seen from one rank."""
        return cls(parallel.shard(model), parallel.rank_hardware(gpu), parallel)


def list_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def list_gpus() -> list[str]:
    return sorted({p.stem.removesuffix("-measured") for p in GPUS_DIR.glob("*.json")})


def list_interconnects() -> list[str]:
    """GPU groups ("h200x2") whose collectives are profiled: the "<gpu>x<n>" names that load."""
    return sorted(p.stem for p in INTERCONNECTS_DIR.glob("*.json"))


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A shipped model by name, or any HF config.json (file or folder) by path."""
    path = Path(name_or_path)
    if path.exists():
        return ModelSpec.from_hf_config(path)
    shipped = MODELS_DIR / f"{name_or_path}.json"
    if not shipped.exists():
        raise UnknownNameError(f"unknown model {str(name_or_path)!r}; known models: {', '.join(list_models())} "
                               f"(or give the path of a Hugging Face config.json)")
    return ModelSpec.from_hf_config(shipped, name=str(name_or_path))


def split_gpu_name(name: str | Path) -> tuple[str | Path, int]:
    """("a40", 2) for "a40x2", where "a40" is a shipped GPU; (name, 1) otherwise."""
    match = re.fullmatch(r"(.+)x([0-9]+)", str(name))
    if match and match.group(1) in list_gpus():
        return match.group(1), int(match.group(2))
    return name, 1


def load_parallelism(name: str | Path, expert_parallel: bool = False) -> Parallelism:
    """How a GPU name splits a model: one GPU, or "<gpu>x<n>" in tensor (or expert) parallel."""
    _, gpus = split_gpu_name(name)
    if gpus == 1:
        if expert_parallel:
            raise ConfigError(f"expert_parallel: needs several GPUs (e.g. '{name}x2'), got GPU {str(name)!r}")
        return Parallelism()
    return Parallelism(gpus, expert_parallel, load_interconnect(str(name)))


def load_gpu(name_or_path: str | Path, measured: bool = True) -> HardwareProfile:
    """One GPU's profile by name (the measured one if there is one), or a profile JSON by path.

    "<gpu>x<n>" (e.g. "a40x2") gives one rank's GPU of n (its PCIe rate while all n copy).
    """
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return load_json(HardwareProfile, path)
    base, gpus = split_gpu_name(name_or_path)
    if gpus > 1:
        return load_parallelism(name_or_path).rank_hardware(load_gpu(base, measured))
    name_or_path = base
    candidates = ([GPUS_DIR / f"{name_or_path}-measured.json"] if measured else []) + [GPUS_DIR / f"{name_or_path}.json"]
    for candidate in candidates:
        if candidate.exists():
            return load_json(HardwareProfile, candidate)
    raise UnknownNameError(f"unknown GPU {str(name_or_path)!r}; known GPUs: {', '.join(list_gpus())} "
                           f"(or '<gpu>x<n>' for n of them in parallel, or the path of a hardware profile JSON)")


def load(model: str | Path, gpu: str | Path = "h200", measured: bool = True, expert_parallel: bool = False) -> Profile:
    """The Profile for a model on a GPU, e.g. `load("mixtral-8x7b", gpu="h200")`; on
    "h200x2", one rank's view of tensor parallel (or expert parallel) over two H200s."""
    base, _ = split_gpu_name(gpu)
    return Profile.split(load_model(model), load_gpu(base, measured=measured), load_parallelism(gpu, expert_parallel))

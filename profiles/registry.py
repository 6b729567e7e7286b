"""Shipped model configs and GPU profiles, found by name, and the `Profile` that pairs them.

A GPU profile named `<gpu>-measured.json` (written by the profiler) wins over the datasheet
one, so measuring a GPU changes every later plan without a flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fluxmoe.errors import UnknownNameError
from fluxmoe.serde import load_json
from profiles.hardware import HardwareProfile
from profiles.model_spec import ModelSpec

MODELS_DIR = Path(__file__).parent / "models"
GPUS_DIR = Path(__file__).parent / "gpus"


@dataclass(frozen=True)
class Profile:
    """A model on a GPU: what `planner.optimize` takes."""

    model: ModelSpec
    hardware: HardwareProfile

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.hardware.name}"


def list_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def list_gpus() -> list[str]:
    return sorted({p.stem.removesuffix("-measured") for p in GPUS_DIR.glob("*.json")})


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


def load_gpu(name_or_path: str | Path, measured: bool = True) -> HardwareProfile:
    """A shipped GPU profile by name (the measured one if there is one), or a profile JSON by path.

    "<gpu>x<n>" (e.g. "a40x2") is n such GPUs in tensor parallel.
    """
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return load_json(HardwareProfile, path)
    match = re.fullmatch(r"(.+)x([0-9]+)", str(name_or_path))
    if match and match.group(1) in list_gpus():
        return load_gpu(match.group(1), measured).tensor_parallel(int(match.group(2)))
    candidates = ([GPUS_DIR / f"{name_or_path}-measured.json"] if measured else []) + [GPUS_DIR / f"{name_or_path}.json"]
    for candidate in candidates:
        if candidate.exists():
            return load_json(HardwareProfile, candidate)
    raise UnknownNameError(f"unknown GPU {str(name_or_path)!r}; known GPUs: {', '.join(list_gpus())} "
                           f"(or '<gpu>x<n>' for n in tensor parallel, or the path of a hardware profile JSON)")


def load(model: str | Path, gpu: str | Path = "h200", measured: bool = True) -> Profile:
    """The Profile for a model on a GPU, e.g. `load("mixtral-8x7b", gpu="h200")`."""
    return Profile(load_model(model), load_gpu(gpu, measured=measured))

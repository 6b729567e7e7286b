"""Model specs and hardware profiles: what the planner, simulator and executor are calibrated from.

`profiles.load("mixtral-8x7b", gpu="h200")` returns a `Profile`; `profiles.list_models()` and
`profiles.list_gpus()` name what ships; `load(..., gpu="h200x2")` is one rank of two H200s.
"""

from profiles.hardware import CodecRates, Curve, HardwareProfile, Provenance
from profiles.model_spec import ModelSpec
from profiles.parallel import Interconnect, Parallelism
from profiles.registry import Profile, list_gpus, list_interconnects, list_models, load, load_gpu, load_model

__all__ = ["CodecRates", "Curve", "HardwareProfile", "Interconnect", "ModelSpec", "Parallelism", "Profile",
           "Provenance", "list_gpus", "list_interconnects", "list_models", "load", "load_gpu", "load_model"]

"""Model specs and hardware profiles: what the planner, simulator and executor are calibrated from.

`profiles.load("mixtral-8x7b", gpu="h200")` returns a `Profile`; `profiles.list_models()` and
`profiles.list_gpus()` name what ships.
"""

from profiles.hardware import CodecRates, Curve, HardwareProfile, Provenance
from profiles.model_spec import ModelSpec
from profiles.registry import Profile, list_gpus, list_models, load, load_gpu, load_model

__all__ = ["CodecRates", "Curve", "HardwareProfile", "ModelSpec", "Profile", "Provenance",
           "list_gpus", "list_models", "load", "load_gpu", "load_model"]

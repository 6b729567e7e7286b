"""Provenance for benchmark results: device, date, commit, library versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def provenance() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("FLUXMOE_COMMIT", "unknown"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpu_memory_bytes=props.total_memory, sms=props.multi_processor_count)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict) -> Path:
    """JSON under $OUT (device runs) or bench/results/, named <name>_<date>.json."""
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2) + "\n")
    return path

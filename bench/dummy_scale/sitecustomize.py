"""Benchmarks only: vLLM's dummy weights drawn from +-FLUXMOE_DUMMY_SCALE in every process of a
`vllm serve` (its engine runs in child processes, where an in-process patch cannot reach).
vLLM's default +-1e-3 makes every router's logits tie, so every token picks the same experts.
Put this folder first on PYTHONPATH; the patch applies when vLLM's weight_utils is imported."""

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "vllm.model_executor.model_loader.weight_utils"
_SCALE = float(os.environ.get("FLUXMOE_DUMMY_SCALE", "0.1"))


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

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())

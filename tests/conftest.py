"""Shared fixtures: tiny models and GPUs small enough to enumerate every placement."""

import pytest

from profiles import CodecRates, Curve, HardwareProfile, ModelSpec, Profile, Provenance


def tiny_model(num_layers: int = 2, num_experts: int = 4, top_k: int = 2) -> ModelSpec:
    """A toy MoE with experts of 3 x 64 x 128 params: small enough to enumerate placements."""
    return ModelSpec(
        name=f"tiny-{num_layers}x{num_experts}", family="mixtral", hidden_size=64, num_layers=num_layers,
        vocab_size=256, tie_word_embeddings=False, max_context=4096, num_experts=num_experts,
        experts_per_token=top_k, expert_intermediate_size=128, expert_has_bias=False,
        moe_layers=list(range(num_layers)), shared_ffn_params=[0] * num_layers,
        attention=["full"] * num_layers, attention_params=[4 * 64 * 64] * num_layers,
        kv_bytes_per_token_layer={"full": 32}, attention_width=64)


def tiny_gpu(pcie_gbps: float = 1.0) -> HardwareProfile:
    """A slow toy GPU whose link and decode costs are comparable to its compute."""
    return HardwareProfile(
        name="toy", gpu_memory_bytes=2**30, hbm_gbps=50.0, bf16_tflops=1.0,
        h2d_gbps=Curve([1e3, 1e6], [pcie_gbps / 2, pcie_gbps], log_x=True),
        d2h_gbps=Curve([1e3, 1e6], [pcie_gbps / 2, pcie_gbps], log_x=True),
        codec=CodecRates(decode_gbps=20.0, compressed_ratio=0.7), host_pinned_bytes=2**30,
        provenance=Provenance("datasheet", "test fixture"), kernel_overhead_s=1e-6, step_overhead_s=1e-5)


@pytest.fixture
def tiny_profile() -> Profile:
    return Profile(tiny_model(), tiny_gpu())


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA (and Triton); skip them elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

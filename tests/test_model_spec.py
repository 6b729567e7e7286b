"""Model specs from HF configs: totals match published counts, bytes match hand computation."""

import json

import pytest

import profiles
from fluxmoe.errors import ConfigError
from profiles.model_spec import ModelSpec

# Published total parameter counts (model cards / papers), without MTP layers.
PUBLISHED_TOTAL = {
    "mixtral-8x7b": 46.7e9,
    "mixtral-8x22b": 141e9,
    "qwen3-30b-a3b": 30.5e9,
    "qwen3-next-80b-a3b": 80e9,
    "deepseek-v2-lite": 15.7e9,
    "deepseek-v3": 671e9,
    "gpt-oss-120b": 116.83e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_total_parameters_match_published_within_1_percent(name):
    spec = profiles.load_model(name)
    assert spec.total_params == pytest.approx(PUBLISHED_TOTAL[name], rel=0.01)


def test_every_shipped_model_has_a_published_total():
    assert set(profiles.list_models()) == set(PUBLISHED_TOTAL)


# Hand-computed from the published shapes: (bytes per expert, bytes of one MoE layer's experts,
# KV bytes per token over the layers whose cache grows with context), all bf16.
HAND = {
    # 3 * 4096 * 14336 * 2; x 8 experts; 32 layers * 2 (K,V) * 8 heads * 128 * 2
    "mixtral-8x7b": (3 * 4096 * 14336 * 2, 8 * 3 * 4096 * 14336 * 2, 32 * 2 * 8 * 128 * 2),
    "mixtral-8x22b": (3 * 6144 * 16384 * 2, 8 * 3 * 6144 * 16384 * 2, 56 * 2 * 8 * 128 * 2),
    "qwen3-30b-a3b": (3 * 2048 * 768 * 2, 128 * 3 * 2048 * 768 * 2, 48 * 2 * 4 * 128 * 2),
    # only the 12 full-attention layers of 48 keep KV: 2 KV heads of 256
    "qwen3-next-80b-a3b": (3 * 2048 * 512 * 2, 512 * 3 * 2048 * 512 * 2, 12 * 2 * 2 * 256 * 2),
    # MLA caches the 512-d latent plus the 64-d rope key per layer
    "deepseek-v2-lite": (3 * 2048 * 1408 * 2, 64 * 3 * 2048 * 1408 * 2, 27 * (512 + 64) * 2),
    # experts carry biases: gate_up (2 * 2880) and down (2880); half the layers slide (window 128)
    "gpt-oss-120b": ((3 * 2880 * 2880 + 3 * 2880) * 2, 128 * (3 * 2880 * 2880 + 3 * 2880) * 2, 18 * 2 * 8 * 64 * 2),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_bytes_per_expert_layer_and_kv_token(name):
    spec = profiles.load_model(name)
    expert, layer, kv = HAND[name]
    assert (spec.expert_bytes, spec.moe_layer_expert_bytes, spec.kv_bytes_per_token) == (expert, layer, kv)


def test_qwen3_next_linear_layers_keep_fixed_state_not_kv():
    """36 Gated-DeltaNet layers: recurrent state 32 heads x 128 x 128 plus 3 conv rows of 8192."""
    spec = profiles.load_model("qwen3-next-80b-a3b")
    assert spec.attention.count("linear") == 36 and spec.attention.count("full") == 12
    assert spec.state_bytes_per_sequence == 36 * (32 * 128 * 128 + 3 * 8192) * 2
    block = spec.kv_block_tokens
    short, long = spec.kv_bytes_per_sequence(block), spec.kv_bytes_per_sequence(block * 30)
    assert long - short == 29 * block * spec.kv_bytes_per_token  # only full layers grow


def test_sliding_window_layers_stop_growing_at_the_window():
    spec = profiles.load_model("gpt-oss-120b")
    per_sliding_token = 18 * 2 * 8 * 64 * 2
    grow = spec.kv_bytes_per_sequence(4096) - spec.kv_bytes_per_sequence(2048)
    assert grow == 2048 * spec.kv_bytes_per_token  # the sliding half contributes nothing past 128
    assert spec.kv_bytes_per_sequence(128) == 128 * (spec.kv_bytes_per_token + per_sliding_token)


def test_deepseek_first_layer_is_dense_and_shared_experts_count():
    spec = profiles.load_model("deepseek-v2-lite")
    assert spec.moe_layers == list(range(1, 27))
    assert spec.shared_ffn_params[0] == 3 * 2048 * 10944
    assert spec.shared_ffn_params[1] == 2 * 3 * 2048 * 1408


def test_from_hf_config_reads_a_folder(tmp_path):
    (tmp_path / "config.json").write_text((profiles.registry.MODELS_DIR / "mixtral-8x7b.json").read_text())
    assert ModelSpec.from_hf_config(tmp_path).total_params == profiles.load_model("mixtral-8x7b").total_params


def test_malformed_config_names_file_field_and_value(tmp_path):
    data = json.loads((profiles.registry.MODELS_DIR / "mixtral-8x7b.json").read_text())
    data["num_local_experts"] = "eight"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json: field 'num_local_experts': expected int, got 'eight'"):
        ModelSpec.from_hf_config(path)
    del data["num_local_experts"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="field 'num_local_experts': missing"):
        ModelSpec.from_hf_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(line 1"):
        ModelSpec.from_hf_config(path)


def test_unsupported_family_lists_supported():
    with pytest.raises(ConfigError, match="'llama' is not a supported MoE family.*mixtral"):
        ModelSpec.from_hf_config({"model_type": "llama"})


def test_spec_round_trips_through_dict():
    from fluxmoe.serde import to_dict

    spec = profiles.load_model("qwen3-next-80b-a3b")
    assert ModelSpec.from_dict(to_dict(spec)) == spec


def test_a_bad_value_in_an_optional_field_is_a_config_error_naming_it():
    """A union-typed field (a plan's `tpot_limit_s: float | None`) whose value matches no member:
    a ConfigError naming the field (the loader once raised a TypeError from inside itself)."""
    from pathlib import Path

    from fluxmoe.serde import from_dict
    from planner.plan import Plan

    plan = json.loads((Path(__file__).parent.parent / "bench" / "plans" / "mixtral-tiny.json").read_text())
    plan["tpot_limit_s"] = "fast"
    with pytest.raises(ConfigError, match="'tpot_limit_s'.*'fast'"):
        from_dict(Plan, plan)


def test_qwen3_next_blocks_are_vllms_hybrid_pages():
    """vLLM 0.26 gives every layer of a hybrid model one page size: Qwen3-Next's attention blocks
    are 544 tokens, and each linear layer's state fills one such page. Measured on the H200
    (bench/results/e2e_qwen3_next_full_2026-11-24.json): 964 blocks held 192 sequences of 640
    tokens (TTFT p99 28 s: the last 64 waited for the first 192)."""
    spec = profiles.load_model("qwen3-next-80b-a3b")
    assert spec.kv_block_tokens == 544
    cache = 964 * 544 * spec.kv_bytes_per_token
    assert cache // spec.kv_bytes_per_sequence(640) == 192
    page = 544 * spec.kv_bytes_per_token_layer["full"]
    assert spec.kv_bytes_per_sequence(544) == 544 * spec.kv_bytes_per_token + 36 * page
    assert profiles.load_model("mixtral-8x7b").kv_block_tokens == 16


def test_dense_gemm_kernels_per_layer():
    """Attention in and out, the router on MoE layers, the shared or dense FFN's two."""
    assert profiles.load_model("mixtral-8x7b").layer_dense_gemms(0) == 3
    assert profiles.load_model("qwen3-next-80b-a3b").layer_dense_gemms(0) == 5  # shared expert
    deepseek = profiles.load_model("deepseek-v2-lite")
    assert [deepseek.layer_dense_gemms(layer) for layer in (0, 1)] == [4, 5]  # layer 0 is dense, no router

"""Read Hugging Face `config.json` files of the MoE families we support into a `ModelSpec`.

One function per family, each counting parameters the way the model's modeling code lays them
out (projections, norms, biases), so totals match published parameter counts.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import Any, Callable

from fluxmoe.errors import ConfigError

FAMILIES = ("mixtral", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "gpt_oss")


class _Config:
    """A config dict that names the file and field when a required key is missing or wrong."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data, self.source = data, source

    def get(self, key: str, default: Any = None, kind: type = int) -> Any:
        value = self.data.get(key, default)
        if value is None:
            return None
        ok = isinstance(value, kind) and not isinstance(value, bool) if kind is int else isinstance(value, kind)
        if not ok:
            raise ConfigError(f"{self.source}: field '{key}': expected {kind.__name__}, got {value!r}")
        if kind is int and value < 0:
            raise ConfigError(f"{self.source}: field '{key}': must be >= 0, got {value!r}")
        return value

    def req(self, key: str, kind: type = int) -> Any:
        if key not in self.data or self.data[key] is None:
            raise ConfigError(f"{self.source}: field '{key}': missing (needed for model_type "
                              f"{self.data.get('model_type')!r})")
        return self.get(key, kind=kind)

    def common(self) -> dict[str, Any]:
        return dict(
            hidden_size=self.req("hidden_size"),
            num_layers=self.req("num_hidden_layers"),
            vocab_size=self.req("vocab_size"),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", False, bool)),
            max_context=self.get("max_position_embeddings", 4096),
        )


def _gqa_attention(c: _Config, h: int, qk_norm: bool, bias: bool = False, q_gate: bool = False) -> tuple[int, int, int]:
    """(params, kv bytes per token, width) of one grouped-query attention layer incl. its norms."""
    nh = c.req("num_attention_heads")
    nkv = c.get("num_key_value_heads", nh)
    hd = c.get("head_dim") or h // nh
    q_out = nh * hd * (2 if q_gate else 1)
    params = h * q_out + 2 * h * nkv * hd + nh * hd * h
    if bias:
        params += nh * hd + 2 * nkv * hd + h
    if qk_norm:
        params += 2 * hd
    params += 2 * h  # input and post-attention RMSNorm
    return params, 2 * nkv * hd * 2, nh * hd


def _kv_heads(c: _Config) -> int:
    return c.get("num_key_value_heads", c.req("num_attention_heads"))


def _mixtral(c: _Config) -> dict[str, Any]:
    base = c.common()
    h, n = base["hidden_size"], base["num_layers"]
    attn, kv, width = _gqa_attention(c, h, qk_norm=False)
    window = c.get("sliding_window") or 0
    kind = "sliding" if window and window < base["max_context"] else "full"
    return dict(base, family="mixtral", num_experts=c.req("num_local_experts"),
                experts_per_token=c.req("num_experts_per_tok"), expert_intermediate_size=c.req("intermediate_size"),
                expert_has_bias=False, moe_layers=list(range(n)), shared_ffn_params=[0] * n,
                attention=[kind] * n, attention_params=[attn] * n, kv_bytes_per_token_layer={kind: kv},
                sliding_window=window if kind == "sliding" else 0, attention_width=width, other_params=h,
                kv_heads=_kv_heads(c))


def _qwen_moe_layers(c: _Config, n: int) -> list[int]:
    step = c.get("decoder_sparse_step", 1) or 1
    dense = set(c.get("mlp_only_layers", [], list) or [])
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def _qwen3_moe(c: _Config) -> dict[str, Any]:
    base = c.common()
    h, n = base["hidden_size"], base["num_layers"]
    attn, kv, width = _gqa_attention(c, h, qk_norm=True)
    moe = _qwen_moe_layers(c, n)
    dense = 3 * h * c.get("intermediate_size", 0)
    return dict(base, family="qwen3_moe", num_experts=c.req("num_experts"),
                experts_per_token=c.req("num_experts_per_tok"), expert_intermediate_size=c.req("moe_intermediate_size"),
                expert_has_bias=False, moe_layers=moe,
                shared_ffn_params=[0 if i in moe else dense for i in range(n)],
                attention=["full"] * n, attention_params=[attn] * n, kv_bytes_per_token_layer={"full": kv},
                attention_width=width, other_params=h, kv_heads=_kv_heads(c))


def _qwen3_next(c: _Config) -> dict[str, Any]:
    base = c.common()
    h, n = base["hidden_size"], base["num_layers"]
    full_attn, kv, width = _gqa_attention(c, h, qk_norm=True, q_gate=bool(c.get("attn_output_gate", True, bool)))
    types = c.get("layer_types", None, list)
    if types is None:
        interval = c.req("full_attention_interval")
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    if len(types) != n:
        raise ConfigError(f"{c.source}: field 'layer_types': needs {n} entries, got {len(types)}")
    nk, nv = c.req("linear_num_key_heads"), c.req("linear_num_value_heads")
    dk, dv = c.req("linear_key_head_dim"), c.req("linear_value_head_dim")
    kernel = c.req("linear_conv_kernel_dim")
    key_dim, value_dim = nk * dk, nv * dv
    conv_dim = 2 * key_dim + value_dim
    # Gated DeltaNet: qkvz and ba projections, depthwise conv, dt_bias and A_log, gated norm, out.
    linear_attn = (h * (2 * key_dim + 2 * value_dim) + h * 2 * nv + conv_dim * kernel + 2 * nv + dv
                   + value_dim * h + 2 * h)
    state = (nv * dk * dv + (kernel - 1) * conv_dim) * 2
    moe = _qwen_moe_layers(c, n)
    shared_i = c.get("shared_expert_intermediate_size", 0)
    shared = 3 * h * shared_i + (h if shared_i else 0)  # shared expert and its sigmoid gate
    dense = 3 * h * c.get("intermediate_size", 0)
    kinds = ["full" if t == "full_attention" else "linear" for t in types]
    return dict(base, family="qwen3_next", num_experts=c.req("num_experts"),
                experts_per_token=c.req("num_experts_per_tok"), expert_intermediate_size=c.req("moe_intermediate_size"),
                expert_has_bias=False, moe_layers=moe,
                shared_ffn_params=[shared if i in moe else dense for i in range(n)],
                attention=kinds, attention_params=[full_attn if k == "full" else linear_attn for k in kinds],
                kv_bytes_per_token_layer={"full": kv}, linear_state_bytes_per_layer=state,
                attention_width=width, other_params=h, kv_heads=_kv_heads(c))


def _deepseek(c: _Config, family: str) -> dict[str, Any]:
    base = c.common()
    h, n = base["hidden_size"], base["num_layers"]
    nh = c.req("num_attention_heads")
    q_lora, kv_lora = c.get("q_lora_rank"), c.req("kv_lora_rank")
    nope, rope, v = c.req("qk_nope_head_dim"), c.req("qk_rope_head_dim"), c.req("v_head_dim")
    q = h * nh * (nope + rope) if not q_lora else h * q_lora + q_lora + q_lora * nh * (nope + rope)
    attn = q + h * (kv_lora + rope) + kv_lora + kv_lora * nh * (nope + v) + nh * v * h + 2 * h
    first_dense, freq = c.get("first_k_dense_replace", 0), c.get("moe_layer_freq", 1) or 1
    moe = [i for i in range(n) if i >= first_dense and i % freq == 0]
    experts = c.req("n_routed_experts")
    moe_i = c.req("moe_intermediate_size")
    shared = c.get("n_shared_experts", 0) * 3 * h * moe_i
    if family == "deepseek_v3":  # the router's e_score_correction_bias
        shared += experts
    dense = 3 * h * c.req("intermediate_size")
    return dict(base, family=family, num_experts=experts, experts_per_token=c.req("num_experts_per_tok"),
                expert_intermediate_size=moe_i, expert_has_bias=False, moe_layers=moe,
                shared_ffn_params=[shared if i in moe else dense for i in range(n)],
                attention=["mla"] * n, attention_params=[attn] * n,
                kv_bytes_per_token_layer={"mla": (kv_lora + rope) * 2},
                attention_width=nh * (kv_lora + rope), other_params=h)


def _gpt_oss(c: _Config) -> dict[str, Any]:
    base = c.common()
    h, n = base["hidden_size"], base["num_layers"]
    attn, kv, width = _gqa_attention(c, h, qk_norm=False, bias=True)
    attn += c.req("num_attention_heads")  # attention sinks, one per head
    types = c.get("layer_types", None, list) or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                  for i in range(n)]
    kinds = ["sliding" if t == "sliding_attention" else "full" for t in types]
    per_token = c.get("num_experts_per_tok") or c.req("experts_per_token")
    return dict(base, family="gpt_oss", num_experts=c.req("num_local_experts"), experts_per_token=per_token,
                expert_intermediate_size=c.req("intermediate_size"), expert_has_bias=True,
                moe_layers=list(range(n)), shared_ffn_params=[0] * n, attention=kinds,
                attention_params=[attn] * n, kv_bytes_per_token_layer={"full": kv, "sliding": kv},
                sliding_window=c.req("sliding_window"), attention_width=width, other_params=h,
                kv_heads=_kv_heads(c))


_READERS: dict[str, Callable[[_Config], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "qwen3_next": _qwen3_next,
    "deepseek_v2": lambda c: _deepseek(c, "deepseek_v2"),
    "deepseek_v3": lambda c: _deepseek(c, "deepseek_v3"),
    "gpt_oss": _gpt_oss,
}


def read_config(config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The config dict and a name for it in error messages; a folder means its config.json."""
    if isinstance(config, dict):
        return config, "<config dict>"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def spec_from_hf_config(config: str | Path | dict[str, Any], name: str | None = None):
    """Build a ModelSpec from a HF config. The name defaults to the config's `_name_or_path`
    (its last part), else the model family and size, e.g. "mixtral-46.7b": a folder name is
    often a cache hash or "snapshots", and says nothing about the model."""
    from profiles.model_spec import ModelSpec

    data, source = read_config(config)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in _READERS:
        raise ConfigError(f"{source}: field 'model_type': {model_type!r} is not a supported MoE family "
                          f"(supported: {', '.join(FAMILIES)})")
    fields = _READERS[model_type](_Config(data, source))
    named = name or str(data.get("_name_or_path") or "").rstrip("/").split("/")[-1]
    try:
        spec = ModelSpec(name=named or model_type, **fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not named:
        spec = dataclasses.replace(spec, name=f"{model_type}-{spec.total_params / 1e9:.1f}b")
    return spec

"""`ModelSpec`: the shape of an MoE model, read from its Hugging Face `config.json`.

Everything the planner and simulator need to know about a model is here: bytes per expert,
per MoE layer, outside the experts, KV bytes per token (only full-attention layers grow with
context; sliding-window layers are capped; linear-attention layers keep a fixed per-sequence
state) and the FLOPs a token costs. Families: Mixtral, Qwen3-MoE, Qwen3-Next, DeepSeek-V2/V3,
GPT-OSS. Weights are counted in the serving dtype (bf16 unless the spec says otherwise).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from fluxmoe.errors import ConfigError
from fluxmoe.serde import from_dict, to_dict

AttentionKind = Literal["full", "sliding", "linear", "mla"]


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of one MoE model. Per-layer lists have one entry per decoder layer."""

    name: str
    family: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    tie_word_embeddings: bool
    max_context: int
    # Experts: every MoE layer has num_experts routed experts of the same shape.
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    expert_has_bias: bool
    moe_layers: list[int]
    # Always-on FFN parameters per layer: shared experts on MoE layers, the dense MLP elsewhere.
    shared_ffn_params: list[int]
    # Attention: kind per layer and its parameters (projections, norms, sinks) per layer.
    attention: list[AttentionKind]
    attention_params: list[int]
    # KV bytes one token adds in one layer of each kind ("full", "sliding", "mla").
    kv_bytes_per_token_layer: dict[str, int]
    sliding_window: int = 0
    # Fixed per-sequence state of one linear-attention layer (recurrent + conv state).
    linear_state_bytes_per_layer: int = 0
    # Attention math per token per unit of context, for the cost model: heads * head_dim.
    attention_width: int = 0
    dtype_bytes: int = 2
    other_params: int = 0  # norms, router biases and the like, counted once
    # KV heads of the grouped-query attention layers: tensor parallel splits KV by heads and
    # replicates them where ranks outnumber heads (0: MLA or unknown, see profiles/parallel.py).
    kv_heads: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "vocab_size", "num_experts", "experts_per_token",
                     "expert_intermediate_size", "dtype_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field '{name}': must be > 0, got {getattr(self, name)!r}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"field 'experts_per_token': {self.experts_per_token} exceeds "
                              f"num_experts {self.num_experts}")
        for name in ("attention", "attention_params", "shared_ffn_params"):
            if len(getattr(self, name)) != self.num_layers:
                raise ConfigError(f"field '{name}': needs {self.num_layers} entries (one per layer), "
                                  f"got {len(getattr(self, name))}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad or not self.moe_layers:
            raise ConfigError(f"field 'moe_layers': indices must be in [0, {self.num_layers}), got {self.moe_layers!r}")

    # ----------------------------------------------------------------- parameters
    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate, up and down projections (+ biases)."""
        h, i = self.hidden_size, self.expert_intermediate_size
        return 3 * h * i + ((2 * i + h) if self.expert_has_bias else 0)

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts + (self.num_experts if self.expert_has_bias else 0)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.num_moe_layers

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def layer_dense_params(self, layer: int) -> int:
        """Parameters of a layer that every token reads: attention, router, shared FFN."""
        router = self.router_params if layer in self._moe_set else 0
        return self.attention_params[layer] + self.shared_ffn_params[layer] + router

    def layer_dense_gemms(self, layer: int) -> int:
        """GEMM kernels those parameters run in: the attention block's input and output
        projections, the router, the shared FFN's gate/up and down."""
        return ((2 if self.attention_params[layer] else 0) + (1 if layer in self._moe_set else 0)
                + (2 if self.shared_ffn_params[layer] else 0))

    @property
    def non_expert_params(self) -> int:
        return (self.embedding_params + self.other_params
                + sum(self.layer_dense_params(layer) for layer in range(self.num_layers)))

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.total_experts * self.expert_params

    @property
    def active_params_per_token(self) -> int:
        return self.non_expert_params + self.num_moe_layers * self.experts_per_token * self.expert_params

    # ----------------------------------------------------------------- bytes
    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    @property
    def moe_layer_expert_bytes(self) -> int:
        """Bytes of all routed experts of one MoE layer."""
        return self.num_experts * self.expert_bytes

    @property
    def non_expert_bytes(self) -> int:
        return self.non_expert_params * self.dtype_bytes

    @property
    def total_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token adds, over the layers whose KV grows with context without bound."""
        return sum(self.kv_bytes_per_token_layer.get(kind, 0)
                   for kind in self.attention if kind in ("full", "mla"))

    @cached_property
    def sliding_kv_bytes_per_token(self) -> int:
        return sum(self.kv_bytes_per_token_layer.get("sliding", 0) for kind in self.attention if kind == "sliding")

    @cached_property
    def state_bytes_per_sequence(self) -> int:
        """Fixed state one sequence holds whatever its length (linear-attention layers)."""
        return self.linear_state_bytes_per_layer * self.attention.count("linear")

    @cached_property
    def _attention_kv_bytes_per_token_layer(self) -> int:
        """KV bytes one token adds in one attention layer whose KV grows (0 if none)."""
        return max((self.kv_bytes_per_token_layer.get(kind, 0) for kind in ("full", "mla")), default=0)

    @cached_property
    def kv_block_tokens(self) -> int:
        """Tokens in one KV block as vLLM sizes it: 16, or on hybrid models (linear-attention
        layers beside attention) the fewest multiple of 16 whose page in one attention layer
        holds a linear layer's state, since vLLM gives every layer one page size and pads the
        state to it (vLLM 0.26 `_align_hybrid_block_size`, prefix caching off: Qwen3-Next's 544)."""
        per_layer = self._attention_kv_bytes_per_token_layer
        if not self.linear_state_bytes_per_layer or not per_layer:
            return 16
        return 16 * -(-self.linear_state_bytes_per_layer // (16 * per_layer))

    def kv_bytes_per_sequence(self, context_tokens: int, block_tokens: int | None = None) -> int:
        """Cache one sequence of `context_tokens` holds: KV rounded up to whole blocks (the
        model's `kv_block_tokens` unless given), and each linear layer's state in one page."""
        block_tokens = block_tokens or self.kv_block_tokens
        blocks = -(-context_tokens // block_tokens) * block_tokens
        window = min(blocks, -(-self.sliding_window // block_tokens) * block_tokens) if self.sliding_window else 0
        per_layer = self._attention_kv_bytes_per_token_layer
        page = block_tokens * per_layer if per_layer and self.linear_state_bytes_per_layer else 0
        state = self.attention.count("linear") * max(page, self.linear_state_bytes_per_layer)
        return self.kv_bytes_per_token * blocks + self.sliding_kv_bytes_per_token * window + state

    @cached_property
    def _moe_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_set

    # ----------------------------------------------------------------- identity and I/O
    def content_hash(self) -> str:
        """Short hash of the shapes, so a Plan can refuse to run on another model. `kv_heads`
        is left out: one GPU never reads it, and a tensor-parallel shard's KV bytes carry it."""
        shapes = {k: v for k, v in to_dict(self).items() if k != "kv_heads"}
        return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ModelSpec":
        return from_dict(cls, data, source)

    @classmethod
    def from_hf_config(cls, config: str | Path | dict[str, Any], name: str | None = None) -> "ModelSpec":
        """Build a spec from a Hugging Face `config.json` (a path, a folder holding one, or a dict)."""
        from profiles.hf_config import spec_from_hf_config

        return spec_from_hf_config(config, name)

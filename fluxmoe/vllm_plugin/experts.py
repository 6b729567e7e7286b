"""FluxMoE's replacement for vLLM 0.26's `RoutedExperts`, registered out of tree.

Per MoE layer of the plan:
- all resident: vLLM's own parameters and kernel call, untouched;
- paged: the parameters start on the meta device (nothing is allocated on the GPU), a
  checkpoint's experts are written straight into their tiers (resident rows of the arena,
  pinned host rows, bf16 host rows that are encoded on the GPU after loading), and the layer
  runs as ONE call of vLLM's own fused-MoE kernel over its arena span, with expert ids remapped
  to rows and the kernel config plain vLLM would pick for the layer's real expert count, so
  tokens are bit-for-bit plain vLLM's.
Under expert parallel a rank pages its own experts (the plan is one rank's shard) and keeps plain
vLLM's kernel call, its expert map sending each local expert to its arena row (`RankExperts`).
With dummy weights, a paged layer's stacks are generated on the GPU one layer at a time with
vLLM's own generator (so the values equal plain vLLM's) and split into tiers at once.

vLLM's CUDA-graph wrappers call the process offloader's `join_after_forward` before a capture
ends and `sync_prev_onload` before capture and replay; `_JoiningOffloader` wraps vLLM's
offloader so that the pager's side streams are joined there too.
"""

from __future__ import annotations

import logging
import re

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.offloader.base import BaseOffloader, get_offloader, set_offloader

from executor.tiers import ExpertLayout
from fluxmoe.errors import ConfigError
from fluxmoe.vllm_plugin import LOG_NAME
from fluxmoe.vllm_plugin.rank_experts import RankExperts
from fluxmoe.vllm_plugin.runtime import PagingRuntime, check_plan_for_model, current_runtime, set_current_runtime
from fluxmoe.vllm_plugin.stats import interval_from_env

log = logging.getLogger(LOG_NAME)

_plan_path: str | None = None


def _model_layer(layer_name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", layer_name)
    if match is None:
        raise ConfigError(f"cannot tell the model layer of MoE layer {layer_name!r}")
    return int(match.group(1))


def _is_dummy_load() -> bool:
    from vllm.config import get_current_vllm_config

    return str(get_current_vllm_config().load_config.load_format) == "dummy"


def _runtime_for(moe_config, params_dtype, quant_config) -> PagingRuntime:
    """The process's runtime, made when the first MoE layer is built (before any weight loads)."""
    if current_runtime() is not None:
        return current_runtime()
    from vllm.config import get_current_vllm_config

    from planner.plan import Plan

    if quant_config is not None:
        raise ConfigError(f"FluxMoE pages bf16 experts; this model is quantized ({quant_config.get_name()})")
    if params_dtype != torch.bfloat16:
        raise ConfigError(f"FluxMoE pages bf16 experts; vLLM loads them as {params_dtype} (pass --dtype bfloat16)")
    config = get_current_vllm_config()
    plan = Plan.load(_plan_path)
    parallel = config.parallel_config
    check_plan_for_model(plan, config.model_config.hf_config.to_dict(), parallel.tensor_parallel_size,
                         parallel.enable_expert_parallel)
    if parallel.enable_eplb:
        raise ConfigError("FluxMoE pages a fixed split of experts over the ranks; vLLM's expert load balancer "
                          "(--enable-eplb) moves experts between ranks: run without it")
    layout = ExpertLayout(moe_config.hidden_dim, moe_config.intermediate_size_per_partition)
    runtime = PagingRuntime(plan, layout, torch.device("cuda", torch.cuda.current_device()),
                            stats_interval_s=interval_from_env())
    set_current_runtime(runtime)
    set_offloader(_JoiningOffloader(get_offloader(), runtime))
    paged = len(runtime.paged_layers)
    log.info("FluxMoE: plan %s, budget %.2f GiB, %d of %d MoE layers paged, depth %d, %d staging slots per buffer",
             _plan_path, plan.budget_bytes / 2**30, paged, len(runtime.moe_layers), plan.prefetch_depth,
             runtime.slots)
    return runtime


def _piecewise_capture() -> bool:
    """True while vLLM runs a piecewise CUDA-graph forward (captures end at each attention)."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.PIECEWISE


class _JoiningOffloader(BaseOffloader):
    """vLLM's offloader, plus the pager's side streams joined where graph captures need it."""

    def __init__(self, inner: BaseOffloader, runtime: PagingRuntime):
        self.inner, self.runtime = inner, runtime

    def wrap_modules(self, modules_generator):
        return self.inner.wrap_modules(modules_generator)

    def post_init(self):
        self.inner.post_init()

    def sync_prev_onload(self) -> None:
        """Before every CUDA-graph capture and replay: also a host hook between steps for stats."""
        self.inner.sync_prev_onload()
        if self.runtime.reporter is not None:
            self.runtime.reporter.poll()
        pager = self.runtime._pager
        if pager is not None and pager.streams.cuda:
            compute = torch.cuda.current_stream()
            compute.wait_stream(pager.streams.copy)
            compute.wait_stream(pager.streams.decode)

    def join_after_forward(self) -> None:
        self.inner.join_after_forward()
        if self.runtime._pager is not None:
            self.runtime._pager.join()

    def _wait_for_layer(self, layer_idx: int) -> None:
        self.inner._wait_for_layer(layer_idx)

    def _start_prefetch(self, layer_idx: int) -> None:
        self.inner._start_prefetch(layer_idx)


def _check_expert_parallel_kernel(moe_kernel, layer_name: str) -> None:
    """Under expert parallel the paged call hands vLLM a map from global ids to arena rows, which
    may outnumber the model's experts. vLLM's Triton experts apply the map after aligning blocks
    (fine); kernels that count in local id space inside the alignment op would overrun."""
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    experts = getattr(getattr(moe_kernel, "impl", None), "fused_experts", None)
    if type(experts) is not TritonExperts:
        raise ConfigError(f"{layer_name}: FluxMoE pages under expert parallel only with vLLM's Triton experts; "
                          f"vLLM chose {type(experts).__name__} (pass --moe-backend triton)")


class PagedRoutedExperts(RoutedExperts):
    """`RoutedExperts` whose experts live in a FluxMoE plan's tiers."""

    def __init__(self, layer_name, params_dtype, moe_config, quant_config, expert_map_manager, *args, **kwargs):
        runtime = _runtime_for(moe_config, params_dtype, quant_config)
        model_layer = _model_layer(layer_name)
        paged = runtime.is_paged(model_layer)
        if paged:
            with torch.device("meta"):  # no GPU bytes for experts that will not be resident
                super().__init__(layer_name, params_dtype, moe_config, quant_config, expert_map_manager,
                                 *args, **kwargs)
        else:
            super().__init__(layer_name, params_dtype, moe_config, quant_config, expert_map_manager, *args, **kwargs)
        self.fluxmoe_runtime, self.fluxmoe_layer = runtime, model_layer
        runtime.bind(model_layer, self._fluxmoe_rebind)
        self.fluxmoe_position = runtime.position(model_layer)
        self.fluxmoe_rank = None  # expert parallel: this rank's experts, and its ids' way to the arena
        if self.use_ep:
            self.fluxmoe_rank = RankExperts.from_expert_map(self.expert_map_manager.expert_map, runtime.device)
            self.fluxmoe_rank.check_count(len(runtime.tiers[self.fluxmoe_position]), layer_name)
        self.fluxmoe_paged, self.fluxmoe_dummy = paged, _is_dummy_load()
        self.fluxmoe_landing = runtime.landing(model_layer) if paged and not self.fluxmoe_dummy else None
        self.fluxmoe_shapes = ((self.local_num_experts, *runtime.layout.w13_shape),  # plain vLLM's stacks
                               (self.local_num_experts, *runtime.layout.w2_shape))
        inner = self.quant_method.process_weights_after_loading

        def process_weights_after_loading(layer) -> None:
            self._fluxmoe_place()
            inner(layer)
            if self.fluxmoe_rank is not None and self.fluxmoe_paged:
                _check_expert_parallel_kernel(self.quant_method.moe_kernel, layer_name)
            if not self.fluxmoe_paged:  # after vLLM's own processing: its final parameters
                runtime.keep_resident(model_layer, self.w13_weight.data, self.w2_weight.data)

        self.quant_method.process_weights_after_loading = process_weights_after_loading

    # ------------------------------------------------------------------ loading
    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        landing = getattr(self, "fluxmoe_landing", None)
        if landing is None:
            return super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success)
        if loaded_weight.dim() == 3:
            raise ConfigError(f"{self.layer_name}: checkpoints with all experts in one tensor cannot be paged yet")
        local = self._map_global_expert_id_to_local_expert_id(expert_id)
        if local == -1:  # another rank's expert (expert parallel)
            return False if return_success else None
        (w13, w2), row = landing.target(local)
        target = w2 if shard_id == "w2" else w13
        # vLLM's loader maps the id it is given from global to local: give it the global id of local `row`.
        as_global = row if self.fluxmoe_rank is None else self.fluxmoe_rank.global_of[row]
        return super().weight_loader(target, loaded_weight, weight_name, shard_id, as_global, return_success)

    def _fluxmoe_place(self) -> None:
        if not self.fluxmoe_paged:
            return
        runtime, layer = self.fluxmoe_runtime, self.fluxmoe_layer
        if self.fluxmoe_dummy:
            from vllm.config import get_current_vllm_config
            from vllm.model_executor.model_loader import weight_utils

            holder = torch.nn.Module()  # the two stacks as plain vLLM holds them, filled by its own function
            for name, shape in zip(("w13_weight", "w2_weight"), self.fluxmoe_shapes):
                holder.register_parameter(name, torch.nn.Parameter(
                    torch.empty(shape, dtype=torch.bfloat16, device=runtime.device), requires_grad=False))
            weight_utils.initialize_dummy_weights(holder, get_current_vllm_config().model_config)
            runtime.place(layer, holder.w13_weight.data, holder.w2_weight.data)
            del holder
        else:
            runtime.place_landed(layer, self.fluxmoe_landing)
            self.fluxmoe_landing = None
        tiers = runtime.layers[self.fluxmoe_position]
        fused = runtime.arena.fused(self.fluxmoe_position, tiers.staged_ids)
        # vLLM's kernel set-up sees the span the layer's one kernel call reads.
        self.w13_weight = torch.nn.Parameter(fused.w13, requires_grad=False)
        self.w2_weight = torch.nn.Parameter(fused.w2, requires_grad=False)

    def _fluxmoe_rebind(self, w13: torch.Tensor | None, w2: torch.Tensor | None, paged: bool) -> None:
        """After a rebuild (a budget change): the stacks this layer's kernel call reads."""
        if w13 is None:  # the old stacks go: nothing may keep them alive while new ones are made
            w13, w2 = (torch.empty((0, *shape[1:]), dtype=torch.bfloat16, device=self.fluxmoe_runtime.device)
                       for shape in self.fluxmoe_shapes)
        self.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        self.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
        self.fluxmoe_paged = paged

    # ------------------------------------------------------------------ running
    def _fluxmoe_config(self, x: torch.Tensor) -> dict:
        """The kernel config plain vLLM picks for this layer (by its real expert count)."""
        from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

        quant = self.quant_method.moe_quant_config
        return try_get_optimal_moe_config(*self.fluxmoe_shapes, self.top_k, quant.config_name(x.dtype), x.shape[0],
                                          block_shape=quant.block_shape)

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        runtime, rank = self.fluxmoe_runtime, self.fluxmoe_rank
        local_ids = topk_ids if rank is None else rank.local_ids(topk_ids)
        if not runtime.any_paged:  # vLLM's own call, untouched; the picks are still counted, so a
            # budget change from here sends the coldest experts to the host
            runtime.pager.count_routes(self.fluxmoe_position, local_ids)
            return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        from vllm.model_executor.layers.fused_moe import override_config

        pager, position = runtime.pager, self.fluxmoe_position
        if position == 0 and runtime.reporter is not None:
            runtime.reporter.poll()  # eager steps (no graph replay hook); cheap unless a line is due
        pager.prefetch_on_release = not _piecewise_capture()
        weights = pager.before_layer(position)
        pager.count_routes(position, local_ids)  # per-expert picks, on the GPU (the closed loop reads them)
        pager.fetch_routed(position, local_ids)  # a no-op unless the plan fetches routed host experts only
        if weights.fused is None:
            out = super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        else:
            if rank is None:  # ids remapped to the span's rows
                ids, experts, expert_map = weights.fused.row_of[topk_ids], weights.fused.rows, None
            else:  # plain expert parallel's call, its map sending local experts to their rows
                ids, experts, expert_map = topk_ids, rank.num_global, rank.kernel_map(weights.fused.row_of)
            with override_config(self._fluxmoe_config(x)):
                out = self.quant_method.moe_kernel.apply(
                    hidden_states=x, w1=weights.fused.w13, w2=weights.fused.w2, topk_weights=topk_weights,
                    topk_ids=ids, activation=self.activation,
                    apply_router_weight_on_input=self.apply_router_weight_on_input,
                    global_num_experts=experts, expert_map=expert_map, shared_experts=shared_experts,
                    shared_experts_input=shared_experts_input)
        pager.after_layer(position)
        if position == len(runtime.moe_layers) - 1:
            pager.end_step()
        return out


PagedRoutedExperts.weight_loader.supports_moe_loading = True  # type: ignore[attr-defined]

_installed = False


def install(plan_path: str) -> None:
    """Replace vLLM's RoutedExperts in this process (once; plugins load many times)."""
    global _installed, _plan_path
    _plan_path = plan_path
    if not _installed:
        RoutedExperts.register_oot(PagedRoutedExperts)
        _installed = True

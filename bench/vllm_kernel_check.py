#!/usr/bin/env python3
"""Is one fused-MoE call over an arena span with remapped expert ids bit-exact with vLLM's own
call over the layer's stack? vLLM 0.26.0's Triton `fused_experts`, on the GPU machine.

For token counts from 1 to 2048 and spans of E..3E rows: the same experts sit at other rows of a
larger tensor, the ids are remapped, and the kernel config is pinned to the one the real
expert count gives (`override_config`). Under expert parallel (2 ranks, vLLM's linear and
round-robin placements), plain vLLM's call over the rank's own stack with vLLM's map against the
plugin's call over a span with `RankExperts.kernel_map`. Those rows assign blocks as vLLM's
`TritonExperts` does (the experts the plugin calls: the map applied after alignment), where the
functional `fused_experts` hands the map to the alignment op instead. Prints a table of max
|difference| (0 = bit-exact).
"""
import itertools
import sys

import torch
import vllm.model_executor.layers.fused_moe.fused_moe as fused_moe_module
from vllm.model_executor.layers.fused_moe import override_config
from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts, try_get_optimal_moe_config

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.device_info import write_result  # noqa: E402
from fluxmoe.vllm_plugin.rank_experts import RankExperts  # noqa: E402

_functional_assignment = fused_moe_module._prepare_expert_assignment


def _triton_experts_assignment(*args, **kwargs):
    """As TritonExperts.apply calls it (experts/triton_moe.py): the map applied after alignment."""
    return _functional_assignment(*args, **dict(kwargs, ignore_invalid_experts=False))


torch.manual_seed(0)
dev = "cuda"
rows = []
for (E, H, I, k), M, extra in itertools.product([(8, 1024, 2048, 2), (64, 1024, 256, 10)], [1, 3, 16, 64, 512, 2048],
                                                 [0, 1, 2]):
    w1 = (torch.randn(E, 2 * I, H, device=dev) * 0.05).bfloat16()
    w2 = (torch.randn(E, H, I, device=dev) * 0.05).bfloat16()
    x = torch.randn(M, H, device=dev).bfloat16()
    logits = torch.randn(M, E, device=dev)
    weights, ids = torch.softmax(logits, -1).topk(k, -1)
    weights, ids = (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)
    plain = fused_experts(x, w1, w2, weights, ids)
    rows_total = E * (1 + extra)
    perm = torch.randperm(rows_total, device=dev)[:E]  # where each expert sits in the span
    span1 = torch.zeros(rows_total, 2 * I, H, device=dev, dtype=torch.bfloat16)
    span2 = torch.zeros(rows_total, H, I, device=dev, dtype=torch.bfloat16)
    span1[perm], span2[perm] = w1, w2
    remapped = perm.to(torch.int32)[ids]
    config = try_get_optimal_moe_config(w1.size(), w2.size(), k, None, M)
    with override_config(config):
        ours = fused_experts(x, span1, span2, weights, remapped, global_num_experts=rows_total)
    unpinned = fused_experts(x, span1, span2, weights, remapped, global_num_experts=rows_total)
    naive_plain, naive_ours = M * k * 4 <= E, M * k * 4 <= rows_total
    rows.append(dict(E=E, k=k, M=M, span=rows_total, naive_plain=naive_plain, naive_ours=naive_ours,
                     max_diff=float((plain.float() - ours.float()).abs().max()),
                     max_diff_unpinned=float((plain.float() - unpinned.float()).abs().max())))
    for placement, rank in itertools.product(["linear", "round_robin"], [0, 1]):
        local, vmap, _ = determine_expert_map(2, rank, E, placement)
        vmap = vmap.to(dev)
        shard = RankExperts.from_expert_map(vmap)
        mine = list(shard.global_of)
        local_config = try_get_optimal_moe_config(w1[mine].size(), w2[mine].size(), k, None, M)
        fused_moe_module._prepare_expert_assignment = _triton_experts_assignment
        with override_config(local_config):  # what plain vLLM picks for the rank's stack
            plain_ep = fused_experts(x, w1[mine], w2[mine], weights, ids, global_num_experts=E, expert_map=vmap)
            row_of = torch.randperm(rows_total, device=dev)[:local].to(torch.int32)
            span1 = torch.zeros(rows_total, 2 * I, H, device=dev, dtype=torch.bfloat16)
            span2 = torch.zeros(rows_total, H, I, device=dev, dtype=torch.bfloat16)
            span1[row_of.long()], span2[row_of.long()] = w1[mine], w2[mine]
            ours_ep = fused_experts(x, span1, span2, weights, ids, global_num_experts=E,
                                    expert_map=shard.kernel_map(row_of))
        fused_moe_module._prepare_expert_assignment = _functional_assignment
        rows.append(dict(E=E, k=k, M=M, span=rows_total, ep=f"{placement}/{rank}", naive_plain=False,
                         naive_ours=False, max_diff=float((plain_ep.float() - ours_ep.float()).abs().max()),
                         max_diff_unpinned=None, ep_share_nonzero=bool(plain_ep.abs().sum() > 0)))
print(write_result("vllm_kernel_check", {"what": "one fused_experts call over an arena span against vLLM's own "
                                                 "call, without and with expert parallel (2 ranks)", "rows": rows}))
print(f"{'E':>3} {'k':>3} {'M':>5} {'span':>5} {'ep':>13} {'naive':>11} {'diff':>10} {'unpinned':>10}")
for r in rows:
    unpinned = "-" if r["max_diff_unpinned"] is None else f"{r['max_diff_unpinned']:.3g}"
    print(f"{r['E']:>3} {r['k']:>3} {r['M']:>5} {r['span']:>5} {r.get('ep', '-'):>13} "
          f"{str(r['naive_plain'])[0]}/{str(r['naive_ours'])[0]:>9} {r['max_diff']:>10.3g} {unpinned:>10}")
print(f"worst |difference|: {max(r['max_diff'] for r in rows):.3g} over {len(rows)} calls "
      f"({sum('ep' in r for r in rows)} under expert parallel)")

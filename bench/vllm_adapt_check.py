#!/usr/bin/env python3
"""Swaps inside vLLM between steps: greedy tokens and logprobs unchanged (GPU machine, vLLM 0.26.0).

One in-process engine (dummy weights, CUDA graphs unless --eager) serves a plan that pages
experts routed-only. It generates; the workers' route counts are read as the server's loop
reads them (`collective_rpc("fluxmoe_stats")`); the Replanner re-assigns residency from them
and the swaps go to the workers (`collective_rpc("fluxmoe_swap")`, run between steps), plus
one forced swap per layer so that every layer changes; then the same prompts again. Prints
`RESULT {json}`: tokens equal, logprobs equal, swaps made, picks counted against tokens run.

    python3 bench/vllm_adapt_check.py --model models/mixtral-tiny [--plan P] [--eager]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.vllm_run import in_process_engine_env  # noqa: E402

in_process_engine_env()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", default="", help="a plan file (default: mixtral-tiny paged per expert, routed-only)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--gpu", default="h200")
    a = ap.parse_args()
    from vllm.model_executor.model_loader import weight_utils

    weight_utils.initialize_dummy_weights.__defaults__ = (-0.1, 0.1, 1234)  # finite, varied logits
    import torch

    import profiles
    from fluxmoe import vllm_plugin
    from fluxmoe.vllm_plugin.worker import EXTENSION
    from planner.moves import Swap, apply_swaps
    from planner.plan import Plan
    from planner.replan import ReplanPolicy, Replanner
    from profiles.feedback import RuntimeFeedback

    if not a.plan:
        from bench.vllm_identity import variants

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        a.plan = "/tmp/fluxmoe-adapt-check-plan.json"
        variants(Plan.load(os.path.join(root, "bench", "plans", "mixtral-tiny.json")))["per_expert_routed_d2"].save(a.plan)
    os.environ[vllm_plugin.PLAN_ENV] = os.path.abspath(a.plan)
    vllm_plugin.register()
    plan = Plan.load(a.plan)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = json.load(open(os.path.join(a.model, "config.json")))["vocab_size"]
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(48)]) for _ in range(8)]
    total = torch.cuda.get_device_properties(0).total_memory
    kw = dict(model=a.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=round(plan.budget_bytes / total, 4), enforce_eager=a.eager, max_model_len=512,
              max_num_seqs=8, worker_extension_cls=EXTENSION)
    if not a.eager:
        kw["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8]}
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)

    def run():
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return ([list(o.outputs[0].token_ids) for o in outs],
                [[float(s[t].logprob) for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs])

    tokens_a, logprobs_a = run()
    llm.collective_rpc("fluxmoe_stats")  # starts a copy of the counts; a read returns the previous copy
    torch.cuda.synchronize()
    stats = llm.collective_rpc("fluxmoe_stats")[0]
    profile = profiles.Profile(profiles.load_model(a.model), profiles.load_gpu(a.gpu))
    k = profile.model.experts_per_token
    picks_ok = stats["routed_tokens"] > 0 and all(sum(row) == stats["routed_tokens"] * k
                                                  for row in stats["route_counts"])
    loop = Replanner(profile, plan, ReplanPolicy(min_tokens=1, patience=1))
    decision = loop.consider(RuntimeFeedback.from_stats(stats))
    swaps = list(decision.swaps)
    after = apply_swaps(plan, swaps)
    for lp in sorted(after.layers, key=lambda lp: lp.layer):  # one more swap in every paged layer
        if lp.host and lp.resident:
            swaps.append(Swap(lp.layer, lp.host[0], lp.resident[0]))
    made = llm.collective_rpc("fluxmoe_swap", args=([[s.layer, s.into_gpu, s.out_of_gpu] for s in swaps],))[0]
    tokens_b, logprobs_b = run()
    res = dict(model=a.model, plan=a.plan, eager=a.eager, gpu=torch.cuda.get_device_name(0),
               swaps_proposed=len(decision.swaps), proposed_gain=round(decision.gain, 4), swaps_made=made,
               picks_equal_tokens_times_k=picks_ok, routed_tokens=stats["routed_tokens"],
               tokens_equal=tokens_a == tokens_b, logprobs_equal=logprobs_a == logprobs_b,
               output_tokens=sum(len(t) for t in tokens_a))
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A budget that shrinks and grows back inside a running vLLM (GPU machine, vLLM 0.26.0, eager).

One in-process engine (dummy weights +-0.1, --enforce-eager) serves a plan at `--budget`. The
same greedy requests run twice through `LLMEngine.step()`:
1. with the plan fixed (the reference);
2. streaming, with the budget shrunk by `--shrink` after `--at` steps and grown back as many
   steps later: each change is a plan made for this engine (`Replanner.rebudget(live=True)`:
   its KV cache and sequence limit stay) and applied between steps by
   `collective_rpc("fluxmoe_rebuild")`, as `POST /v1/fluxmoe/budget` applies it.
Greedy tokens and logprobs must equal the reference's, request for request, and every request
must finish. Recorded: the free GPU memory the driver reports before and after each change,
the experts' GPU bytes, each change's pause, and decode throughput per phase against the same
steps of the reference run (median step times). `--fresh start|small` runs the same requests
on a fresh engine started with that plan instead, for "throughput at each budget against a fresh
start there". Prints a table and `RESULT {json}`; writes `--out` if given.

    python3 bench/vllm_budget_check.py --model models/mixtral-8x7b-8layers --budget 30GiB --shrink 8GiB
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.vllm_run import in_process_engine_env  # noqa: E402

in_process_engine_env()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--budget", default="30GiB")
    ap.add_argument("--shrink", default="8GiB")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--at", type=int, default=30, help="engine steps before the shrink, and between shrink and grow")
    ap.add_argument("--out", default="")
    ap.add_argument("--fresh", choices=["start", "small"], default=None,
                    help="instead: a fresh engine started with that plan (at its budget), the same requests, "
                         "for the per-phase comparison")
    ap.add_argument("--allocator", choices=["default", "expandable"], default="default",
                    help="expandable: torch's expandable segments, which give freed pages back to the driver "
                         "even where a segment still holds other tensors")
    a = ap.parse_args()
    if a.allocator == "expandable":  # before CUDA starts
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    from vllm.model_executor.model_loader import weight_utils

    weight_utils.initialize_dummy_weights.__defaults__ = (-0.1, 0.1, 1234)  # finite, varied logits
    import torch

    import profiles
    from fluxmoe import vllm_plugin
    from fluxmoe.units import GiB, format_bytes, parse_bytes
    from fluxmoe.vllm_plugin.worker import EXTENSION
    from planner.replan import Replanner
    from planner.search import optimize

    profile = profiles.Profile(profiles.load_model(a.model), profiles.load_gpu(a.gpu))
    budget, shrink = parse_bytes(a.budget, "budget"), parse_bytes(a.shrink, "shrink")
    plan = optimize(profile, budget, max_num_seqs=a.requests)
    replanner = Replanner(profile, plan)
    small = replanner.rebudget(budget - shrink, live=True)
    back = replanner.rebudget(budget, live=True)
    paths = {}
    for name, p in (("start", plan), ("small", small), ("back", back)):
        paths[name] = f"/tmp/fluxmoe-budget-{name}.json"
        p.save(paths[name])
    os.environ[vllm_plugin.PLAN_ENV] = paths[a.fresh or "start"]
    served = {"start": plan, "small": small}[a.fresh or "start"]
    vllm_plugin.register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = profile.model.vocab_size
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(a.input_len)])
               for _ in range(a.requests)]
    total = torch.cuda.get_device_properties(0).total_memory
    started = time.perf_counter()
    llm = LLM(model=a.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=round(served.budget_bytes / total, 4), enforce_eager=True, max_model_len=512,
              max_num_seqs=a.requests, worker_extension_cls=EXTENSION,
              enable_prefix_caching=False)  # the second pass must compute its prompts as the first did
    startup_s = time.perf_counter() - started
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True, logprobs=1)

    def free() -> int:
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]

    def run(tag: str, changes: dict[int, str]):
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, sp)
        done, step, times, events = {}, 0, [], []
        while engine.has_unfinished_requests():
            if step in changes:
                before = free()
                t = time.perf_counter()
                answer = llm.collective_rpc("fluxmoe_rebuild", args=(paths[changes[step]],))[0]
                events.append(dict(step=step, plan=changes[step], pause_s=round(time.perf_counter() - t, 2),
                                   read_s=answer.get("read"), build_s=answer.get("build"),
                                   read_on_gpu=answer.get("read_on_gpu"),
                                   torch_reserved=answer.get("torch_reserved_bytes"),
                                   torch_allocated=answer.get("torch_allocated_bytes"),
                                   driver_free_before=before, driver_free_after=free(),
                                   expert_bytes_before=answer["expert_bytes_before"],
                                   expert_bytes_after=answer["expert_bytes_after"]))
            t = time.perf_counter()
            outs = engine.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            for o in outs:
                if o.finished:
                    done[o.request_id] = (list(o.outputs[0].token_ids),
                                          [float(s[t].logprob) for t, s in zip(o.outputs[0].token_ids,
                                                                               o.outputs[0].logprobs)])
            step += 1
        ordered = [done.get(f"{tag}-{i}") for i in range(len(prompts))]
        return ordered, times, events

    run("warm-up", {})  # kernels compiled and tuned before anything is timed
    reference, ref_times, _ = run("fixed", {})
    if a.fresh:
        res = dict(device=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d"),
                   commit=os.environ.get("FLUXMOE_COMMIT", ""), model=a.model, fresh=a.fresh,
                   budget_bytes=served.budget_bytes, startup_s=round(startup_s, 1),
                   vllm_kv_blocks=engine.vllm_config.cache_config.num_gpu_blocks,
                   step_s=[round(t, 6) for t in ref_times], tokens=[r and r[0] for r in reference])
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
        print("RESULT " + json.dumps({k: v for k, v in res.items() if k not in ("step_s", "tokens")}), flush=True)
        return
    changed, times, events = run("changing", {a.at: "small", 2 * a.at: "back"})
    phases = [(1, a.at), (a.at + 1, 2 * a.at), (2 * a.at + 1, min(len(times), len(ref_times)) - 1)]

    def rate(ts, lo, hi):  # decode steps (the prefill step and the first after a change left out): the median
        return round(a.requests / statistics.median(ts[lo:hi]), 1) if hi > lo else None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    res = dict(device=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d"),
               commit=os.environ.get("FLUXMOE_COMMIT", commit), model=a.model, budget=a.budget, shrink=a.shrink,
               allocator=a.allocator,
               requests=a.requests, input_len=a.input_len, output_len=a.output_len, startup_s=round(startup_s, 1),
               vllm_kv_blocks=engine.vllm_config.cache_config.num_gpu_blocks,
               plans={name: dict(budget_bytes=p.budget_bytes, kv_cache_bytes=p.kv_cache_bytes,
                                 resident=sum(len(lp.resident) for lp in p.layers),
                                 compressed=sum(len(lp.compressed) for lp in p.layers),
                                 host=sum(len(lp.host) + len(lp.host_compressed) for lp in p.layers),
                                 predicted_output_tokens_per_s=round(p.predicted.output_tokens_per_s, 1))
                      for name, p in (("start", plan), ("small", small), ("back", back))},
               changes=events, every_request_finished=all(r is not None for r in changed),
               tokens_equal=[r and r[0] for r in changed] == [r and r[0] for r in reference],
               logprobs_equal=[r and r[1] for r in changed] == [r and r[1] for r in reference],
               steps=len(times), reference_steps=len(ref_times),
               phases=[dict(steps=f"{lo}-{hi}", tokens_per_s=rate(times, lo, hi),
                            reference_tokens_per_s=rate(ref_times, lo, hi)) for lo, hi in phases],
               step_s=[round(t, 6) for t in times], reference_step_s=[round(t, 6) for t in ref_times],
               tokens=[r and r[0] for r in changed])
    print(f"\n{'change':<8} {'step':>5} {'pause s':>8} {'read s':>7} {'build s':>8} {'experts before':>15} {'after':>10} "
          f"{'driver free before':>19} {'after':>10}")
    for e in events:
        print(f"{e['plan']:<8} {e['step']:>5} {e['pause_s']:>8} {e['read_s']!s:>7} {e['build_s']!s:>8} "
              f"{format_bytes(e['expert_bytes_before']):>15} "
              f"{format_bytes(e['expert_bytes_after']):>10} {e['driver_free_before'] / GiB:>17.2f} G "
              f"{e['driver_free_after'] / GiB:>8.2f} G")
    print(f"\n{'phase':<10} {'tok/s':>8} {'reference':>10}")
    for ph in res["phases"]:
        print(f"{ph['steps']:<10} {ph['tokens_per_s']!s:>8} {ph['reference_tokens_per_s']!s:>10}")
    print(f"\nevery request finished: {res['every_request_finished']}; tokens equal: {res['tokens_equal']}; "
          f"logprobs equal: {res['logprobs_equal']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    print("RESULT " + json.dumps({k: v for k, v in res.items() if not k.endswith("step_s") and k != "tokens"}),
          flush=True)


if __name__ == "__main__":
    main()

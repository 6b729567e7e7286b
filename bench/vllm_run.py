#!/usr/bin/env python3
"""One vLLM engine run, plain or with a FluxMoE plan, in this process (GPU machine, vLLM 0.26.0).

Dummy weights, token-id prompts (no tokenizer), fixed lengths. Prints one line
`RESULT {json}`: start-up time, KV cache (vLLM's own block count), throughput, and with
--greedy the greedy tokens and their logprobs (to compare runs bit for bit). --corrupt is the
negative control: after start-up it overwrites one resident expert of the first paged layer,
so a comparison that cannot see expert weights would be caught passing anyway.

    python3 bench/vllm_run.py --model models/mixtral-tiny --greedy [--plan P] [--eager]

`--tensor-parallel-size N` (and `--expert-parallel`) runs N GPUs: the engine stays in this
process, its workers are processes of their own, so what a worker's paging runtime holds is
read through `llm.apply_model` (one answer per rank) and the plan is one rank's shard.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_process_engine_env() -> None:
    """vLLM in this process (its runtime inspectable), no flashinfer sampler, no usage stats."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


in_process_engine_env()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", default="", help="a FluxMoE plan file; none: plain vLLM")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    ap.add_argument("--util", type=float, default=0.0, help="gpu_memory_utilization; 0: the plan's budget, else 0.3")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=0)
    ap.add_argument("--capture-sizes", default="", help="comma-separated CUDA-graph batch sizes")
    ap.add_argument("--greedy", action="store_true", help="temperature 0, return tokens and logprobs")
    ap.add_argument("--corrupt", action="store_true", help="negative control (see the module doc)")
    ap.add_argument("--dummy-scale", type=float, default=0.0,
                    help="dummy weights uniform in +-this instead of vLLM's +-1e-3 (plain and plugin alike); at "
                         "+-1e-3 an MoE layer's output is below one bf16 ulp of the residual and no comparison "
                         "of tokens could see the experts")
    ap.add_argument("--gdn-prefill-backend", default="",
                    help="Qwen3-Next's linear attention prefill (the GPU machine has no flashinfer: 'triton')")
    ap.add_argument("--cpu-offload-gb", type=float, default=0.0, help="vLLM's UVA offloader (vLLM-O)")
    ap.add_argument("--offload-prefetch", default="",
                    help="vLLM's prefetch offloader: GROUP/NUM_IN_GROUP/PREFETCH_STEP, e.g. 4/3/1")
    ap.add_argument("--offload-params", default="w13_weight,w2_weight",
                    help="parameter names either offloader offloads (default: the experts)")
    ap.add_argument("--fast-dummy", action="store_true",
                    help="fill dummy weights of host-held (offloaded) params on the GPU with the same generator, "
                         "then copy: the same values, minutes less start-up (vLLM fills them on one CPU thread)")
    ap.add_argument("--trace", default="", help="take prompt/output lengths from this Azure trace CSV (first "
                                                "--num-prompts rows, capped to fit --max-model-len)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--expert-parallel", action="store_true", help="vLLM's --enable-expert-parallel")
    ap.add_argument("--label", default="")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the workload this many times and time the last: the first pays one-time costs "
                         "(Triton compiling kernels for batch shapes the start-up did not see)")
    ap.add_argument("--step-log", action="store_true",
                    help="record each engine step of the timed run: when the scheduler made it, its tokens, "
                         "sequences and the context they had (bench/step_times.py reads it)")
    ap.add_argument("--lockstep-sampling", action="store_true",
                    help="seed every request's sampling with 0, as runs up to 2026-11-25 did: under dummy weights "
                         "the sequences of a prefill chunk then sample the same tokens and route together")
    ap.add_argument("--routing", action="store_true",
                    help="FluxMoE runs: each expert's picks in the timed run, and in a prefill-only pass of other "
                         "prompts of the same lengths after it (decode's picks are the difference)")
    ap.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                    help="profile the timed run's GPU kernels (torch.profiler) and report the N with the most "
                         "time, with their calls and total milliseconds")
    a = ap.parse_args()
    if a.fast_dummy:
        _fast_dummy()
    if a.dummy_scale:
        from vllm.model_executor.model_loader import weight_utils

        # The one function that fills dummy weights, for vLLM's loader and the plugin alike.
        weight_utils.initialize_dummy_weights.__defaults__ = (-a.dummy_scale, a.dummy_scale, 1234)

    import torch

    plan = None
    if a.plan:
        from fluxmoe import vllm_plugin
        from planner.plan import Plan

        os.environ[vllm_plugin.PLAN_ENV] = os.path.abspath(a.plan)
        vllm_plugin.register()  # what the entry point does in each vLLM process
        plan = Plan.load(a.plan)
    total = torch.cuda.get_device_properties(0).total_memory
    util = a.util or (plan.budget_bytes / total if plan else 0.3)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = json.load(open(os.path.join(a.model, "config.json")))["vocab_size"]
    lengths = _lengths(a)

    def token_prompts(seed: int) -> list:
        """One prompt of random token ids per request, of its length."""
        rng = random.Random(seed)
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(n_in)])
                for n_in, _ in lengths]

    prompts = token_prompts(0)
    kw = dict(model=a.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              gpu_memory_utilization=round(util, 4), enforce_eager=a.eager, max_model_len=a.max_model_len,
              seed=0)
    if a.max_num_seqs:
        kw["max_num_seqs"] = a.max_num_seqs
    if a.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = a.tensor_parallel_size
    if a.expert_parallel:
        kw["enable_expert_parallel"] = True
    if a.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    offload = set(a.offload_params.split(",")) if a.offload_params else set()
    if a.cpu_offload_gb:
        kw.update(cpu_offload_gb=a.cpu_offload_gb, cpu_offload_params=offload)
    if a.offload_prefetch:
        group, num, step = (int(x) for x in a.offload_prefetch.split("/"))
        kw.update(offload_backend="prefetch", offload_group_size=group, offload_num_in_group=num,
                  offload_prefetch_step=step, offload_params=offload)
    kw["disable_log_stats"] = False  # per-request first/last token times for TTFT and TPOT
    if plan is not None:
        from fluxmoe.vllm_plugin.worker import EXTENSION

        kw["worker_extension_cls"] = EXTENSION  # collective_rpc("fluxmoe_stats"), as the endpoint calls it
    if a.gdn_prefill_backend:
        kw["gdn_prefill_backend"] = a.gdn_prefill_backend
    if a.capture_sizes and not a.eager:
        kw["compilation_config"] = {"cudagraph_capture_sizes": [int(s) for s in a.capture_sizes.split(",")]}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0

    runtime = None
    if plan is not None:
        from fluxmoe.vllm_plugin.runtime import current_runtime

        runtime = current_runtime()  # None where the workers are processes of their own (several GPUs)
    if a.corrupt and not all(llm.apply_model(_corrupt_one_resident_expert)):
        raise SystemExit("--corrupt needs a paged layer with a resident expert")

    if a.greedy:
        sp = [SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, logprobs=1) for _, n_out in lengths]
    else:
        # A seed per request: with one seed for all, dummy weights' near-uniform logits make every
        # sequence of a prefill chunk sample the same token at each step, and so route its 32 or so
        # tokens to the same experts (the runs up to 2026-11-25 did; --lockstep-sampling repeats them).
        sp = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n_out, ignore_eos=True,
                             seed=0 if a.lockstep_sampling else i) for i, (_, n_out) in enumerate(lengths)]
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    for r in range(1, a.repeat):  # other token ids of the same lengths: no prefix-cache hits in the timed run
        llm.generate(token_prompts(r), sp, use_tqdm=False)
    steps = _log_steps(llm) if a.step_log else None
    preemptions = _count_preemptions(llm)
    torch.cuda.synchronize()
    profiler = None
    if a.kernel_profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CUDA])
        profiler.start()
    if a.routing and plan is not None and runtime is None:
        raise SystemExit("--routing reads the route counter in this process: one GPU only")
    counter = runtime._pager.route_counter if a.routing and runtime is not None and runtime._pager else None
    before = counter.read_now() if counter is not None else None
    t1 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t1
    if profiler is not None:
        torch.cuda.synchronize()
        profiler.stop()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    cache = llm.llm_engine.vllm_config.cache_config
    res = dict(label=a.label, model=a.model, plan=a.plan, eager=a.eager, util=round(util, 4), dummy_scale=a.dummy_scale,
               timed_pass=a.repeat, startup_s=round(startup, 1), elapsed_s=round(elapsed, 3), prompt_tokens=n_in, output_tokens=n_out,
               total_tok_s=round((n_in + n_out) / elapsed, 1), output_tok_s=round(n_out / elapsed, 1),
               num_gpu_blocks=cache.num_gpu_blocks, block_size=cache.block_size,
               kv_tokens=(cache.num_gpu_blocks or 0) * cache.block_size,
               gpu=torch.cuda.get_device_name(0), gpu_total_bytes=total,
               max_allocated_bytes=torch.cuda.max_memory_allocated(), preemptions=preemptions[0], **_latencies(outs),
               sampling_seeds="0 for all" if a.lockstep_sampling else "one per request",
               settings={k: (sorted(v) if isinstance(v, set) else v) for k, v in kw.items()
                         if k not in ("model", "skip_tokenizer_init")})
    if plan is not None:
        ranks = llm.apply_model(_paging_summary)
        res["fluxmoe"] = dict(ranks[0], stats=llm.collective_rpc("fluxmoe_stats"))
        if len(ranks) > 1:
            res["fluxmoe"]["ranks"] = ranks
    if counter is not None:
        res["routing"] = _routing(llm, counter, before, token_prompts(a.repeat + 1), lengths)
    def probe(model):
        """Per MoE layer: the class, backend and kernel vLLM built, and sums of the expert stacks."""
        found = []
        for name, m in model.named_modules():
            if not hasattr(m, "w13_weight") or not hasattr(m, "quant_method"):
                continue
            qm = m.quant_method
            item = dict(name=name, cls=type(m).__name__, backend=str(getattr(qm, "unquantized_backend", "")),
                        experts=type(getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)).__name__,
                        w13_shape=list(m.w13_weight.shape))
            layer = getattr(m, "fluxmoe_layer", None)
            if getattr(m, "fluxmoe_paged", False):
                item["sums"] = list(m.fluxmoe_runtime.checksums.get(layer, ()))
            else:
                item["sums"] = [float(m.w13_weight.double().sum()), float(m.w2_weight.double().sum())]
            found.append(item)
        return found

    res["probe"] = llm.apply_model(probe)
    if steps is not None:
        res["steps"] = [[round(t - t1, 6), *rest] for t, *rest in steps]  # seconds from the run's start
        res["steps_fields"] = ["scheduled_at_s", "tokens", "sequences", "context_tokens_after"]
    if profiler is not None:
        res["kernels"], res["kernels_all_ms"] = _kernel_summary(profiler, a.kernel_profile)
    if a.greedy:
        res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        res["logprobs"] = [[float(step[t].logprob) for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                           for o in outs]
    print("RESULT " + json.dumps(res), flush=True)


def _paging_summary(model) -> dict:
    """In a worker: what its paging runtime holds (one answer per rank through apply_model)."""
    from fluxmoe.vllm_plugin.runtime import current_runtime

    runtime = current_runtime()
    if runtime is None:
        return {"pager_ran": False}
    return dict(pager_ran=runtime._pager is not None, paged_layers=len(runtime.paged_layers),
                moe_layers=len(runtime.moe_layers), gpu_expert_bytes=runtime.gpu_bytes,
                depth=runtime.plan.prefetch_depth, slots=runtime.slots, plan_kv_bytes=runtime.plan.kv_cache_bytes,
                host_bytes=sum(t.host_bytes for t in runtime.layers if t is not None),
                encode_s=round(runtime.encode_seconds, 2),
                compressed_experts=sum(len(t.compressed_ids) for t in runtime.layers if t is not None))


def _corrupt_one_resident_expert(model) -> bool:
    """In a worker (the negative control): negate one resident expert of the first paged layer
    that has one, read through its arena span. False where there is none."""
    from fluxmoe.vllm_plugin.runtime import current_runtime

    runtime = current_runtime()
    paged = [runtime.position(layer) for layer in sorted(runtime.paged_layers)]
    target = next((i for i in paged if len(runtime.layers[i].resident[0])), None)
    if target is None:
        return False
    runtime.layers[target].resident[0][0].mul_(-1)
    return True


def _routing(llm, counter, before, prompts, lengths) -> dict:
    """Picks per layer and expert, and tokens, in the timed run (since `before`) and in a
    prefill-only pass of `prompts` (one output token each) run now. Decode steps under CUDA
    graphs are padded to a captured size, and the padding is routed (and counted) too."""
    from vllm import SamplingParams

    def since(old, new):
        return ([[n - o for o, n in zip(ro, rn)] for ro, rn in zip(old[0], new[0])],
                new[1][0] - old[1][0])

    after = counter.read_now()
    llm.generate(prompts, [SamplingParams(max_tokens=1, ignore_eos=True) for _ in lengths], use_tqdm=False)
    timed, prefill = since(before, after), since(after, counter.read_now())
    return {"timed_counts": timed[0], "timed_tokens": timed[1],
            "prefill_only_counts": prefill[0], "prefill_only_tokens": prefill[1]}


def _kernel_summary(profiler, top: int) -> tuple[list[dict], float]:
    """The `top` GPU kernels by their total time in the profiled run: name, calls, total ms
    (the profiler's per-name aggregate; the time inside CUDA graphs is attributed to their
    kernels as well); and the milliseconds of all kernels (the run's elapsed time less this is
    the GPU idle, or two streams' kernels overlapping)."""
    rows = [(e.key, e.count, e.self_device_time_total / 1e3) for e in profiler.key_averages()
            if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    return ([{"kernel": k[:160], "calls": n, "total_ms": round(ms, 3)} for k, n, ms in rows[:top]],
            round(sum(ms for _, _, ms in rows), 3))


def _log_steps(llm) -> list:
    """Wrap the in-process scheduler: per step with work, (time scheduled, tokens, sequences,
    the sequences' summed context once the step's tokens are in). vLLM 0.26 schedules
    asynchronously: a step can be scheduled before the one before it has ended, so the times
    between schedules are not step durations (bench/NOTES.md, session 11)."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    schedule, steps = scheduler.schedule, []

    def logged(*args, **kwargs):
        out = schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens:
            before = (sum(out.scheduled_cached_reqs.num_computed_tokens)
                      + sum(r.num_computed_tokens for r in out.scheduled_new_reqs))
            steps.append((time.perf_counter(), out.total_num_scheduled_tokens, len(out.num_scheduled_tokens),
                          before + out.total_num_scheduled_tokens))
        return out

    scheduler.schedule = logged
    return steps


def _count_preemptions(llm) -> list[int]:
    """A one-item list that counts the in-process scheduler's preemptions from now on: the
    simulator preempts where vLLM would, and KV-bound runs are checked against it."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempt, count = scheduler._preempt_request, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return preempt(*args, **kwargs)

    scheduler._preempt_request = counted
    return count


def launch(args: list[str], log, timeout_s: float | None = None) -> dict:
    """Run this script in its own process with `args`; its RESULT, or {"error": ...}. The
    process's output goes to `log`."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                              cwd=root, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        log.write(f"\n===== {' '.join(args)} (timed out after {timeout_s} s)\n{(e.stdout or b'')[-5000:]!r}\n")
        return {"error": f"did not finish in {timeout_s} s"}
    log.write(f"\n===== {' '.join(args)} (rc {proc.returncode}, {time.perf_counter() - t:.0f} s)\n")
    log.write(proc.stdout[-20000:] + proc.stderr[-20000:])
    log.flush()
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-600:]}


def _lengths(a) -> list[tuple[int, int]]:
    """(prompt, output) tokens per request: fixed, or the trace's first rows that fit."""
    if not a.trace:
        return [(a.input_len, a.output_len)] * a.num_prompts
    import csv

    rows = []
    with open(a.trace) as f:
        for row in csv.DictReader(f):
            n_in, n_out = int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))
            if n_in + n_out <= a.max_model_len:
                rows.append((n_in, n_out))
            if len(rows) == a.num_prompts:
                break
    return rows


def _latencies(outs) -> dict:
    """TTFT and TPOT percentiles from vLLM's per-request timestamps (engine-core clock)."""
    import numpy as np

    ttft, tpot = [], []
    for o in outs:
        m = o.metrics
        if m is None or not m.first_token_ts:
            continue
        ttft.append(m.first_token_ts - m.queued_ts)
        n = len(o.outputs[0].token_ids)
        if n > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    out = {}
    for name, xs in (("ttft", ttft), ("tpot", tpot)):
        if xs:
            out[f"{name}_p50_s"], out[f"{name}_p99_s"] = (round(float(np.percentile(xs, q)), 5) for q in (50, 99))
    return out


def _fast_dummy() -> None:
    """vLLM fills a CPU-held dummy param on one CPU thread (about 50 MB/s); fill it on the GPU
    with the same generator and seed and copy, so it holds what a GPU-held param would."""
    from vllm.model_executor.model_loader import dummy_loader, weight_utils

    from bench.dummy_scale.sitecustomize import fast_fill  # weight_utils is loaded: its import hook stays idle

    fill = fast_fill(weight_utils.initialize_single_dummy_weight)
    weight_utils.initialize_single_dummy_weight = fill
    dummy_loader.initialize_single_dummy_weight = fill


if __name__ == "__main__":
    main()

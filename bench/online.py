#!/usr/bin/env python3
"""Online serving: `fluxmoe serve` against `vllm serve` with vLLM's own offloader, each driven
by vLLM's `vllm bench serve` client replaying the Azure code trace (arrivals and lengths), beside
the simulator's prediction of the same requests (GPU machine, vLLM 0.26.0 carried).

The first --requests rows of the trace (simulator/traces/azure_llm_2023_code_head.csv) that fit
--max-model-len, their arrivals divided by each of --time-scales, become a `timed_trace` file that the
client replays by its timestamps (greedy, ignore_eos: every request gets its trace's output
length). Prompts are random words of the folder's word-level tokenizer, one per token, with no
prefix shared between requests (the trace has no prefix information; prefix caching is off).
Each server runs alone on the GPU, started and stopped by this script; dummy weights of +-0.1
(bench/dummy_scale), offloaded ones filled on the GPU. Prints a table and writes JSON.

    python3 bench/online.py --model models/mixtral-8x7b-8layers --util 0.1111 \\
        --plan bench/plans/mixtral-8x7b-8layers-a40-4tier.json --prefetch 8/7/1 --requests 200 \\
        --time-scales 2 --max-model-len 4096          # bench/results/online_a40_standin_h200_2026-11-24.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRACE = os.path.join(ROOT, "simulator", "traces", "azure_llm_2023_code_head.csv")
CHUNK = 16  # tokens per hash id of the timed_trace format
GOODPUT = {"ttft": 5000.0, "tpot": 500.0}  # ms: the SLO the goodput column counts
KEEP = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
        "total_input_tokens", "total_output_tokens", "request_goodput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms", "error")


def trace_workload(requests: int, time_scale: float, max_model_len: int):
    """The trace's first `requests` rows that fit the context, arrivals divided by `time_scale`."""
    from simulator.workload import Workload

    rows = Workload.from_trace(TRACE, time_scale=time_scale)
    fits = [r for r in rows.requests if r.prompt_tokens + r.output_tokens <= max_model_len][:requests]
    return Workload(f"code trace, first {len(fits)} that fit {max_model_len}, time / {time_scale:g}", fits)


def write_timed_trace(workload, path: str) -> None:
    """vLLM's timed_trace format: one JSON object a line; hash ids name 16-token prompt chunks,
    unique here so that no two requests share a prefix."""
    next_id = 0
    with open(path, "w") as f:
        for r in workload.requests:
            chunks = math.ceil(r.prompt_tokens / CHUNK)
            f.write(json.dumps({"timestamp": r.arrival_s, "input_length": r.prompt_tokens,
                                "output_length": r.output_tokens,
                                "hash_ids": list(range(next_id, next_id + chunks))}) + "\n")
            next_id += chunks


def run_client(folder: str, trace_path: str, n: int, port: int, out_dir: str, label: str) -> dict:
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
            "--model", folder, "--tokenizer", folder, "--port", str(port), "--dataset-name", "timed_trace",
            "--dataset-path", trace_path, "--num-prompts", str(n), "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--goodput", *(f"{k}:{v:g}" for k, v in GOODPUT.items()), "--save-result",
            "--result-dir", out_dir, "--result-filename", f"{label}.json", "--disable-tqdm"]
    log = os.path.join(out_dir, f"{label}_client.log")
    with open(log, "w") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False, timeout=1800)
    path = os.path.join(out_dir, f"{label}.json")
    if not os.path.exists(path):
        raise RuntimeError(f"the client wrote no result: see {log}")
    return json.load(open(path))


def kv_tokens(log_path: str) -> int | None:
    import re

    found = re.findall(r"GPU KV cache size: ([\d,]+) tokens", open(log_path, errors="replace").read())
    return int(found[-1].replace(",", "")) if found else None


def predict(model: str, workload, plan_path: str | None = None, prefetch: str | None = None,
            kv_tokens: int | None = None, max_num_seqs: int = 256) -> dict:
    """The simulator's figures for the same requests and arrivals: the FluxMoE plan, or vLLM's
    prefetch offloader at `prefetch` with the KV cache its server sized (`kv_tokens`)."""
    import profiles
    from bench.calibration import plan_that_ran
    from simulator.engine import simulate
    from simulator.prefetch_offload import PrefetchOffload

    profile = profiles.Profile(profiles.load_model(os.path.join(ROOT, model)), profiles.load_gpu("h200"))
    if plan_path is not None:
        r = simulate(profile, workload, plan=plan_that_ran(plan_path, profile), keep_timeline=False)
    else:
        kv = kv_tokens * profile.model.kv_bytes_per_token
        r = simulate(profile, workload, system="vllm_prefetch", prefetch_offload=PrefetchOffload.parse(prefetch),
                     kv_cache_bytes=kv, max_num_seqs=max_num_seqs, keep_timeline=False)
    return {"output_tok_s": r.output_tokens_per_s, "total_tok_s": r.tokens_per_s, "makespan_s": r.makespan_s,
            "ttft_p50_ms": r.ttft_s.p50 * 1e3, "ttft_p99_ms": r.ttft_s.p99 * 1e3,
            "tpot_p50_ms": r.tpot_s.p50 * 1e3, "tpot_p99_ms": r.tpot_s.p99 * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--util", type=float, required=True, help="both servers' --gpu-memory-utilization")
    ap.add_argument("--plan", required=True, help="FluxMoE's plan (made for this model, GPU and budget)")
    ap.add_argument("--prefetch", default="8/7/1", help="vLLM's prefetch offloader: group/offloaded/step")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--time-scales", default="1", help="comma-separated: arrivals divided by each (2: twice the "
                    "rate); each server replays the trace at every one in turn")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--systems", default="fluxmoe,prefetch")
    ap.add_argument("--port", type=int, default=8021)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/online"))
    a = ap.parse_args()
    from bench.serving import dummy_weights_env, start_server, stop_server, with_tokenizer

    os.makedirs(a.out, exist_ok=True)
    folder = with_tokenizer(a.model, "/tmp/fluxmoe-online-model")
    scales = [float(x) for x in a.time_scales.split(",")]
    workloads = {scale: trace_workload(a.requests, scale, a.max_model_len) for scale in scales}
    for scale, wl in workloads.items():
        write_timed_trace(wl, os.path.join(a.out, f"trace_x{scale:g}.jsonl"))
    common = ["--load-format", "dummy", "--max-model-len", str(a.max_model_len), "--max-num-seqs",
              str(a.max_num_seqs), "--no-enable-prefix-caching", "--port", str(a.port)]
    group, num, step = a.prefetch.split("/")
    servers = {
        "fluxmoe": [sys.executable, "-m", "fluxmoe.cli", "serve", "--model", folder, "--plan", a.plan, *common],
        "prefetch": [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", folder, "--gpu-memory-utilization",
                     str(a.util), "--offload-backend", "prefetch", "--offload-group-size", group,
                     "--offload-num-in-group", num, "--offload-prefetch-step", step,
                     "--offload-params", "w13_weight", "w2_weight", *common],
    }
    report = {"what": "online: vllm bench serve replaying the Azure code trace against each server",
              "model": a.model, "util": a.util, "plan": a.plan, "prefetch": a.prefetch,
              "workloads": {f"x{k:g}": wl.name for k, wl in workloads.items()},
              "requests": len(workloads[scales[0]]), "time_scales": scales, "goodput_slo_ms": GOODPUT,
              "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("FLUXMOE_COMMIT", ""), "runs": {}}
    out_json = os.path.join(a.out, f"online_{time.strftime('%Y-%m-%d')}.json")
    report["predicted"] = {}
    for name in a.systems.split(","):
        log = os.path.join(a.out, f"{name}_server.log")
        try:
            server, startup_s = start_server(servers[name], dummy_weights_env(0.1, fast=True), log, a.port)
        except RuntimeError as e:
            report["runs"][name] = {"error": str(e)}
            continue
        kv = kv_tokens(log)  # as the server sized it
        for scale, wl in workloads.items():
            label = f"{name}@x{scale:g}"
            try:
                result = run_client(folder, os.path.join(a.out, f"trace_x{scale:g}.jsonl"), len(wl), a.port, a.out,
                                    label.replace("@", "_"))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                result = {"error": str(e)}
            report["runs"][label] = {**{k: result[k] for k in KEEP if k in result}, "startup_s": round(startup_s, 1),
                                     "kv_tokens": kv}
            with open(out_json, "w") as f:
                json.dump(report, f, indent=1)
            print(label, json.dumps(report["runs"][label]), flush=True)
            try:
                report["predicted"][label] = (predict(a.model, wl, plan_path=a.plan) if name == "fluxmoe" else
                                              predict(a.model, wl, prefetch=a.prefetch, kv_tokens=kv,
                                                      max_num_seqs=a.max_num_seqs))
            except Exception as e:  # noqa: BLE001 - the measurement is kept
                report["predicted"][label] = {"error": repr(e)}
        stop_server(server)
    import torch

    report["device"] = torch.cuda.get_device_name(0)
    with open(out_json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['requests']} requests of the code trace, replayed at {a.time_scales} x its rate")
    print(f"{'system':<16} {'req/s':>6} {'out tok/s':>10} {'total tok/s':>11} {'goodput':>8} {'TTFT p50/p99 ms':>17} "
          f"{'TPOT p50/p99 ms':>16} {'KV tokens':>10} {'start s':>8}")
    rows = [(n, r) for n, r in report["runs"].items()] + [(f"{n} (sim)", p) for n, p in report["predicted"].items()
                                                          if isinstance(p, dict)]
    for name, r in rows:
        if "error" in r:
            print(f"{name:<16} error: {r['error'][:100]}")
            continue
        sim = "output_tok_s" in r
        print(f"{name:<16} {r.get('request_throughput', 0):>6.2f} {r.get('output_throughput', r.get('output_tok_s', 0)):>10.1f} "
              f"{r.get('total_token_throughput', r.get('total_tok_s', 0)):>11.1f} {r.get('request_goodput', 0) or 0:>8.2f} "
              f"{r['ttft_p50_ms' if sim else 'median_ttft_ms']:>8.0f}/{r['ttft_p99_ms' if sim else 'p99_ttft_ms']:<8.0f} "
              f"{r['tpot_p50_ms' if sim else 'median_tpot_ms']:>7.1f}/{r['tpot_p99_ms' if sim else 'p99_tpot_ms']:<8.1f} "
              f"{r.get('kv_tokens') or '-':>10} {r.get('startup_s', '-'):>8}")
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

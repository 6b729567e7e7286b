#!/usr/bin/env python3
"""`fluxmoe serve --adapt` in a real vLLM OpenAI server, its budget shrunk and grown back over
HTTP while requests stream (GPU machine, vLLM 0.26.0, after `. /tmp/vllm-env.sh`).

The model folder gets a word-level tokenizer (nothing can be downloaded there) and vLLM's dummy
weights are drawn from +-0.1 in the server's processes (bench/dummy_scale). The same greedy
completions (token-id prompts, ignore_eos, logprobs) are sent twice: once with the plan fixed,
then again while `POST /v1/fluxmoe/budget` (the route `fluxmoe budget` calls, with the API key)
shrinks the budget and grows it back. Every request must succeed with the same text and
logprobs. Prints a table and `RESULT {json}`; writes `--out` if given.

    python3 bench/vllm_serve_budget_check.py --model models/mixtral-8x7b-8layers --budget 30GiB --shrink 8GiB
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "fluxmoe-budget-check-key"


def call(url: str, body: dict | None = None, timeout: float = 600.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", default="30GiB")
    ap.add_argument("--shrink", default="8GiB")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=160)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    from bench.serving import dummy_weights_env, start_server, stop_server, with_tokenizer
    from fluxmoe.units import GiB, format_bytes, parse_bytes

    folder = with_tokenizer(a.model, "/tmp/fluxmoe-serve-model")
    small = f"{(parse_bytes(a.budget, 'budget') - parse_bytes(a.shrink, 'shrink')) / GiB:g}GiB"
    argv = [sys.executable, "-m", "fluxmoe.cli", "serve", "--model", folder, "--gpu-budget", a.budget,
            "--max-num-seqs", str(a.requests), "--adapt", "--adapt-interval", "2", "--port", str(a.port),
            "--load-format", "dummy", "--max-model-len", "512", "--enforce-eager", "--api-key", KEY,
            "--no-enable-prefix-caching"]
    server, startup_s = start_server(argv, dummy_weights_env(0.1), "/tmp/fluxmoe-serve-budget.log", a.port, 300)
    base = f"http://127.0.0.1:{a.port}"
    try:
        rng = random.Random(0)
        vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(a.input_len)] for _ in range(a.requests)]

        def complete(prompt):
            t = time.perf_counter()
            status, answer = call(base + "/v1/completions", {
                "model": folder, "prompt": prompt, "max_tokens": a.output_len, "temperature": 0.0,
                "ignore_eos": True, "logprobs": 1})
            if status != 200:
                return status, None, None, time.perf_counter() - t
            choice = answer["choices"][0]
            return status, choice["text"], choice["logprobs"]["token_logprobs"], time.perf_counter() - t

        def send_all():
            with ThreadPoolExecutor(len(prompts)) as pool:
                return list(pool.map(complete, prompts))

        send_all()  # warm-up
        t = time.perf_counter()
        fixed = send_all()
        fixed_s = time.perf_counter() - t
        control = send_all()  # the same plan again: what batching alone changes over HTTP
        changes, streaming = [], {}
        worker = threading.Thread(target=lambda: streaming.update(out=send_all()))
        t = time.perf_counter()
        worker.start()
        for budget, wait_s in ((small, 2.0), (a.budget, 2.0)):
            time.sleep(wait_s)
            c = time.perf_counter()
            status, answer = call(base + "/v1/fluxmoe/budget", {"budget": budget})
            w = (answer.get("workers") or [{}])[0]
            changes.append(dict(budget=budget, status=status, seconds=round(time.perf_counter() - c, 2),
                                apply=answer.get("apply", answer.get("error", ""))[:200],
                                expert_bytes_before=w.get("expert_bytes_before"),
                                expert_bytes_after=w.get("expert_bytes_after"),
                                driver_free_bytes=w.get("driver_free_bytes"), read_s=w.get("read"),
                                build_s=w.get("build"), read_on_gpu=w.get("read_on_gpu"),
                                torch_reserved=w.get("torch_reserved_bytes"),
                                torch_allocated=w.get("torch_allocated_bytes")))
        worker.join()
        changing_s = time.perf_counter() - t
        changed = streaming["out"]
        _, adapt = call(base + "/v1/fluxmoe/adapt")
        unauthorized = urllib.request.Request(base + "/v1/fluxmoe/budget", method="POST", data=b'{"budget": "1GiB"}',
                                              headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(unauthorized, timeout=10)
            without_key = 200
        except urllib.error.HTTPError as e:
            without_key = e.code
    finally:
        stop_server(server)
    import torch

    res = dict(device=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d"),
               commit=os.environ.get("FLUXMOE_COMMIT", ""), model=a.model, budget=a.budget, small=small,
               requests=a.requests, input_len=a.input_len, output_len=a.output_len,
               startup_s=round(startup_s, 1), changes=changes,
               all_succeeded=all(r[0] == 200 for r in fixed + changed),
               text_equal=[r[1] for r in changed] == [r[1] for r in fixed],
               logprobs_equal=[r[2] for r in changed] == [r[2] for r in fixed],
               control_text_equal=[r[1] for r in control] == [r[1] for r in fixed],
               control_logprobs_equal=[r[2] for r in control] == [r[2] for r in fixed],
               logprobs_max_abs_diff=max(abs(x - y) for c, f in zip(changed, fixed) if c[2] and f[2]
                                         for x, y in zip(c[2], f[2]) if x is not None and y is not None),
               control_logprobs_max_abs_diff=max(abs(x - y) for c, f in zip(control, fixed) if c[2] and f[2]
                                                 for x, y in zip(c[2], f[2]) if x is not None and y is not None),
               fixed_s=round(fixed_s, 2), changing_s=round(changing_s, 2),
               latency_fixed_max_s=round(max(r[3] for r in fixed), 2),
               latency_changing_max_s=round(max(r[3] for r in changed), 2),
               budget_without_api_key=without_key, adapt_decisions=(adapt.get("decisions") or [])[-4:])
    print(f"\n{'budget':<9} {'http':>4} {'s':>6} {'read s':>7} {'build s':>8} {'experts after':>14} {'driver free':>12}  apply")
    for c in changes:
        print(f"{c['budget']:<9} {c['status']:>4} {c['seconds']:>6} {c['read_s']!s:>7} {c['build_s']!s:>8} "
              f"{format_bytes(c['expert_bytes_after']) if c['expert_bytes_after'] else '-':>14} "
              f"{(c['driver_free_bytes'] or 0) / GiB:>10.2f} G  {c['apply'][:60]}")
    print(f"\nall succeeded: {res['all_succeeded']}; text equal: {res['text_equal']}; logprobs equal: "
          f"{res['logprobs_equal']} (max diff {res['logprobs_max_abs_diff']:.2e}; the fixed plan twice: text "
          f"{res['control_text_equal']}, logprobs {res['control_logprobs_equal']}, max diff "
          f"{res['control_logprobs_max_abs_diff']:.2e}); fixed pass {res['fixed_s']} s, changing pass {res['changing_s']} s; "
          f"budget route without the key: HTTP {without_key}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

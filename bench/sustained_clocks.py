#!/usr/bin/env python3
"""Do compute-bound kernels run slower under sustained load than in the profiler's short bursts?

The step model puts vLLM's 16,384-token prefill chunks of Mixtral-8x7B 12% under their
measured time while decode steps are within 3.5% (bench/NOTES.md, session 10). The expert FFN
tables behind it are timed in bursts (`profiles.profiler._ms`: one warm-up call, 20 synced
calls, a third of a second); a prefill chunk keeps the tensor cores busy for most of a
second, and a GPU at its power limit lowers its clocks. Per kernel, this times the burst as
the profiler does, then the same call after `--sustain-s` of back-to-back calls, and reads the
SM clock and power (nvidia-smi) in each state.

    python3 bench/sustained_clocks.py [--sustain-s 15]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.environ.get("FLUXMOE_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))


def smi() -> dict:
    """SM clock (MHz), power (W) and temperature (C) now."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout.strip()
    clock, power, temp = (float(x) for x in out.split(","))
    return {"sm_mhz": clock, "power_w": power, "temp_c": temp}


def kernels():
    import torch

    from profiles.profiler import torch_experts_ffn

    dev = torch.device("cuda")
    out = {}
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    out["matmul 8192^3"] = lambda: a @ a
    h, i, n = 4096, 14336, 8  # Mixtral-8x7B's experts, one layer
    w13 = torch.randn(n, h, 2 * i, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(n, i, h, device=dev, dtype=torch.bfloat16) * 0.02
    for t in (4096, 512, 16):  # a prefill chunk's tokens per expert, a mixed step's, a decode step's
        x = torch.randn(n, t, h, device=dev, dtype=torch.bfloat16)
        out[f"Mixtral expert FFN, {t} tokens/expert x 8"] = lambda x=x: torch_experts_ffn(x, w13, w2)
    return out


def main() -> None:
    import torch

    from profiles.profiler import _ms

    ap = argparse.ArgumentParser()
    ap.add_argument("--sustain-s", type=float, default=15.0)
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle before each burst, to start cool")
    a = ap.parse_args()
    rows = []
    for name, fn in kernels().items():
        time.sleep(a.idle_s)
        burst_ms = _ms(fn)
        burst_state = smi()
        end = time.perf_counter() + a.sustain_s
        while time.perf_counter() < end:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        state = smi()  # read while still hot, before timing
        sustained_ms = _ms(fn)
        rows.append({"kernel": name, "burst_ms": round(burst_ms, 4), "sustained_ms": round(sustained_ms, 4),
                     "ratio": round(sustained_ms / burst_ms, 4), "burst": burst_state, "sustained": state})
        print(rows[-1], flush=True)
    commit = os.environ.get("FLUXMOE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {"what": "burst (the profiler's timing) against sustained back-to-back load, same kernel, same process",
              "sustain_s": a.sustain_s, "idle_s": a.idle_s, "device": torch.cuda.get_device_name(0),
              "date": datetime.date.today().isoformat(), "commit": commit, "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"sustained_clocks_{report['date']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'kernel':<44} {'burst ms':>9} {'sustained':>9} {'ratio':>6} {'MHz burst/sust':>15} {'W sust':>6}")
    for r in rows:
        print(f"{r['kernel']:<44} {r['burst_ms']:>9.3f} {r['sustained_ms']:>9.3f} {r['ratio']:>6.3f} "
              f"{r['burst']['sm_mhz']:>7.0f}/{r['sustained']['sm_mhz']:<7.0f} {r['sustained']['power_w']:>6.0f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What tensor and expert parallelism cost on one host's GPUs (issue #15): NCCL all-reduce and
all-to-all times per message size, and whether each GPU's PCIe link is its own (pinned H2D on
one GPU alone against all at once). One process a GPU; NVLink multicast stays off (the device
machines' rule: NCCL_NVLS_ENABLE=0). Prints a table; writes JSON (device, date, commit) to
`--out` or under FLUXMOE_RESULTS_DIR.

    python3 bench/nccl_profile.py [--gpus 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

SIZES = [1 << p for p in range(12, 30, 2)]  # 4 KiB .. 256 MiB
H2D_BYTES = 512 << 20


def _time_ms(fn, iters: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    rows = []
    for size in SIZES:
        x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(x)
        reduce_ms = _time_ms(lambda: dist.all_reduce(x), 20)
        a2a_ms = _time_ms(lambda: dist.all_to_all_single(out, x), 20)
        rows.append(dict(bytes=size, all_reduce_ms=reduce_ms, all_to_all_ms=a2a_ms))
    ok = torch.ones(4, device="cuda")
    dist.all_reduce(ok)
    host = torch.empty(H2D_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(H2D_BYTES, dtype=torch.uint8, device="cuda")
    h2d = {}
    for who in range(world):  # each GPU alone, the others idle at a barrier
        dist.barrier()
        if rank == who:
            h2d["alone"] = H2D_BYTES / (_time_ms(lambda: dev.copy_(host, non_blocking=True), 10) * 1e-3) / 1e9
        dist.barrier()
    dist.barrier()
    h2d["together"] = H2D_BYTES / (_time_ms(lambda: dev.copy_(host, non_blocking=True), 10) * 1e-3) / 1e9
    queue.put((rank, rows, h2d, float(ok[0])))
    dist.destroy_process_group()


def _nccl_version() -> str:
    import torch

    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def main() -> None:
    import torch
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=0, help="default: every GPU")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    for name in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS"):  # multicast stays off
        os.environ[name] = "0" if name == "NCCL_NVLS_ENABLE" else "1"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    world = a.gpus or torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, 29517, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    rows = results[0][1]
    factor_reduce, factor_a2a = 2 * (world - 1) / world, (world - 1) / world
    for r in rows:  # bus bandwidth, as nccl-tests reports it
        r["all_reduce_bus_gbps"] = factor_reduce * r["bytes"] / (r["all_reduce_ms"] * 1e-3) / 1e9
        r["all_to_all_bus_gbps"] = factor_a2a * r["bytes"] / (r["all_to_all_ms"] * 1e-3) / 1e9
    try:
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        topo = ""
    res = dict(device=torch.cuda.get_device_name(0), gpus=world, date=time.strftime("%Y-%m-%d"),
               commit=os.environ.get("FLUXMOE_COMMIT", ""), nccl=_nccl_version(),
               all_reduce_sum_right=all(abs(r[3] - world) < 1e-6 for r in results),
               collectives=rows, h2d_gbps_per_gpu=[dict(rank=r[0], **r[2]) for r in results], topology=topo)
    print(f"{world} x {res['device']}, NCCL {res['nccl']}\n")
    print(f"{'bytes':>11} {'all-reduce ms':>14} {'bus GB/s':>9} {'all-to-all ms':>14} {'bus GB/s':>9}")
    for r in rows:
        print(f"{r['bytes']:>11} {r['all_reduce_ms']:>14.4f} {r['all_reduce_bus_gbps']:>9.1f} "
              f"{r['all_to_all_ms']:>14.4f} {r['all_to_all_bus_gbps']:>9.1f}")
    print("\npinned H2D, 512 MiB, GB/s: " + ", ".join(
        f"GPU {h['rank']} alone {h['alone']:.1f} / all at once {h['together']:.1f}" for h in res["h2d_gbps_per_gpu"]))
    print(topo)
    out = a.out or os.path.join(os.environ.get("FLUXMOE_RESULTS_DIR", "bench/results"),
                                f"nccl_profile_h200x{world}_{res['date']}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

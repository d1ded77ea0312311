#!/usr/bin/env python3
"""The PyTorch peer of `dlcm bench gemm --torch PY`: FP32 products through torch (MKL in the
pip wheels, OpenBLAS in Debian's), timed in the same repeats as the engine's.

  --serve : prints {"ready": true, "torch": ..., "settings": ...}, then answers lines
            "gemm TA TB M N K BETA SECONDS" (TA, TB 0/1; C = op(A) op(B) + BETA C, row-major,
            the operands stored as the engine stores them) with
            {"gflops": per wall second, "gflops_idle": per second of the busiest thread}.
            "quit" ends it.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import aten_capability, blas_core, thread_cpu_seconds  # noqa: E402


def operands(ta, tb, M, N, K):
    g = torch.Generator().manual_seed(1)
    A = torch.rand(K, M, generator=g).sub_(0.5).t() if ta else torch.rand(M, K, generator=g).sub_(0.5)
    B = torch.rand(N, K, generator=g).sub_(0.5).t() if tb else torch.rand(K, N, generator=g).sub_(0.5)
    return A, B, torch.zeros(M, N)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    settings = (f"threads={a.threads}, BLAS={blas_core()}, "
                f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or 'none'}, "
                f"ATen CPU capability={aten_capability()}")
    print(json.dumps({"ready": True, "torch": torch.__version__, "settings": settings}), flush=True)
    cache = {}
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        if parts[0] != "gemm" or len(parts) != 8:
            print(json.dumps({"error": f"bad request {line.strip()!r}"}), flush=True)
            continue
        ta, tb, M, N, K = (int(x) for x in parts[1:6])
        beta, seconds = float(parts[6]), float(parts[7])
        key = (ta, tb, M, N, K)
        if key not in cache:
            cache.clear()  # one shape's operands at a time
            cache[key] = operands(ta, tb, M, N, K)
        A, B, C = cache[key]

        def run():
            if beta != 0:
                C.addmm_(A, B, beta=beta)
            else:
                torch.mm(A, B, out=C)

        run()  # warm-up
        th0, t0, calls = thread_cpu_seconds(), time.perf_counter(), 0
        while True:
            run()
            calls += 1
            wall = time.perf_counter() - t0
            if wall >= seconds and calls >= 3:
                break
        th1 = thread_cpu_seconds()
        busiest = max(t - th0.get(tid, 0.0) for tid, t in th1.items())
        flop = 2.0 * M * N * K * calls / 1e9
        print(json.dumps({"gflops": flop / wall, "gflops_idle": flop / max(busiest, 1e-9)}),
              flush=True)


if __name__ == "__main__":
    main()

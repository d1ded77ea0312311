"""Training throughput of the PyTorch reference on the same model (called by `dlcm bench train`).

Two modes:
  one-shot: prints progress to stderr and, last, one JSON line
            {"tokens_per_s": ..., "torch": ..., "settings": ...}
  --serve : builds the model, runs one warm-up step, prints {"ready": true, ...}, then answers
            each stdin line "run N" with {"tokens_per_s": ...} for N timed steps ("quit" ends).
            `dlcm bench train` uses this to interleave the peer's repeats with its own.
DLCM configs train on given boundaries: concept lengths 1 + Geometric with mean --R (the
engine's benchmark uses the same distribution), through the reference's `replicate`
cross-attention (its vectorised form; `compact` there is a per-token Python loop).
Peer settings (torch 2.x; `dlcm bench train --torch PY[:autocast][:sdpa][:compile]`):
  --autocast  forward under torch.autocast("cpu", dtype=torch.bfloat16) (the BF16 peer)
  --sdpa      the reference's attention through F.scaled_dot_product_attention (is_causal for
              plain causal masks) instead of its einsum/softmax form
  --compile   the training step's forward through torch.compile (reported, and dropped with a
              note when it fails on this CPU)
Usage: /usr/bin/python3 python/bench_torch.py --config CFG.json [--steps N] [--repeats R]
"""
import argparse
import ctypes
import json
import math
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dlcm_ref import config_from_dict, forward, init_params  # noqa: E402


def blas_core():
    """The BLAS torch multiplies with: torch's own build setting (pip wheels: 'mkl'), or for
    Debian's torch (BLAS_INFO=generic, i.e. the system libblas) OpenBLAS's kernel choice
    (e.g. 'OpenBLAS Cooperlake'); '?' when neither is known."""
    import re
    info = re.findall(r"BLAS_INFO=(\w+)", torch.__config__.show())
    if info and info[0] != "generic":
        return info[0]
    for name in ("libblas.so.3", "libopenblas.so.0"):
        try:
            lib = ctypes.CDLL(name)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            return "OpenBLAS " + lib.openblas_get_corename().decode()
        except (OSError, AttributeError):
            continue
    return "?"


def aten_capability():
    """The vector ISA of ATen's own kernels (AVX2 unless ATEN_CPU_CAPABILITY says otherwise)."""
    try:
        return torch.__config__.show().split("CPU capability usage:")[1].split()[0]
    except IndexError:
        return "?"


def thread_cpu_seconds():
    """On-CPU seconds of every thread of this process, by thread id (schedstat)."""
    r = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                r[tid] = int(f.read().split()[0]) * 1e-9
        except (OSError, ValueError, IndexError):
            pass
    return r


def peak_rss_mib():
    """This process's peak RSS: VmHWM (per address space, so exec starts it afresh; ru_maxrss
    would carry over the forking benchmark's own peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def geometric_boundaries(B, L, R, g):
    """[B, L] 0/1 with concept lengths 1 + Geometric(mean R - 1 failures)."""
    b = torch.zeros(B, L, dtype=torch.int64)
    q = math.log(1.0 - 1.0 / R)
    for r in range(B):
        t = 0
        while t < L:
            b[r, t] = 1
            u = max(1e-12, torch.rand(1, generator=g).item())
            t += 1 + int(math.floor(math.log(u) / q))
    return b


def use_sdpa():
    """Replaces the reference's attention by F.scaled_dot_product_attention (same mathematics:
    scale 1/sqrt(hd), boolean mask True = may attend, optional additive bias)."""
    import dlcm_ref.model as M
    import torch.nn.functional as F

    def attention(q, k, v, mask, bias=None):
        B, Lq, Hq, hd = q.shape
        rep = Hq // k.shape[2]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        Lk = k.shape[2]
        if bias is None and Lq == Lk and mask.shape[0] == 1 and bool(
                torch.equal(mask[0], torch.ones(Lq, Lk, dtype=torch.bool).tril())):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            m = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            if bias is not None:
                m = m + bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None])
        return out.transpose(1, 2).reshape(B, Lq, Hq * hd)

    M.attention = attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--R", type=float, default=0.0, help="dlcm: mean concept length (0: target_R)")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--sdpa", action="store_true")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    notes = []
    if (a.sdpa or a.compile) and int(torch.__version__.split(".")[0]) < 2:
        sys.exit(f"bench_torch: --sdpa/--compile need torch 2.x, this is {torch.__version__}")

    with open(a.config) as f:
        raw = json.load(f)
    cfg = config_from_dict(raw, a.config)
    t = raw.get("train", {})
    B, L = int(t.get("batch_size", 8)), int(t.get("seq_len", 512))
    params = init_params(cfg, seed=0)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    decay = [v for v in leaves.values() if v.dim() == 2]
    no_decay = [v for v in leaves.values() if v.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, cfg.vocab_size, (B, L), generator=g)  # no BOS inside rows
    targets = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    kw = {}
    if cfg.is_dlcm:
        R = a.R if a.R > 1 else float(cfg.target_R)
        kw = {"boundaries": geometric_boundaries(B, L, R, g), "xattn_impl": "replicate"}

    def loss_of():
        return forward(leaves, cfg, tokens, targets, **kw)["loss"]

    if a.sdpa:  # same mathematics, so the same loss (checked, so the peer stays honest)
        with torch.no_grad():
            before = loss_of().item()
            use_sdpa()
            after = loss_of().item()
        if abs(after - before) > 1e-4 * max(1.0, abs(before)):
            sys.exit(f"bench_torch: the SDPA attention changes the loss ({before} -> {after})")

    fwd = loss_of
    if a.compile:
        try:
            fwd = torch.compile(loss_of)
            fwd()  # compiles now, so a failure is caught here and the timing excludes it
        except Exception as e:  # noqa: BLE001 - any compiler failure: report and run eager
            notes.append(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager")
            fwd = loss_of

    def step():
        opt.zero_grad(set_to_none=True)
        if a.autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fwd()
        else:
            loss = fwd()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(leaves.values()), 1.0)
        opt.step()

    def timed(n):
        """tokens per wall second, per CPU-second of the process, per on-CPU second of the
        busiest thread (the idle-machine estimate, as in `dlcm bench train`)"""
        t0, c0, th0 = time.perf_counter(), time.process_time(), thread_cpu_seconds()
        for _ in range(n):
            step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        th1 = thread_cpu_seconds()
        busiest = max(t - th0.get(tid, 0.0) for tid, t in th1.items())
        tok = n * B * L
        return tok / wall, tok / cpu, tok / busiest

    settings = (f"threads={a.threads}, BLAS={blas_core()}, "
                f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or 'none'}, "
                f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '') or 'none'}, "
                f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '') or 'unset'}, "
                f"ATen CPU capability={aten_capability()}, "
                f"autocast={'bf16' if a.autocast else 'off'}, sdpa={'on' if a.sdpa else 'off'}, "
                f"compile={'on' if a.compile and not notes else 'off'}"
                + "".join(f"; {n}" for n in notes))
    step()  # warm-up
    if a.serve:
        print(json.dumps({"ready": True, "torch": torch.__version__, "settings": settings}),
              flush=True)
        for line in sys.stdin:
            parts = line.split()
            if not parts or parts[0] == "quit":
                break
            if parts[0] == "run":
                wall, cpu, idle = timed(int(parts[1]))
                rss = peak_rss_mib()
                print(json.dumps({"tokens_per_s": wall, "tokens_per_cpu_s": cpu,
                                  "tokens_per_busiest_thread_s": idle, "peak_rss_mib": rss}),
                      flush=True)
        return
    rates = []
    for _ in range(a.repeats):
        rates.append(timed(a.steps)[0])
        print(f"[bench_torch] {rates[-1]:.0f} tokens/s", file=sys.stderr)
    rates.sort()
    print(json.dumps({"tokens_per_s": rates[len(rates) // 2], "torch": torch.__version__,
                      "settings": settings}))


if __name__ == "__main__":
    main()

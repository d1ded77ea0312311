"""Training throughput of the PyTorch reference on the same model (called by `dlcm bench train`).

Prints progress to stderr and, last, one JSON line {"tokens_per_s": ..., "torch": ..., "settings": ...}.
Usage: /usr/bin/python3 python/bench_torch.py --config CFG.json [--steps N] [--repeats R]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dlcm_ref import config_from_dict, forward, init_params  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
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
    tokens = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, L), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        out = forward(leaves, cfg, tokens, targets)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(list(leaves.values()), 1.0)
        opt.step()

    step()  # warm-up
    rates = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        rates.append(a.steps * B * L / (time.perf_counter() - t0))
        print(f"[bench_torch] {rates[-1]:.0f} tokens/s", file=sys.stderr)
    rates.sort()
    print(json.dumps({"tokens_per_s": rates[len(rates) // 2], "torch": torch.__version__,
                      "settings": f"threads={a.threads}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}"}))


if __name__ == "__main__":
    main()

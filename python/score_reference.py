#!/usr/bin/python3
"""Per-continuation log-likelihoods from the PyTorch reference, for the zero-shot scorer's
cross-check (run with /usr/bin/python3).

  /usr/bin/python3 python/score_reference.py --ckpt DIR --requests FILE --out OUT.json

DIR holds config.json and model.safetensors (either architecture). FILE: one request per line,
"n_cont t_0 t_1 ... t_m": the full row (BOS, context, continuation) whose last n_cont tokens are
the continuation. Each row is run alone, unpadded, as a batch of one, fed without its last token
(dlcm: thresholded boundaries b = [p >= tau] over the whole fed row, the inference rule).

Writes JSON: "loglik" (sum over the continuation of log_softmax(logits) at its tokens, in
float64 from the float32 logits), "greedy" (every continuation token is the argmax), and
"margin" (dlcm: min |p - tau| over the fed row, how far the closest boundary decision is from
flipping; null for the baseline).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dlcm_ref as R  # noqa: E402


def read_requests(path):
    reqs = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            v = line.split()
            if not v:
                continue
            n_cont, row = int(v[0]), [int(t) for t in v[1:]]
            if n_cont < 1 or n_cont >= len(row):
                raise SystemExit(f"{path}:{ln}: continuation length {n_cont} must be in [1, {len(row)})")
            reqs.append((n_cont, row))
    if not reqs:
        raise SystemExit(f"{path}: no requests")
    return reqs


def score(P, cfg, n_cont, row):
    fed = torch.tensor([row[:-1]], dtype=torch.int64)
    res = R.forward(P, cfg, fed)
    logp = torch.log_softmax(res["logits"][0].double(), dim=-1)  # [n, V]
    n = fed.shape[1]
    pos = torch.arange(n - n_cont, n)
    tgt = torch.tensor(row[n - n_cont + 1:], dtype=torch.int64)
    ll = float(logp[pos, tgt].sum())
    greedy = bool((res["logits"][0][pos].argmax(dim=-1) == tgt).all())
    margin = None
    if cfg.is_dlcm:
        margin = float((res["p"][0] - cfg.router["tau"]).abs().min())
    return ll, greedy, margin


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg, P = R.load_checkpoint(a.ckpt)
    reqs = read_requests(a.requests)
    for ln, (_, row) in enumerate(reqs, 1):
        if min(row) < 0 or max(row) >= cfg.vocab_size:
            raise SystemExit(f"{a.requests}:{ln}: token ids must be in [0, {cfg.vocab_size})")
        if len(row) - 1 > cfg.max_seq_len:
            raise SystemExit(f"{a.requests}:{ln}: {len(row) - 1} fed tokens exceed max_seq_len {cfg.max_seq_len}")
    out = {"loglik": [], "greedy": [], "margin": []}
    with torch.no_grad():
        for n_cont, row in reqs:
            ll, g, m = score(P, cfg, n_cont, row)
            out["loglik"].append(ll)
            out["greedy"].append(g)
            out["margin"].append(m)
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

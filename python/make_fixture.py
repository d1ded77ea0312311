#!/usr/bin/python3
"""Writes a small random fixture for cross-checks:
  OUT/config.json, OUT/model.safetensors, OUT/tokens.txt, OUT/boundaries.txt (dlcm)

  /usr/bin/python3 python/make_fixture.py --arch baseline|dlcm --out DIR [--seed S]
      [--rows B] [--len L] [--init-std STD] [--set key=value]...

--set takes JSON values ("router.kind=\"raw\"" or router.kind=raw, qk_norm=true, d_token=32).
Token rows start with BOS and contain further BOS tokens (packed documents). Boundaries are
random 0/1 with 1 at every forced position (row start, BOS)."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dlcm_ref as R  # noqa: E402

TINY = {
    "baseline": {"arch": "baseline", "vocab_size": 37, "d_token": 16, "n_heads": 4, "n_kv_heads": 2,
                 "head_dim": 4, "d_ff": 24, "n_layers": 2, "qk_norm": True, "max_seq_len": 64},
    "dlcm": {"arch": "dlcm", "vocab_size": 37, "d_token": 16, "n_heads": 4, "n_kv_heads": 2,
             "head_dim": 4, "d_ff": 24, "enc_layers": 1, "dec_layers": 1, "d_concept": 24,
             "bb_layers": 2, "bb_heads": 3, "bb_kv_heads": 1, "bb_d_ff": 40, "x_heads": 4,
             "x_kv_heads": 2, "x_d_ff": 20, "d_scan": 12,
             "router": {"kind": "projected", "alpha": 0.5, "tau": 0.5, "smooth_grad": False},
             "target_R": 4.0, "aux_weight": 0.03, "qk_norm": True, "max_seq_len": 64},
}


def set_key(d, key, val):
    try:
        v = json.loads(val)
    except json.JSONDecodeError:
        v = val
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = v


def make_tokens(cfg, rows, L, g, bos_rate=0.1):
    V = cfg.vocab_size
    special = {cfg.bos_id, cfg.eos_id, cfg.pad_id}
    ordinary = torch.tensor([v for v in range(V) if v not in special])
    t = ordinary[torch.randint(len(ordinary), (rows, L), generator=g)]
    t[torch.rand(rows, L, generator=g) < bos_rate] = cfg.bos_id
    t[:, 0] = cfg.bos_id
    return t


def make_boundaries(cfg, tokens, g, rate=0.3):
    b = (torch.rand(tokens.shape, generator=g) < rate).long()
    b[tokens == cfg.bos_id] = 1
    b[:, 0] = 1
    return b


def build(arch, out, seed=0, rows=3, L=24, init_std=0.3, sets=(), norm_jitter=0.2,
          identity_jitter=0.3):
    cd = json.loads(json.dumps(TINY[arch]))
    for s in sets:
        k, _, v = s.partition("=")
        set_key(cd, k, v)
    cfg = R.config_from_dict(cd)
    params = R.init_params(cfg, seed=seed, std=init_std, norm_jitter=norm_jitter,
                           identity_jitter=identity_jitter)
    R.save_checkpoint(out, cd, params)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = make_tokens(cfg, rows, L, g)
    R.write_rows(os.path.join(out, "tokens.txt"), tokens.tolist())
    if cfg.is_dlcm:
        R.write_rows(os.path.join(out, "boundaries.txt"), make_boundaries(cfg, tokens, g).tolist())
    return cfg, params, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["baseline", "dlcm"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--len", type=int, default=24)
    ap.add_argument("--init-std", type=float, default=0.3)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    build(a.arch, a.out, a.seed, a.rows, a.len, a.init_std, a.set)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""PyTorch reference for cross-checking the C++ engine (run with /usr/bin/python3).

  /usr/bin/python3 python/reference.py --ckpt DIR --tokens FILE --out OUT.safetensors
      [--targets FILE] [--boundaries FILE] [--mode train|infer] [--xattn replicate|compact]
      [--adam-steps N --lr LR --beta1 B1 --beta2 B2 --eps EPS --weight-decay WD --grad-clip C]

DIR holds config.json and model.safetensors. FILE: one row per line, integers separated by
spaces, all rows of the same length L. --targets: same format (default: next-token shift, last
position -1 = ignored; any target < 0 is ignored). --boundaries (dlcm): 0/1 per position, the
given samples b (forced positions - row start and BOS - are boundaries regardless); without it
b = [p >= tau]. All rows form ONE batch: CE is the mean over all target tokens of all rows, F and
G the means over all B*L positions. The model config may set the SPEC 4.9 research variants
(concept_repr, concept_visibility, enc_window, dec_window, concept_path, xattn_rope); --xattn selects the
replicate or compact form of the cross-attention for every visibility.

Writes (float32): logits [B,L,V], loss [1], ce [1]; dlcm also aux [1], p [B,L], b [B,L] (0/1),
F [1], G [1], n_concepts [B]; mode train (default) also grad_norm [1] (global L2 norm of the
gradient, before clipping) and grad.<name> for every parameter (gradient of the total loss);
with --adam-steps N > 0 also loss_steps [N] (loss before each step; loss_steps[0] = loss),
param_after.<name>, exp_avg.<name>, exp_avg_sq.<name> (AdamW state after N steps).
--diagnostics (dlcm): also the concept-usage diagnostics of dlcm_ref/diagnostics.py on the same
tokens, targets and boundaries (given, else thresholded), computed in float32 with float64 sums:
diag.ce, diag.ce_null, diag.ce_shuffle, diag.xattn_ratio [1] and diag.pos_ce, diag.pos_count [K+1].
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dlcm_ref as R  # noqa: E402
from dlcm_ref.diagnostics import concept_usage  # noqa: E402


def make_optimizer(cfg, params, lr, beta1, beta2, eps, weight_decay):
    """torch AdamW (decoupled weight decay). Weight decay on every 2-D matrix (embeddings, lm_head,
    router and pooling projections included), none on norm weights and other vectors. Under
    mup.enabled, a tensor of group g ("token" | "concept" | "other") and width multiplier s uses
    lr * mup.lr_mult_<g> / s and eps / s (SPEC 6; s = 1 for "other")."""
    groups = {}
    for name, t in params.items():
        decay = t.dim() == 2
        g, s = R.mup_group(cfg, name, list(t.shape)) if cfg.mup["enabled"] else ("", 1.0)
        mult = cfg.mup["lr_mult_" + g] if g else 1.0
        key = (decay, g, s)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * mult / s, "eps": eps / s,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(t)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(beta1, beta2), eps=eps,
                             weight_decay=weight_decay, foreach=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--targets")
    ap.add_argument("--boundaries")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--xattn", choices=["replicate", "compact"], default="replicate")
    ap.add_argument("--adam-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diagnostics", action="store_true")
    ap.add_argument("--word-starts", help="router.kind = word: a file with the tokenizer's "
                    "word-start flags, one 0/1 per vocabulary id (whitespace-separated)")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg, params = R.load_checkpoint(a.ckpt)
    tokens = R.read_rows(a.tokens)
    B, L = tokens.shape
    if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
        raise SystemExit(f"{a.tokens}: token ids must be in [0, {cfg.vocab_size})")
    targets = R.read_rows(a.targets) if a.targets else R.default_targets(tokens)
    if targets.shape != tokens.shape:
        raise SystemExit(f"{a.targets}: shape {tuple(targets.shape)} != tokens {tuple(tokens.shape)}")
    if int(targets.max()) >= cfg.vocab_size:
        raise SystemExit(f"{a.targets}: target ids must be < {cfg.vocab_size}")
    boundaries = None
    if a.boundaries:
        if not cfg.is_dlcm:
            raise SystemExit("--boundaries only applies to dlcm checkpoints")
        boundaries = R.read_rows(a.boundaries)
        if boundaries.shape != tokens.shape:
            raise SystemExit(f"{a.boundaries}: shape {tuple(boundaries.shape)} != tokens {tuple(tokens.shape)}")
    if a.diagnostics and not cfg.is_dlcm:
        raise SystemExit("--diagnostics only applies to dlcm checkpoints")

    word_starts = None
    if a.word_starts:
        with open(a.word_starts) as f:
            word_starts = torch.tensor([int(x) for x in f.read().split()], dtype=torch.uint8)
        if word_starts.numel() != cfg.vocab_size:
            raise SystemExit(f"{a.word_starts}: {word_starts.numel()} flags, vocab_size is {cfg.vocab_size}")
    kw = {"word_starts": word_starts} if cfg.is_dlcm else {}

    train = a.mode == "train"
    for t in params.values():
        t.requires_grad_(train)

    def run():
        return R.forward(params, cfg, tokens, targets, boundaries, xattn_impl=a.xattn, **kw)

    out = {}
    with torch.set_grad_enabled(train):
        res = run()
    out["logits"] = res["logits"].detach().numpy()
    for k in ("loss", "ce") + (("aux", "F", "G") if cfg.is_dlcm else ()):
        out[k] = res[k].detach().reshape(1).numpy()
    if cfg.is_dlcm:
        out["p"] = res["p"].detach().numpy()
        out["b"] = res["b"].detach().numpy()
        out["n_concepts"] = res["n_concepts"].to(torch.float32).numpy()

    if a.diagnostics:  # at the checkpoint's weights, before any AdamW step
        dg = concept_usage(params, cfg, tokens, targets, boundaries, xattn_impl=a.xattn)
        for k in ("ce", "ce_null", "ce_shuffle", "xattn_ratio"):
            out["diag." + k] = np.array([dg[k]], dtype=np.float32)
        out["diag.pos_ce"] = np.array(dg["pos_ce"], dtype=np.float32)
        out["diag.pos_count"] = np.array(dg["pos_count"], dtype=np.float32)

    if train:
        res["loss"].backward()
        for t in params.values():  # unused tensors (concept_path = false): zero gradient
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        sq = sum(float(t.grad.double().pow(2).sum()) for t in params.values())
        out["grad_norm"] = np.array([np.sqrt(sq)], dtype=np.float32)
        for name, t in params.items():
            out["grad." + name] = t.grad.detach().numpy().copy()

        if a.adam_steps > 0:
            opt = make_optimizer(cfg, params, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay)
            losses = []
            for step in range(a.adam_steps):
                if step > 0:  # step 0 reuses the gradient computed above
                    opt.zero_grad(set_to_none=False)
                    res = run()
                    res["loss"].backward()
                losses.append(float(res["loss"].detach()))
                if a.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), a.grad_clip)
                opt.step()
            out["loss_steps"] = np.array(losses, dtype=np.float32)
            for name, t in params.items():
                out["param_after." + name] = t.detach().numpy().copy()
                st = opt.state[t]
                out["exp_avg." + name] = st["exp_avg"].numpy().copy()
                out["exp_avg_sq." + name] = st["exp_avg_sq"].numpy().copy()

    R.write_safetensors(a.out, out, {"generator": "python/reference.py", "arch": cfg.arch,
                                     "xattn": a.xattn, "mode": a.mode})
    return 0


if __name__ == "__main__":
    sys.exit(main())

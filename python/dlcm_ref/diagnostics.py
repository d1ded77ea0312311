"""Concept-usage diagnostics of a DLCM model (reference definitions; the C++ engine implements
the same ones and is cross-checked against `concept_usage`).

Inputs: parameters P, config cfg, tokens [B, L], optional targets [B, L] (default: next-token
shift, last position -1; targets < 0 are ignored, as in the loss) and optional boundaries
[B, L] (default: thresholded, b = [p >= tau]; forced positions - row start, BOS - are always
boundaries). One forward per quantity, no gradient; the segmentation b is the same for all of
them (it depends only on the encoder). Notation: H = encoder output (the residual of Psi),
xo_t = Wo_x attn_t the cross-attention term added to h_t (Psi = H + xo), N = B*L, CE = mean
next-token cross-entropy over kept targets (0 when none is kept).

(a) `ce_null`: CE with every concept entry the decoder sees replaced by z_null
    (xattn.null_concept): in the compact form, token t attends the same entries with the same
    multiplicities, all carrying z_null (the own-concept entry of the inclusive visibility too).
    All keys being equal, the attention weights sum to 1 over identical values, so attn_t is,
    per query head h, the value Wv_x z_null of kv head h // (x_heads / x_kv_heads).
    `delta_null = ce_null - ce`.
(b) `ce_shuffle`: CE with concepts shuffled across rows: row r keeps its own queries,
    segmentation and multiplicities, but its concept list [zs_0 .. zs_{M_r - 1}] is replaced by
    that of row r' = (r + 1) mod B, truncated to its first M_r entries or, when M_r' < M_r,
    padded at the end with z_null; the list's slot 0 stays z_null. zs_{r',k} is the smoothed
    backbone output of the complete concept k (for prefix_mean, the prefix that ends at the
    concept's last token, i.e. the whole concept). Every entry token t sees comes from that list,
    including its own concept's entry under inclusive visibility (so no prefix evaluation).
    With B = 1 the row gets its own list back. `delta_shuffle = ce_shuffle - ce`.
(c) `xattn_ratio = (1/N sum_t ||xo_t||_2) / (1/N sum_t ||h_t||_2)` over all N positions (targets
    play no part); 0 when concept_path = false.
(d) `pos_ce[k]`, `pos_count[k]`, k = 0 .. K: position in concept pos(t) = t - start(S_seg(t))
    (0 at a boundary); pos_ce[k] = mean CE over the kept targets of tokens with pos(t) = k,
    pos_count[k] their number (pos_ce[k] = 0 when pos_count[k] = 0); K = the largest pos(t) of
    a kept target. The weighted mean of pos_ce with weights pos_count is ce.

With concept_path = false the decoder sees no concept, so delta_null = delta_shuffle = 0
exactly and xattn_ratio = 0. Sums are accumulated in float64.
"""
import torch

from .model import cross_entropy, default_targets, forward


def _token_nll(logits, targets):
    """nll [B, L] (float64) at kept targets, 0 elsewhere; keep [B, L] bool."""
    keep = targets >= 0
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).long()[..., None])[..., 0]
    return torch.where(keep, nll, torch.zeros_like(nll)), keep


def position_in_concept(b):
    """b [B, L] 0/1 with b[:, 0] = 1 -> pos [B, L] = t - start of t's concept."""
    B, L = b.shape
    pos = torch.zeros(B, L, dtype=torch.long)
    for r in range(B):
        for t in range(1, L):
            pos[r, t] = 0 if b[r, t] else pos[r, t - 1] + 1
    return pos


def concept_usage(P, cfg, tokens, targets=None, boundaries=None, xattn_impl="compact"):
    """The concept-usage diagnostics of the module docstring. Returns a dict of Python floats
    (ce, ce_null, ce_shuffle, delta_null, delta_shuffle, xattn_ratio) and lists
    (pos_ce, pos_count)."""
    if not cfg.is_dlcm:
        raise ValueError("concept-usage diagnostics need a dlcm model (arch = dlcm)")
    if targets is None:
        targets = default_targets(tokens)
    with torch.no_grad():
        base = forward(P, cfg, tokens, targets, boundaries, xattn_impl=xattn_impl)
        b = base["b"].long()  # the segmentation used, forced positions included
        ab = {k: forward(P, cfg, tokens, targets, b, xattn_impl=xattn_impl, concept_ablation=k)
              for k in ("null", "shuffle")}
        ce = float(cross_entropy(base["logits"].to(torch.float64), targets)[0])
        ce_null = float(cross_entropy(ab["null"]["logits"].to(torch.float64), targets)[0])
        ce_shuf = float(cross_entropy(ab["shuffle"]["logits"].to(torch.float64), targets)[0])

        xo = base["xattn_out"].to(torch.float64).norm(dim=-1).mean()
        hn = base["H"].to(torch.float64).norm(dim=-1).mean()
        ratio = float(xo / hn) if float(hn) > 0 else 0.0

        nll, keep = _token_nll(base["logits"], targets)
        pos = position_in_concept(b)
        K = int(pos[keep].max()) if bool(keep.any()) else -1
        pos_ce, pos_count = [], []
        for k in range(K + 1):
            sel = keep & (pos == k)
            n = int(sel.sum())
            pos_count.append(n)
            pos_ce.append(float(nll[sel].sum()) / n if n else 0.0)
    return {"ce": ce, "ce_null": ce_null, "ce_shuffle": ce_shuf, "delta_null": ce_null - ce,
            "delta_shuffle": ce_shuf - ce, "xattn_ratio": ratio, "pos_ce": pos_ce,
            "pos_count": pos_count}

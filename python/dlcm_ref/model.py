"""Reference forward passes for the baseline (SPEC 3) and DLCM (SPEC 4) models.

Everything is functional: a model is a dict {SPEC-9 tensor name: tensor}. The code is written to
read like the specification, not to be fast. Shapes: B rows, L tokens per row, d widths.
Linear weights are [out, in], applied as x @ W.T. No biases anywhere.
"""
import math

import numpy as np
import torch
import torch.nn.functional as Fn

# ----------------------------------------------------------------------------------------------
# parameter inventory (names, shapes, kinds) - SPEC section 9
# ----------------------------------------------------------------------------------------------
# kind: "embedding", "matrix", "norm" (init 1), "vector" (init normal), "identity" (router)


def _block_specs(prefix, d, n_heads, n_kv_heads, head_dim, d_ff, qk_norm):
    s = [
        (prefix + "attn_norm.weight", [d], "norm"),
        (prefix + "attn.wq.weight", [n_heads * head_dim, d], "matrix"),
        (prefix + "attn.wk.weight", [n_kv_heads * head_dim, d], "matrix"),
        (prefix + "attn.wv.weight", [n_kv_heads * head_dim, d], "matrix"),
        (prefix + "attn.wo.weight", [d, n_heads * head_dim], "matrix"),
    ]
    if qk_norm:
        s += [(prefix + "attn.q_norm.weight", [head_dim], "norm"),
              (prefix + "attn.k_norm.weight", [head_dim], "norm")]
    s += [
        (prefix + "ffn_norm.weight", [d], "norm"),
        (prefix + "ffn.w1.weight", [d_ff, d], "matrix"),
        (prefix + "ffn.w2.weight", [d, d_ff], "matrix"),
        (prefix + "ffn.w3.weight", [d_ff, d], "matrix"),
    ]
    return s


def _concept_path_specs(cfg):
    """Tensors of the concept path: pooling, backbone and the cross-attention term."""
    d, dc, hd = cfg.d_token, cfg.d_concept, cfg.head_dim
    s = [("pool.w_up.weight", [dc, d], "matrix")]
    for i in range(cfg.bb_layers):
        s += _block_specs(f"backbone.layers.{i}.", dc, cfg.bb_heads, cfg.bb_kv_heads, hd, cfg.bb_d_ff, cfg.qk_norm)
    s += [("backbone.norm.weight", [dc], "norm")]
    s += [
        ("xattn.null_concept", [dc], "vector"),
        ("xattn.norm.weight", [d], "norm"),
        ("xattn.wq.weight", [cfg.x_heads * hd, d], "matrix"),
        ("xattn.wk.weight", [cfg.x_kv_heads * hd, dc], "matrix"),
        ("xattn.wv.weight", [cfg.x_kv_heads * hd, dc], "matrix"),
        ("xattn.wo.weight", [d, cfg.x_heads * hd], "matrix"),
        ("xattn.q_norm.weight", [hd], "norm"),
        ("xattn.k_norm.weight", [hd], "norm"),
    ]
    return s


def _cross_ffn_specs(cfg):
    """The cross FFN block (the DLCM's, and the baseline control's with baseline_extras)."""
    d = cfg.d_token
    return [
        ("xattn.ffn_norm.weight", [d], "norm"),
        ("xattn.ffn.w1.weight", [cfg.x_d_ff, d], "matrix"),
        ("xattn.ffn.w2.weight", [d, cfg.x_d_ff], "matrix"),
        ("xattn.ffn.w3.weight", [cfg.x_d_ff, d], "matrix"),
    ]


def param_specs(cfg):
    """Ordered list of (name, shape, kind) for every parameter of the model. With
    concept_path = false (SPEC 4.9) the concept path's tensors (unused_specs) are not listed."""
    V, d, hd = cfg.vocab_size, cfg.d_token, cfg.head_dim
    s = [("tok_embeddings.weight", [V, d], "embedding")]
    if not cfg.is_dlcm and cfg.baseline_extras:
        k = cfg.layers_pre
        for i in range(k):
            s += _block_specs(f"encoder.layers.{i}.", d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm)
        s += [("encoder.norm.weight", [d], "norm")] + _cross_ffn_specs(cfg)
        for i in range(cfg.n_layers - k):
            s += _block_specs(f"decoder.layers.{i}.", d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm)
        s += [("norm.weight", [d], "norm"), ("lm_head.weight", [V, d], "matrix")]
        return s
    if not cfg.is_dlcm:
        for i in range(cfg.n_layers):
            s += _block_specs(f"layers.{i}.", d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm)
        s += [("norm.weight", [d], "norm"), ("lm_head.weight", [V, d], "matrix")]
        return s
    for i in range(cfg.enc_layers):
        s += _block_specs(f"encoder.layers.{i}.", d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm)
    s += [("encoder.norm.weight", [d], "norm")]
    if cfg.router["kind"] == "projected":
        s += [("router.wq.weight", [cfg.scan_dim, d], "identity"),
              ("router.wk.weight", [cfg.scan_dim, d], "identity")]
    if cfg.concept_path:
        s += _concept_path_specs(cfg)
    s += _cross_ffn_specs(cfg)
    for i in range(cfg.dec_layers):
        s += _block_specs(f"decoder.layers.{i}.", d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm)
    s += [("decoder.norm.weight", [d], "norm"), ("lm_head.weight", [V, d], "matrix")]
    return s


def unused_specs(cfg):
    """Tensors a checkpoint may carry although the model does not use them: the concept path's
    tensors under concept_path = false. load_checkpoint loads those present (they are
    parameters that never receive gradient), so either engine convention cross-checks."""
    if cfg.is_dlcm and not cfg.concept_path:
        return _concept_path_specs(cfg)
    return []


def mup_group(cfg, name, shape):
    """SPEC 6 parameter group of a tensor: ("token" | "concept" | "other", width multiplier s)."""
    if len(shape) != 2 or name in ("tok_embeddings.weight", "lm_head.weight"):
        return "other", 1.0
    base = cfg.mup["d_base"]
    concept = name.startswith("backbone.") or name in ("xattn.wk.weight", "xattn.wv.weight")
    if concept:
        return "concept", cfg.d_concept / base
    return "token", cfg.d_token / base


# ----------------------------------------------------------------------------------------------
# shared building blocks - SPEC section 2
# ----------------------------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear(x, W):
    return x @ W.t()


def rope(x, pos, theta):
    """Rotate-half RoPE. x [B, L, H, hd]; pos [L] integer positions.
    Dimension i (< hd/2) pairs with i + hd/2 and rotates by angle pos * theta^(-2i/hd).
    Angles, cos and sin are computed in float64 and rounded to x's dtype."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / hd)  # [half]
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # [L, half]
    cos = torch.cos(ang).to(x.dtype)[None, :, None, :]
    sin = torch.sin(ang).to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_at(x, pos, theta):
    """rope() with one position per vector: x [..., hd], pos integer [...] broadcastable to
    x.shape[:-1] (e.g. [L, 1] for x [L, H, hd])."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / hd)
    ang = pos.to(torch.float64)[..., None] * inv_freq
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(q, k, v, mask, bias=None):
    """Softmax attention with grouped-query heads (query head h uses kv head h // (Hq/Hkv)).
    q [B, Lq, Hq, hd], k/v [B, Lk, Hkv, hd], mask bool [B or 1, Lq, Lk] (True = may attend),
    bias optional additive [B or 1, Lq, Lk]. Scale 1/sqrt(hd). Returns [B, Lq, Hq*hd]."""
    B, Lq, Hq, hd = q.shape
    Hkv = k.shape[2]
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if bias is not None:
        scores = scores + bias[:, None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(B, Lq, Hq * hd)


def causal_mask(L, device=None):
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()[None]  # [1, L, L]


def window_mask(L, window):
    """Sliding-window causal mask (SPEC 4.9): token t sees s in (t - window, t]; 0 = full causal."""
    m = causal_mask(L)
    if window > 0:
        m = m & ~torch.ones(L, L, dtype=torch.bool).tril(-window)[None]  # drop t - s >= window
    return m


def swiglu_ffn(P, prefix, x):
    """w2( silu(w1 x) * (w3 x) )."""
    return linear(Fn.silu(linear(x, P[prefix + "w1.weight"])) * linear(x, P[prefix + "w3.weight"]),
                  P[prefix + "w2.weight"])


def self_attention(P, prefix, x, n_heads, n_kv_heads, head_dim, cfg, window=0):
    """Causal GQA self-attention with RoPE at positions 0..L-1 (optional QK-norm before RoPE);
    window > 0: token t attends only to s in (t - window, t]."""
    B, L, _ = x.shape
    q = linear(x, P[prefix + "wq.weight"]).view(B, L, n_heads, head_dim)
    k = linear(x, P[prefix + "wk.weight"]).view(B, L, n_kv_heads, head_dim)
    v = linear(x, P[prefix + "wv.weight"]).view(B, L, n_kv_heads, head_dim)
    if cfg.qk_norm:
        q = rmsnorm(q, P[prefix + "q_norm.weight"], cfg.norm_eps)
        k = rmsnorm(k, P[prefix + "k_norm.weight"], cfg.norm_eps)
    pos = torch.arange(L)
    q = rope(q, pos, cfg.rope_theta)
    k = rope(k, pos, cfg.rope_theta)
    out = attention(q, k, v, window_mask(L, window))
    return linear(out, P[prefix + "wo.weight"])


def block(P, prefix, x, n_heads, n_kv_heads, head_dim, cfg, window=0):
    """Pre-norm block: x += attn(attn_norm(x)); x += ffn(ffn_norm(x))."""
    x = x + self_attention(P, prefix + "attn.", rmsnorm(x, P[prefix + "attn_norm.weight"], cfg.norm_eps),
                           n_heads, n_kv_heads, head_dim, cfg, window)
    x = x + swiglu_ffn(P, prefix + "ffn.", rmsnorm(x, P[prefix + "ffn_norm.weight"], cfg.norm_eps))
    return x


def cross_entropy(logits, targets):
    """Mean token cross-entropy over targets >= 0 (0 when there are none). Returns (ce, count)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    t = targets.reshape(-1)
    keep = t >= 0
    n = int(keep.sum())
    if n == 0:
        return flat.sum() * 0.0, 0
    logp = torch.log_softmax(flat[keep], dim=-1)
    nll = -logp.gather(1, t[keep].long()[:, None])[:, 0]
    return nll.sum() / n, n


def default_targets(tokens):
    """Next-token targets: targets[:, t] = tokens[:, t+1]; the last position is ignored (-1)."""
    t = torch.full_like(tokens, -1)
    t[:, :-1] = tokens[:, 1:]
    return t


# ----------------------------------------------------------------------------------------------
# baseline - SPEC section 3
# ----------------------------------------------------------------------------------------------

def baseline_forward(P, cfg, tokens, targets=None):
    """Baseline; with baseline_extras the DLCM's token-path extras sit between the halves:
    encoder.layers -> H = encoder.norm -> X = H + ffn_x(xattn.ffn_norm(H)) -> decoder.layers."""
    x = P["tok_embeddings.weight"][tokens.long()]
    if cfg.baseline_extras:
        k = cfg.layers_pre
        for i in range(k):
            x = block(P, f"encoder.layers.{i}.", x, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg)
        H = rmsnorm(x, P["encoder.norm.weight"], cfg.norm_eps)
        x = H + swiglu_ffn(P, "xattn.ffn.", rmsnorm(H, P["xattn.ffn_norm.weight"], cfg.norm_eps))
        for i in range(cfg.n_layers - k):
            x = block(P, f"decoder.layers.{i}.", x, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg)
    for i in range(0 if cfg.baseline_extras else cfg.n_layers):
        x = block(P, f"layers.{i}.", x, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg)
    x = rmsnorm(x, P["norm.weight"], cfg.norm_eps)
    logits = linear(x, P["lm_head.weight"]) * cfg.logit_mult
    if targets is None:
        targets = default_targets(tokens)
    ce, _ = cross_entropy(logits, targets)
    return {"logits": logits, "loss": ce, "ce": ce}


# ----------------------------------------------------------------------------------------------
# DLCM - SPEC section 4
# ----------------------------------------------------------------------------------------------

COS_EPS = 1e-8      # cos(a, b) = a.b / max(|a| |b|, COS_EPS)
P_SMOOTH_MIN = 1e-4  # smoother gate clamp


def rule_boundaries(cfg, tokens, word_starts=None):
    """Rule routers (router.kind fixed | word): the 0/1 decision [B, L] (bool), forced included.
    fixed: b_t = [(t - s) % stride == 0], s = the last forced position <= t (row start, BOS);
    word: b_t = word_starts[token_t] (a [V] 0/1 table from the tokenizer) or forced."""
    B, L = tokens.shape
    forced = tokens == cfg.bos_id
    forced[:, 0] = True
    if cfg.router["kind"] == "word":
        if word_starts is None:
            raise ValueError("router.kind = word needs the tokenizer's word-start table "
                             "(pass word_starts=[V] 0/1)")
        ws = torch.as_tensor(word_starts).to(torch.bool)
        return forced | ws[tokens.long()]
    b = torch.zeros(B, L, dtype=torch.bool)
    for r in range(B):
        s = 0
        for t in range(L):
            if bool(forced[r, t]):
                s = t
            b[r, t] = (t - s) % cfg.router["stride"] == 0
    return b


def router_probs(P, cfg, H, tokens, word_starts=None):
    """p [B, L] and forced [B, L] (bool). p_t = clamp((1 - cos(q_{t-1}, k_t)) / 2, 0, 1);
    p_t = 1 exactly at t = 0 and wherever tokens[t] == bos_id (forced boundaries). Rule routers:
    p = the rule's 0/1 decision (no gradient)."""
    if cfg.router["kind"] in ("fixed", "word"):
        forced = tokens == cfg.bos_id
        forced[:, 0] = True
        return rule_boundaries(cfg, tokens, word_starts).to(H.dtype), forced
    if cfg.router["kind"] == "projected":
        q = linear(H, P["router.wq.weight"])
        k = linear(H, P["router.wk.weight"])
    else:  # "raw": the hidden states themselves
        q, k = H, H
    qp, kt = q[:, :-1], k[:, 1:]  # q_{t-1}, k_t for t = 1..L-1
    dot = (qp * kt).sum(-1)
    nrm = qp.pow(2).sum(-1).sqrt() * kt.pow(2).sum(-1).sqrt()
    cos = dot / torch.clamp(nrm, min=COS_EPS)
    p_rest = torch.clamp((1.0 - cos) / 2.0, 0.0, 1.0)
    B, L = tokens.shape
    p = torch.cat([torch.ones(B, 1, dtype=H.dtype), p_rest], dim=1)
    forced = tokens == cfg.bos_id
    forced[:, 0] = True
    p = torch.where(forced, torch.ones_like(p), p)
    return p, forced


def segments_of_row(b_row):
    """b_row: list/array of 0/1 with b[0] = 1. Returns list of (start, end) half-open spans."""
    starts = [t for t, v in enumerate(b_row) if v]
    ends = starts[1:] + [len(b_row)]
    return list(zip(starts, ends))


def smoother_gate(forced, p_sm, s, dtype):
    """P_j of a concept starting at s: 1 exactly at a forced start, else clamp(p_s, 1e-4, 1-1e-4).
    p_sm None: smoother off (config smoother = false), every gate 1 and zs = z."""
    if p_sm is None or bool(forced[s]):
        return torch.ones((), dtype=dtype)
    return torch.clamp(p_sm[s], P_SMOOTH_MIN, 1.0 - P_SMOOTH_MIN)


def smooth_row(Z, spans, forced, p_sm):
    """Smoother of one row: zs_j = P_j z_j + (1 - P_j) zs_{j-1}, zs_{-1} = 0, with
    P_j = 1 exactly when concept j starts at a forced position, else clamp(p_start, 1e-4, 1-1e-4).
    Z [Mmax, dc] (padding rows beyond len(spans) ignored); returns [len(spans), dc]."""
    prev = torch.zeros(Z.shape[-1], dtype=Z.dtype)
    out = []
    for j, (s, _) in enumerate(spans):
        Pj = smoother_gate(forced, p_sm, s, Z.dtype)
        cur = Pj * Z[j] + (1.0 - Pj) * prev
        out.append(cur)
        prev = cur
    return torch.stack(out)


def backbone(P, cfg, C):
    """Concept backbone: C [N, M, d_concept] -> Z = bb.norm(blocks(C)), causal over concepts,
    RoPE positions = concept index 0..M-1."""
    z = C
    for i in range(cfg.bb_layers):
        z = block(P, f"backbone.layers.{i}.", z, cfg.bb_heads, cfg.bb_kv_heads, cfg.head_dim, cfg)
    return rmsnorm(z, P["backbone.norm.weight"], cfg.norm_eps)


def prefix_own_concepts(P, cfg, H, spans, seg, C, ZS, forced, p_sm):
    """concept_repr = prefix_mean with inclusive visibility (SPEC 4.9): the own concept of token t
    (j = seg(t)) evaluated on its prefix, zs_j(t) = P_j z_j(t) + (1 - P_j) zs_{j-1}, where
    z_j(t) is the backbone output at position j of [c_0 .. c_{j-1}, c_j(t)],
    c_j(t) = W_up mean_{start_j <= i <= t} h_i, and c_k, zs_k (k < j) are the closed concepts.
    Straightforward and slow: one backbone sequence per token (B*L sequences of length Mmax,
    zero-padded after position j, which the causal backbone ignores). Returns [B, L, d_concept]."""
    B, L, _ = H.shape
    Mmax, dc = C.shape[1], C.shape[2]
    seqs = []
    for r in range(B):
        for t in range(L):
            j = int(seg[r, t])
            s0 = spans[r][j][0]
            c_t = linear(H[r, s0:t + 1].mean(dim=0), P["pool.w_up.weight"])
            seqs.append(torch.cat([C[r, :j], c_t[None], torch.zeros(Mmax - j - 1, dc, dtype=C.dtype)]))
    Zp = backbone(P, cfg, torch.stack(seqs)).view(B, L, Mmax, dc)
    own = []
    for r in range(B):
        row = []
        for t in range(L):
            j = int(seg[r, t])
            prev = ZS[r][j - 1] if j > 0 else torch.zeros(dc, dtype=C.dtype)
            Pj = smoother_gate(forced[r], None if p_sm is None else p_sm[r], spans[r][j][0], C.dtype)
            row.append(Pj * Zp[r, t, j] + (1.0 - Pj) * prev)
        own.append(torch.stack(row))
    return torch.stack(own)


def xattn_kv(Zsrc, P, cfg):
    """Cross-attention keys (with k_norm) and values of concept vectors Zsrc [..., dc]."""
    shp = Zsrc.shape[:-1] + (cfg.x_kv_heads, cfg.head_dim)
    k = rmsnorm(linear(Zsrc, P["xattn.wk.weight"]).view(shp), P["xattn.k_norm.weight"], cfg.norm_eps)
    v = linear(Zsrc, P["xattn.wv.weight"]).view(shp)
    return k, v


def attend_per_query(q, kv_src, mask, bias, P, cfg, kpos=None):
    """Cross-attention where every query has its own key/value list.
    q [L, Hq, hd]; kv_src [L, S, dc]; mask bool [L, S]; bias [L, S] or None; kpos [S] key
    positions (xattn_rope). Returns [L, Hq*hd]."""
    k, v = xattn_kv(kv_src, P, cfg)  # [L, S, Hkv, hd]
    return xattn_attend(q, k, v, mask, bias, kpos, cfg)


def xattn_attend(q, k, v, mask, bias, kpos, cfg):
    """The concept attention of one row. q [L, Hq, hd]; k/v [S, Hkv, hd] (shared by the
    queries) or [L, S, Hkv, hd] (per query); mask bool [L, S]; bias [L, S] or None.
    xattn_rope: query t is rotated by t, key s by kpos[s] (the start of its concept), and a key
    with kpos[s] < 0 (z_null) by the query's own position t, so its score is position-free."""
    L = q.shape[0]
    if not cfg.xattn_rope:
        if k.dim() == 3:
            return attention(q[None], k[None], v[None], mask[None], None if bias is None else bias[None])[0]
        return attention(q[:, None], k, v, mask[:, None], None if bias is None else bias[:, None])[:, 0]
    bias = None if bias is None else bias[:, None]
    t = torch.arange(L)
    kpos = torch.as_tensor(kpos, dtype=torch.long)
    if k.dim() == 3:
        k = k[None].expand(L, *k.shape)
        v = v[None].expand(L, *v.shape)
    pos = torch.where(kpos[None, :] < 0, t[:, None], kpos[None, :])  # [L, S]
    q = rope_at(q, t[:, None], cfg.rope_theta)
    k = rope_at(k, pos[..., None], cfg.rope_theta)
    return attention(q[:, None], k, v, mask[:, None], bias)[:, 0]


def list_positions(seg, M1):
    """Key positions of the list entries [z_null, zs_0, ..] of one row for xattn_rope: -1 for
    z_null, start_k for zs_k."""
    _, start = segment_sizes([int(s) for s in seg], M1)
    return [-1] + [start[k] for k in range(M1 - 1)]


def xattn_replicate(q, Zlist, seg, P, cfg):
    """Leak-free causal cross-attention, `replicate` form (the definition, SPEC 4.7).
    q [L, Hq, hd] normalised queries of one row; Zlist [M+1, dc] = [z_null, zs_0, ...];
    seg [L] segment index of each token. Position s carries list entry seg(s) (= concept
    seg(s)-1); token t attends to positions s <= t with the ordinary causal mask."""
    L = q.shape[0]
    hd = cfg.head_dim
    kv_src = Zlist[seg]  # [L, dc], replicated
    k = linear(kv_src, P["xattn.wk.weight"]).view(L, cfg.x_kv_heads, hd)
    v = linear(kv_src, P["xattn.wv.weight"]).view(L, cfg.x_kv_heads, hd)
    k = rmsnorm(k, P["xattn.k_norm.weight"], cfg.norm_eps)
    kpos = [list_positions(seg, Zlist.shape[0])[int(e)] for e in seg]  # copies share start_j
    return xattn_attend(q, k, v, causal_mask(L)[0], None, kpos, cfg)  # [L, Hq*hd]


def segment_sizes(seg, n):
    """(size, start) of segments 0..n-1 of one row (segments beyond the row: size 0)."""
    size = [0] * n
    start = [None] * n
    for t, s in enumerate(int(v) for v in seg):
        size[s] += 1
        if start[s] is None:
            start[s] = t
    return size, start


def xattn_compact(q, Zlist, seg, P, cfg):
    """The same function over the M+1 unique list entries with an additive log(multiplicity)
    bias: token t sees entries k = 0..seg(t); entry k < seg(t) is carried by the |S_k| positions
    of segment k, entry seg(t) by the t - start(S_seg(t)) + 1 positions of its segment so far."""
    L = q.shape[0]
    M1 = Zlist.shape[0]
    hd = cfg.head_dim
    k = linear(Zlist, P["xattn.wk.weight"]).view(M1, cfg.x_kv_heads, hd)
    v = linear(Zlist, P["xattn.wv.weight"]).view(M1, cfg.x_kv_heads, hd)
    k = rmsnorm(k, P["xattn.k_norm.weight"], cfg.norm_eps)
    seg_l = [int(s) for s in seg]
    size, start = segment_sizes(seg_l, M1)
    mult = torch.zeros(L, M1, dtype=q.dtype)
    for t in range(L):
        for kk in range(seg_l[t]):
            mult[t, kk] = size[kk]
        mult[t, seg_l[t]] = t - start[seg_l[t]] + 1
    mask = mult > 0
    bias = torch.where(mask, torch.log(torch.clamp(mult, min=1.0)), torch.zeros_like(mult))
    return xattn_attend(q, k, v, mask, bias, list_positions(seg, M1), cfg)


def xattn_inclusive_replicate(q, Zlist, seg, own, P, cfg):
    """Inclusive visibility (SPEC 4.9), replicate form. Zlist [M+1, dc] = [z_null, zs_0, ...].
    own None (concept_repr first): slot 0 carries z_null and is visible to all, slot s+1 carries
    zs_{seg(s)}; token t attends slots 0..t+1 (ordinary causal mask shifted by the null slot).
    own [L, dc] (prefix_mean): the same, except that for query t every slot of its own concept
    carries own[t] = zs_j(t) (per-query keys)."""
    L = q.shape[0]
    slots = Zlist[seg + 1]  # [L, dc]: slot s+1 carries zs_{seg(s)}
    mask = torch.ones(L, L + 1, dtype=torch.bool).tril(1)  # query t sees slots 0..t+1
    lpos = list_positions(seg, Zlist.shape[0])
    kpos = [-1] + [lpos[int(e) + 1] for e in seg]  # slot s+1 at start_{seg(s)}
    if own is None:
        k, v = xattn_kv(torch.cat([Zlist[:1], slots]), P, cfg)
        return xattn_attend(q, k, v, mask, None, kpos, cfg)
    same = (seg[None, :] == seg[:, None])[..., None]  # [t, s, 1]: slot s+1 is t's own concept
    per_q = torch.where(same, own[:, None, :], slots[None, :, :])  # [L(t), L(s), dc]
    kv_src = torch.cat([Zlist[:1][None].expand(L, 1, -1), per_q], dim=1)  # [L, L+1, dc]
    return attend_per_query(q, kv_src, mask, None, P, cfg, kpos)


def xattn_inclusive_compact(q, Zlist, seg, own, P, cfg):
    """Inclusive visibility, compact form: token t (j = seg(t)) attends list entries 0..j+1 with
    an additive log(multiplicity) bias: z_null (mult 1), zs_k for k < j (mult |S_k|) and its own
    concept (entry j+1, mult t - start_j + 1), whose value is zs_j (own None) or own[t]."""
    L = q.shape[0]
    M1 = Zlist.shape[0]
    seg_l = [int(s) for s in seg]
    size, start = segment_sizes(seg_l, M1)
    mult = torch.zeros(L, M1, dtype=q.dtype)
    for t in range(L):
        j = seg_l[t]
        mult[t, 0] = 1
        for kk in range(j):
            mult[t, kk + 1] = size[kk]
        mult[t, j + 1] = t - start[j] + 1
    mask = mult > 0
    bias = torch.where(mask, torch.log(torch.clamp(mult, min=1.0)), torch.zeros_like(mult))
    kv_src = Zlist[None].expand(L, M1, -1)
    if own is not None:
        is_own = Fn.one_hot(seg + 1, M1).to(torch.bool)[..., None]  # [L, M1, 1]
        kv_src = torch.where(is_own, own[:, None, :], kv_src)
    return attend_per_query(q, kv_src, mask, bias, P, cfg, list_positions(seg, M1))


def concept_term(P, cfg, H, spans, seg, forced, p_sm, xattn_impl, ablation=None):
    """Steps 4-7: pooling, backbone, smoother and the cross-attention term Wo_x attn [B, L, d].
    ablation (concept-usage diagnostics, see diagnostics.py): None; "null" = every concept entry
    the decoder sees replaced by z_null; "shuffle" = row r sees row (r+1) mod B's concept list
    (truncated to M_r, padded with z_null), own-concept entries included."""
    B, L, d = H.shape
    dt = H.dtype
    hd = cfg.head_dim
    M = [len(s) for s in spans]
    Mmax = max(M)

    # 4. pooling; rows padded with zero concepts to Mmax
    rows = []
    for r in range(B):
        if cfg.concept_repr == "first":  # c_j = W_up h_{start(S_j)}
            vecs = [H[r, s] for (s, _) in spans[r]]
        else:  # mean; prefix_mean: the prefix of a closed concept is the whole concept
            vecs = [H[r, s:e].mean(dim=0) for (s, e) in spans[r]]
        vecs += [torch.zeros(d, dtype=dt)] * (Mmax - M[r])
        rows.append(torch.stack(vecs))
    C = linear(torch.stack(rows), P["pool.w_up.weight"])  # [B, Mmax, d_concept]

    # 5. concept backbone; 6. smoother
    Z = backbone(P, cfg, C)  # [B, Mmax, d_concept]
    ZS = [smooth_row(Z[r], spans[r], forced[r], None if p_sm is None else p_sm[r])
          for r in range(B)]  # [M_r, d_concept]
    inclusive = cfg.concept_visibility == "inclusive"
    own = None
    if inclusive and cfg.concept_repr == "prefix_mean" and ablation is None:
        own = prefix_own_concepts(P, cfg, H, spans, seg, C, ZS, forced, p_sm)

    # 7. causal cross-attention with the null concept
    Hn = rmsnorm(H, P["xattn.norm.weight"], cfg.norm_eps)
    q = linear(Hn, P["xattn.wq.weight"]).view(B, L, cfg.x_heads, hd)
    q = rmsnorm(q, P["xattn.q_norm.weight"], cfg.norm_eps)
    null = P["xattn.null_concept"][None]
    att = []
    for r in range(B):
        if ablation is None:
            Zlist = torch.cat([null, ZS[r]], dim=0)  # [M_r + 1, dc]
        elif ablation == "null":
            Zlist = null.expand(M[r] + 1, -1)
        elif ablation == "shuffle":
            src = ZS[(r + 1) % B][:M[r]]
            Zlist = torch.cat([null, src, null.expand(M[r] - src.shape[0], -1)], dim=0)
        else:
            raise ValueError(f"unknown concept ablation {ablation!r}")
        if inclusive:
            xfn = {"replicate": xattn_inclusive_replicate, "compact": xattn_inclusive_compact}[xattn_impl]
            att.append(xfn(q[r], Zlist, seg[r], None if own is None else own[r], P, cfg))
        else:
            xfn = {"replicate": xattn_replicate, "compact": xattn_compact}[xattn_impl]
            att.append(xfn(q[r], Zlist, seg[r], P, cfg))
    att = torch.stack(att)  # [B, L, x_heads*hd]
    return linear(att, P["xattn.wo.weight"])


# ----------------------------------------------------------------------------------------------
# training boundaries and the Global Parser - SPEC 4.2 and the loss
# ----------------------------------------------------------------------------------------------

def _splitmix64(x):
    """src/core/rng.h splitmix64 on a uint64 array (arithmetic mod 2^64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed, a, b, c, d=0):
    """The engine's counter_uniform(seed, a, b, c, d) in [0, 1) (24 bits, exact in float32),
    elementwise over integer arrays a, b, c, d (broadcast)."""
    u64 = lambda v: np.asarray(v, dtype=np.uint64)  # noqa: E731
    with np.errstate(over="ignore"):
        h = _splitmix64(u64(seed) ^ np.uint64(0x6A09E667F3BCC908))
        h = _splitmix64(h ^ u64(a))
        h = _splitmix64(h ^ (u64(b) + np.uint64(0x3C6EF372FE94F82B)))
        h = _splitmix64(h ^ (u64(c) + np.uint64(0xA54FF53A5F1D36F1)))
        h = _splitmix64(h ^ (u64(d) + np.uint64(0x510E527FADE682D1)))
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def boundary_prob(p, alpha):
    """sigmoid(logit(p) / alpha) computed in float64 from float32 p and rounded to float32;
    p <= 0 (or NaN) -> 0, p >= 1 -> 1 exactly."""
    p64 = np.asarray(p, dtype=np.float32).astype(np.float64)
    inner = np.clip(p64, 1e-300, 1.0 - 1e-16)
    with np.errstate(over="ignore", divide="ignore"):
        x = (np.log(inner) - np.log1p(-inner)) / float(alpha)
        pr = 1.0 / (1.0 + np.exp(-x))
    pr = np.where(p64 >= 1.0, 1.0, np.where(p64 > 0.0, pr, 0.0))
    return pr.astype(np.float32)


def sample_boundaries(p, forced, alpha, seed, step, row0=0):
    """Training samples (SPEC 4.2): b_t = [u < sigmoid(logit(p_t) / alpha)] with
    u = counter_uniform(seed, step, row0 + r, t), so a step can be recomputed exactly and a
    micro-batch whose first row is global row row0 of the step draws what that row draws in one
    big batch. Forced positions are boundaries. p, forced [B, L]; returns bool [B, L]."""
    B, L = p.shape
    rows = (np.arange(B, dtype=np.uint64) + np.uint64(row0))[:, None]
    cols = np.arange(L, dtype=np.uint64)[None, :]
    u = counter_uniform(seed, step, rows, cols)
    pr = boundary_prob(p.detach().float().cpu().numpy(), alpha)
    b = torch.from_numpy(u < pr).to(forced.device)
    return b | forced


def global_parser_loss(F, G, R):
    """L_aux = R/(R-1) [(R-1) F G + (1-F)(1-G)] - 1 (SPEC 4, the loss)."""
    return R / (R - 1.0) * ((R - 1.0) * F * G + (1.0 - F) * (1.0 - G)) - 1.0


def encode_and_route(P, cfg, tokens, word_starts=None):
    """Steps 1-2: H = encoder output [B, L, d_token], p [B, L] and forced [B, L] (bool)."""
    x = P["tok_embeddings.weight"][tokens.long()]
    for i in range(cfg.enc_layers):
        x = block(P, f"encoder.layers.{i}.", x, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg,
                  cfg.enc_window)
    H = rmsnorm(x, P["encoder.norm.weight"], cfg.norm_eps)
    p, forced = router_probs(P, cfg, H, tokens, word_starts)
    return H, p, forced


def dlcm_forward(P, cfg, tokens, targets=None, boundaries=None, xattn_impl="replicate",
                 p_smoother_override=None, concept_ablation=None, word_starts=None):
    """DLCM forward. tokens [B, L] int. boundaries: optional [B, L] 0/1 (the given training
    samples b), or a function (p, forced) -> b (e.g. sample_boundaries, called with p detached);
    None -> b = [p >= tau] (inference). Forced positions always have b = 1.
    p_smoother_override: optional constant [B, L] used in place of p by the smoother (only for
    finite-difference tests of the detached-gate gradient). concept_ablation: see concept_term.
    word_starts: the tokenizer's [V] 0/1 word-start table (router.kind = word only).
    Besides the outputs, returns "H" (encoder output) and "xattn_out" (Wo_x attn; zero without
    the concept path) for the diagnostics."""
    B, L = tokens.shape
    eps = cfg.norm_eps
    hd = cfg.head_dim
    dt = P["tok_embeddings.weight"].dtype

    # 1. encoder (H [B, L, d_token]); 2. boundary predictor
    H, p, forced = encode_and_route(P, cfg, tokens, word_starts)
    if cfg.rule_router:  # the rule decides, in training and inference alike
        b = p.detach() > 0.5
    elif boundaries is None:
        b = p.detach() >= cfg.router["tau"]
    elif callable(boundaries):
        b = boundaries(p.detach(), forced)
    else:
        b = boundaries.to(torch.bool).clone()
    b = b | forced  # forced boundaries are always boundaries

    # 3. segments
    seg = torch.cumsum(b.long(), dim=1) - 1  # [B, L]
    spans = [segments_of_row(b[r].tolist()) for r in range(B)]
    M = [len(s) for s in spans]

    # 4-7. concept path: Psi = H + Wo_x attn (concept_path = false: Psi = H)
    if not cfg.smoother:
        p_sm = None
    elif p_smoother_override is not None:
        p_sm = p_smoother_override
    elif cfg.router["smooth_grad"]:
        p_sm = p
    else:
        p_sm = p.detach()
    if cfg.concept_path:
        xo = concept_term(P, cfg, H, spans, seg, forced, p_sm, xattn_impl, concept_ablation)
        Psi = H + xo
    else:
        xo = torch.zeros_like(H)
        Psi = H
    X = Psi + swiglu_ffn(P, "xattn.ffn.", rmsnorm(Psi, P["xattn.ffn_norm.weight"], eps))

    # 8. decoder
    for i in range(cfg.dec_layers):
        X = block(P, f"decoder.layers.{i}.", X, cfg.n_heads, cfg.n_kv_heads, hd, cfg, cfg.dec_window)
    X = rmsnorm(X, P["decoder.norm.weight"], eps)
    logits = linear(X, P["lm_head.weight"]) * cfg.logit_mult

    # loss
    if targets is None:
        targets = default_targets(tokens)
    ce, _ = cross_entropy(logits, targets)
    R = float(cfg.target_R)
    Fb = b.to(dt).mean()  # no gradient (b is discrete)
    G = p.mean()          # over every token position, forced ones included
    if cfg.rule_router:  # no auxiliary loss for rules (F is still the realised compression)
        aux = torch.zeros((), dtype=dt)
    elif cfg.aux_kind == "sequence":  # per row (F_r, G_r), averaged over rows
        aux = global_parser_loss(b.to(dt).mean(dim=1), p.mean(dim=1), R).mean()
    else:
        aux = global_parser_loss(Fb, G, R)
    loss = ce + cfg.aux_weight * aux
    return {"logits": logits, "loss": loss, "ce": ce, "aux": aux, "p": p, "b": b.to(dt),
            "F": Fb, "G": G, "seg": seg, "n_concepts": torch.tensor(M), "H": H, "xattn_out": xo}


def forward(P, cfg, tokens, targets=None, boundaries=None, xattn_impl="replicate", **kw):
    if cfg.is_dlcm:
        return dlcm_forward(P, cfg, tokens, targets, boundaries, xattn_impl, **kw)
    return baseline_forward(P, cfg, tokens, targets)

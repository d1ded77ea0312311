#!/usr/bin/env python3
"""Where a model trained on the copy task (scripts/make_copy_corpus.py) copies, and where a DLCM
loses the copy: validation CE by role in the line, the boundary rate at each line position, the
smoother gate at concept starts, |Wo att| / |H|, and the concept attention's mass for the queries
that predict a copied letter (on z_null, the own concept, the previous list entry and the concept
that holds the copy source). Runs the checkpoint through the PyTorch reference (python/dlcm_ref)
with inference boundaries on the first --rows windows of --seq tokens of DATA/val.bin.

A line is WORD SEP WORD "\\n" with SEP = " " or " " + GAP dots + " "; a letter of the second copy
is "copyable" when its source (the same letter of the first copy) lies inside the window.

usage: /usr/bin/python3 scripts/copy_probe.py --ckpt RUN --data DIR [--width 8] [--gap 0]
                                              [--rows 24] [--seq 64] [--json OUT]
"""
import argparse
import json
import math
import os
import string
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import dlcm_ref  # noqa: E402
from dlcm_ref import model as M  # noqa: E402

NEWLINE = ord("\n") + 4  # the bytes tokenizer's id of a byte b is b + 4 (ids 0-3 are special)


def read_val_tokens(path):
    """Token ids of a token shard (src/data/shards.h: 64-byte header, then 2- or 4-byte ids)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) != 64 or head[:8] != b"DLCMTOK\0":
            raise SystemExit(f"{path}: not a dlcm token shard (magic DLCMTOK expected)")
        width, = struct.unpack_from("<I", head, 12)
        count, = struct.unpack_from("<Q", head, 24)
        if width not in (2, 4):
            raise SystemExit(f"{path}: element width {width}, expected 2 or 4")
        a = np.frombuffer(f.read(), dtype=np.uint16 if width == 2 else np.uint32)
    if a.size != count:
        raise SystemExit(f"{path}: header says {count} tokens, file holds {a.size}")
    return a.astype(np.int64)


def line_roles(toks):
    """[B, L] role of each position: its position in its line (0 = first letter of the first copy),
    -1 where the line start is not inside the window or the token is a newline."""
    B, L = toks.shape
    role = torch.full((B, L), -1)
    for r in range(B):
        start = None
        for t in range(L):
            if int(toks[r, t]) == NEWLINE:
                start = t + 1
                continue
            if start is not None:
                role[r, t] = t - start
    return role


class AttentionRecorder:
    """Records the softmax of the concept cross-attention: one call of xattn_attend per row."""

    def __init__(self):
        self.on = False
        self.probs = []
        self._att, self._xa = M.attention, M.xattn_attend

        def att(q, k, v, mask, bias=None):
            if self.on:
                rep = q.shape[2] // k.shape[2]
                kk = k.repeat_interleave(rep, dim=2)
                s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[3])
                if bias is not None:
                    s = s + bias[:, None]
                s = s.masked_fill(~mask[:, None], float("-inf"))
                self.probs.append(torch.softmax(s, -1))
            return self._att(q, k, v, mask, bias)

        def xa(*a, **kw):
            self.on = True
            try:
                return self._xa(*a, **kw)
            finally:
                self.on = False

        M.attention, M.xattn_attend = att, xa


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run folder (with checkpoint/) or checkpoint folder")
    ap.add_argument("--data", required=True, help="prepared folder of the copy corpus (bytes tokenizer)")
    ap.add_argument("--width", type=int, default=8, help="letters per word (make_copy_corpus --width)")
    ap.add_argument("--gap", type=int, default=0, help="dots between the copies (make_copy_corpus --gap)")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", help="also write the figures as JSON here")
    a = ap.parse_args()
    if a.width < 1 or a.gap < 0 or a.rows < 1 or a.seq < 2:
        ap.error("--width, --rows >= 1, --gap >= 0, --seq >= 2 expected")
    ck = a.ckpt if os.path.exists(os.path.join(a.ckpt, "config.json")) else os.path.join(a.ckpt, "checkpoint")
    cfg, P = dlcm_ref.load_checkpoint(ck)
    ids = read_val_tokens(os.path.join(a.data, "val.bin"))
    if ids.size < a.rows * a.seq:
        raise SystemExit(f"{a.data}/val.bin: {ids.size} tokens, --rows x --seq = {a.rows * a.seq} needed")
    toks = torch.tensor(ids[: a.rows * a.seq].reshape(a.rows, a.seq))
    c0 = a.width + a.gap + 2 if a.gap else a.width + 1  # line position of the second copy
    rec = AttentionRecorder()
    kw = {}
    if cfg.is_dlcm and cfg.router["kind"] == "word":  # the bytes tokenizer's word-start table
        punct = set(string.punctuation) | set(string.whitespace)
        kw["word_starts"] = torch.tensor([0] * 4 + [int(b < 128 and chr(b) in punct) for b in range(256)]
                                         + [0] * (cfg.vocab_size - 260))
    with torch.no_grad():
        out = M.forward(P, cfg, toks, xattn_impl="compact", **kw)
    logp = torch.log_softmax(out["logits"].double(), -1)
    nll = -logp[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]  # prediction of t + 1 made at t
    role = line_roles(toks)[:, 1:]  # role of the predicted token
    # the layout check: every second-copy letter equals the letter c0 positions earlier
    tgt = toks[:, 1:]
    second = (role >= c0) & (role < c0 + a.width)
    src = torch.roll(tgt, c0, dims=1)
    bad = int((second & (tgt != src)).sum())
    if not second.any() or bad:
        raise SystemExit(f"{a.data}: --width {a.width} --gap {a.gap} do not match the corpus ({bad} of "
                         f"{int(second.sum())} second-copy letters differ from their source); pass the "
                         "values given to make_copy_corpus.py")
    groups = {"first_letter": role == 0,
              "other_letters_of_first_copy": (role >= 1) & (role < a.width),
              "second_copy": (role >= c0) & (role < c0 + a.width),
              # spaces, dots and newlines: free to a model that knows where it is in the line
              "separators": ((role >= a.width) & (role < c0)) | (tgt == NEWLINE)}
    rep = {"ckpt": ck, "ce": float(nll.mean()), "ce_by_role": {}, "count_by_role": {}}
    for k, m in groups.items():
        rep["ce_by_role"][k] = float(nll[m].mean()) if m.any() else None
        rep["count_by_role"][k] = int(m.sum())
    if cfg.is_dlcm and cfg.concept_path:
        b = out["b"]
        L = a.seq
        rep["compression"] = float(b.numel() / b.sum())
        rep["boundary_rate_by_line_position"] = [
            float(b[:, 1:][role == p].mean()) if (role == p).any() else None for p in range(c0 + a.width)]
        rep["smoother_gate_at_starts"] = float(out["p"][b.bool()].mean())
        rep["xattn_ratio"] = float(out["xattn_out"].norm(dim=-1).mean() / out["H"].norm(dim=-1).mean())
        incl = cfg.concept_visibility == "inclusive"
        seg = out["seg"]
        xprobs = rec.probs
        mass = {"z_null": [], "own": [], "previous": [], "source": []}
        for r in range(a.rows):
            A = xprobs[r]
            A = A[0].permute(1, 0, 2) if A.shape[0] == 1 else A[:, :, 0, :]  # [L, heads, entries]
            for t in range(L - 1):
                lp = int(role[r, t])
                if not (c0 <= lp < c0 + a.width) or t + 1 - c0 < 0:
                    continue
                j, js = int(seg[r, t]), int(seg[r, t + 1 - c0])
                zero = torch.zeros(A.shape[1])
                # list entry k + 1 holds concept k; shifted visibility shows concepts < seg(t)
                mass["z_null"].append(A[t, :, 0])
                mass["own"].append(A[t, :, j + 1] if incl else zero)
                mass["previous"].append(A[t, :, j] if j >= 1 else zero)
                mass["source"].append(A[t, :, js + 1] if (incl or js < j) else zero)
        rep["copy_query_attention_by_head"] = {
            k: [float(x) for x in torch.stack(v).mean(0)] if v else None for k, v in mass.items()}
    print(f"{ck}: CE {rep['ce']:.4f}")
    for k in groups:
        ce = rep["ce_by_role"][k]
        print(f"  {k:28s} CE {'-' if ce is None else f'{ce:.3f}'}  (n={rep['count_by_role'][k]})")
    if "compression" in rep:
        print(f"  compression {rep['compression']:.2f}, smoother gate at starts {rep['smoother_gate_at_starts']:.3f},"
              f" |Wo att|/|H| {rep['xattn_ratio']:.3f}")
        print("  boundary rate by line position:",
              " ".join("-" if x is None else f"{x:.2f}" for x in rep["boundary_rate_by_line_position"]))
        for k, v in rep["copy_query_attention_by_head"].items():
            print(f"  copy queries' attention on {k:9s}", "-" if v is None else " ".join(f"{x:.2f}" for x in v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()

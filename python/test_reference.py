#!/usr/bin/python3
"""Self-check of the PyTorch reference (plain script; exits non-zero on failure).

  /usr/bin/python3 python/test_reference.py [NAME_SUBSTRING...]

Checks: safetensors round trip; reference.py CLI outputs for both architectures and the DLCM
variants; float64 finite-difference gradients (including the detached smoother gate, the aux-loss
gradient on p and router.smooth_grad); causality (a future token or boundary changes nothing at
earlier positions); replicate == compact cross-attention (and the multiplicity formula); one AdamW
step against a hand-written update with weight-decay groups and global-norm clipping.
SPEC 4.9 research variants (concept_repr, concept_visibility, enc/dec_window, concept_path):
CLI, finite differences, causality, replicate == compact, the inclusive cross-attention written
out by hand, windows >= L == full attention, far information only via the concepts; and the
concept-usage diagnostics (dlcm_ref/diagnostics.py).
Controls (issue 20 section 3): rule routers (fixed stride, word starts) exactly as defined,
the per-sequence ratio loss and its gradient on p, smoother off, the baseline with the DLCM's
token-path extras: finite differences and causality for each.
"""
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dlcm_ref as R  # noqa: E402
import make_fixture  # noqa: E402
from dlcm_ref import diagnostics as Diag  # noqa: E402
from dlcm_ref import model as Mdl  # noqa: E402

torch.set_num_threads(2)
FAILS = []
TMP = tempfile.mkdtemp(prefix="dlcm_ref_test_")


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def run_test(fn):
    name = fn.__name__
    t0 = time.time()
    try:
        fn()
        print(f"[ OK ] {name} ({time.time() - t0:.1f} s)", flush=True)
    except Exception:  # noqa: BLE001
        print(f"[FAIL] {name}", flush=True)
        traceback.print_exc()
        FAILS.append(name)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def fixture(arch, name, sets=(), rows=3, L=24, seed=0, init_std=0.3):
    d = os.path.join(TMP, name)
    cfg, params, tokens = make_fixture.build(arch, d, seed=seed, rows=rows, L=L, init_std=init_std,
                                             sets=sets)
    return d, cfg, params, tokens


def run_cli(*args):
    cmd = [sys.executable, os.path.join(HERE, "reference.py")] + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    check(r.returncode == 0, f"reference.py failed: {' '.join(cmd)}\n{r.stderr}")
    return r


def to64(params):
    return {k: v.detach().to(torch.float64) for k, v in params.items()}


DLCM_VARIANTS = {
    "dlcm_projected": [],
    "dlcm_raw": ['router.kind="raw"', "qk_norm=false", "dec_layers=0"],
    "dlcm_smooth": ["router.smooth_grad=true", "d_scan=0"],
    "dlcm_mha": ["n_kv_heads=4", "bb_kv_heads=3", "x_kv_heads=4", "logit_mult=0.5"],
}

# SPEC 4.9 research variants
FIRST_INCL = ['concept_repr="first"', 'concept_visibility="inclusive"']
PREFIX_INCL = ['concept_repr="prefix_mean"', 'concept_visibility="inclusive"']
RESEARCH_VARIANTS = {
    "first": ['concept_repr="first"'],
    "first_inclusive": FIRST_INCL,
    "prefix_inclusive": PREFIX_INCL + ["router.smooth_grad=true"],
    "windows": ["enc_window=3", "dec_window=2"],
    "no_concept_path": ["concept_path=false"],
}


# ----------------------------------------------------------------------------------------------
@test
def safetensors_roundtrip():
    p = os.path.join(TMP, "rt.safetensors")
    a = {"x": np.random.randn(3, 4).astype(np.float32), "i": np.arange(5, dtype=np.int32),
         "s": np.array([1.5], dtype=np.float32)}
    R.write_safetensors(p, a, {"k": "v"})
    b, meta = R.read_safetensors(p)
    check(meta == {"k": "v"}, "metadata")
    for k in a:
        check(b[k].dtype == a[k].dtype and np.array_equal(a[k], b[k]), f"tensor {k}")
    with open(p, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    check((8 + n) % 8 == 0, "data section aligned")
    bad = os.path.join(TMP, "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) - 4])
    try:
        R.read_safetensors(bad)
        raise AssertionError("truncated file accepted")
    except ValueError:
        pass


# ----------------------------------------------------------------------------------------------
def cli_case(arch, name, sets=()):
    d, cfg, params, tokens = fixture(arch, name, sets)
    out = os.path.join(TMP, name + ".out.safetensors")
    args = ["--ckpt", d, "--tokens", os.path.join(d, "tokens.txt"), "--out", out]
    bnd = None
    if cfg.is_dlcm:
        args += ["--boundaries", os.path.join(d, "boundaries.txt")]
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    run_cli(*args)
    o, _ = R.read_safetensors(out)
    B, L = tokens.shape
    check(o["logits"].shape == (B, L, cfg.vocab_size), "logits shape")
    for nm, shape, _ in R.param_specs(cfg):
        check(("grad." + nm) in o and list(o["grad." + nm].shape) == shape, f"grad.{nm}")
        check(np.isfinite(o["grad." + nm]).all(), f"grad.{nm} finite")
    # in-process float64 forward agrees with the float32 CLI
    res = R.forward(to64(params), cfg, tokens, None, bnd)
    check(rel_err(o["logits"], res["logits"].numpy()) < 1e-4, "logits f32 vs f64")
    check(abs(float(o["loss"][0]) - float(res["loss"])) < 1e-4 * abs(float(res["loss"])), "loss")
    # CE by hand
    lg = res["logits"].numpy().reshape(-1, cfg.vocab_size)
    tg = R.default_targets(tokens).numpy().reshape(-1)
    keep = tg >= 0
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    ce = float(np.mean(lse[keep] - lg[keep, tg[keep]]))
    check(abs(ce - float(o["ce"][0])) < 1e-4 * ce, f"ce {ce} vs {o['ce'][0]}")
    if cfg.is_dlcm:
        p, b = o["p"], o["b"]
        forced = (tokens.numpy() == cfg.bos_id)
        forced[:, 0] = True
        check(np.all(p[forced] == 1.0) and np.all(b[forced] == 1.0), "forced positions")
        check(np.array_equal(b, np.maximum(bnd.numpy(), forced).astype(np.float32)), "b = given | forced")
        check(abs(float(o["F"][0]) - b.mean()) < 1e-6, "F = mean(b)")
        check(abs(float(o["G"][0]) - p.mean()) < 1e-6, "G = mean(p)")
        Rr, F, G = cfg.target_R, b.mean(), p.mean()
        aux = Rr / (Rr - 1) * ((Rr - 1) * F * G + (1 - F) * (1 - G)) - 1
        check(abs(aux - float(o["aux"][0])) < 1e-5, "aux formula")
        check(abs(float(o["ce"][0]) + cfg.aux_weight * aux - float(o["loss"][0])) < 1e-5, "loss = ce + w*aux")
        check(np.array_equal(o["n_concepts"], b.sum(1)), "n_concepts")
        # CLI gradients agree with float64 autograd
    P64 = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
    R.forward(P64, cfg, tokens, None, bnd)["loss"].backward()
    for nm in P64:
        g64 = P64[nm].grad.numpy()
        if np.abs(g64).max() > 1e-7:
            check(rel_err(o["grad." + nm], g64) < 2e-3, f"grad.{nm} f32 vs f64: {rel_err(o['grad.' + nm], g64)}")


@test
def cli_baseline():
    cli_case("baseline", "cli_baseline")


@test
def cli_baseline_noqk_mha():
    cli_case("baseline", "cli_baseline2", ["qk_norm=false", "n_kv_heads=4", "logit_mult=0.25"])


@test
def cli_dlcm_variants():
    for name, sets in DLCM_VARIANTS.items():
        cli_case("dlcm", "cli_" + name, sets)


@test
def cli_infer_mode_and_targets():
    d, cfg, params, tokens = fixture("dlcm", "infer", [])
    out = os.path.join(TMP, "infer.out.safetensors")
    tg = R.default_targets(tokens)
    tg[:, ::3] = -5  # any negative target is ignored
    R.write_rows(os.path.join(d, "targets.txt"), tg.tolist())
    run_cli("--ckpt", d, "--tokens", os.path.join(d, "tokens.txt"), "--targets",
            os.path.join(d, "targets.txt"), "--out", out, "--mode", "infer", "--xattn", "compact")
    o, _ = R.read_safetensors(out)
    check(not any(k.startswith("grad.") for k in o), "infer writes no gradients")
    forced = (tokens.numpy() == cfg.bos_id)
    forced[:, 0] = True
    check(np.array_equal(o["b"], ((o["p"] >= cfg.router["tau"]) | forced).astype(np.float32)), "b = [p >= tau]")
    res = R.forward(to64(params), cfg, tokens, tg, None)
    check(abs(float(res["ce"]) - float(o["ce"][0])) < 1e-4 * float(res["ce"]), "ce with ignored targets")


# ----------------------------------------------------------------------------------------------
def fd_check(cfg, params, tokens, boundaries, smoother_fixed, n_per_tensor=4, seed=0):
    """Central finite differences in float64 on a few entries of every tensor plus one random
    direction per tensor, against autograd. smoother_fixed: evaluate the loss with the smoother's
    gate P held at its base-point value (the function whose gradient the detached gate defines)."""
    g = torch.Generator().manual_seed(seed)
    P = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
    base = R.forward(P, cfg, tokens, None, boundaries)
    base["loss"].backward()
    override = base["p"].detach().clone() if (cfg.is_dlcm and smoother_fixed) else None
    if cfg.is_dlcm and boundaries is None:
        boundaries = base["b"].detach().long()  # keep the thresholded segmentation fixed

    def f(Pd):
        kw = {"p_smoother_override": override} if override is not None else {}
        with torch.no_grad():
            return float(R.forward(Pd, cfg, tokens, None, boundaries, **kw)["loss"])

    h = 1e-6
    worst = 0.0
    for nm, t in P.items():
        grad = t.grad.detach()
        Pd = {k: v.detach().clone() for k, v in P.items()}
        flat = Pd[nm].view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:n_per_tensor].tolist()
        for i in idx:
            old = float(flat[i])
            flat[i] = old + h
            fp = f(Pd)
            flat[i] = old - h
            fm = f(Pd)
            flat[i] = old
            num = (fp - fm) / (2 * h)
            ana = float(grad.view(-1)[i])
            err = abs(num - ana) / max(abs(num), abs(ana), 1e-4)
            worst = max(worst, err)
            check(err < 1e-4, f"{nm}[{i}]: numeric {num:.8g} vs autograd {ana:.8g}")
        u = torch.randn(t.shape, generator=g, dtype=torch.float64)
        base_v = Pd[nm].clone()
        Pd[nm] = base_v + h * u
        fp = f(Pd)
        Pd[nm] = base_v - h * u
        fm = f(Pd)
        num = (fp - fm) / (2 * h)
        ana = float((grad * u).sum())
        err = abs(num - ana) / max(abs(num), abs(ana), 1e-4)
        worst = max(worst, err)
        check(err < 1e-4, f"{nm} direction: numeric {num:.8g} vs autograd {ana:.8g}")
    return worst


GRAD_TINY = ["vocab_size=13", "d_token=8", "n_heads=2", "n_kv_heads=1", "head_dim=4", "d_ff=12",
             "d_concept=12", "bb_heads=3", "bb_kv_heads=3", "bb_d_ff=16", "x_heads=2",
             "x_kv_heads=1", "x_d_ff=10", "d_scan=6", "aux_weight=0.7"]


@test
def gradcheck_baseline():
    d, cfg, params, tokens = fixture("baseline", "fd_b", ["vocab_size=13", "d_token=8", "n_heads=2",
                                                          "n_kv_heads=1", "d_ff=12"], rows=2, L=9)
    fd_check(cfg, params, tokens, None, False)


@test
def gradcheck_dlcm_detached_gate():
    d, cfg, params, tokens = fixture("dlcm", "fd_d", GRAD_TINY, rows=2, L=12)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    fd_check(cfg, params, tokens, bnd, smoother_fixed=True)


@test
def gradcheck_dlcm_raw_router():
    d, cfg, params, tokens = fixture("dlcm", "fd_raw", GRAD_TINY + ['router.kind="raw"', "qk_norm=false"],
                                     rows=2, L=12, seed=3)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    fd_check(cfg, params, tokens, bnd, smoother_fixed=True)


@test
def gradcheck_dlcm_smooth_grad():
    d, cfg, params, tokens = fixture("dlcm", "fd_sm", GRAD_TINY + ["router.smooth_grad=true"], rows=2, L=12,
                                     seed=5)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    fd_check(cfg, params, tokens, bnd, smoother_fixed=False)


@test
def gradcheck_dlcm_thresholded():
    d, cfg, params, tokens = fixture("dlcm", "fd_thr", GRAD_TINY, rows=2, L=12, seed=7)
    fd_check(cfg, params, tokens, None, smoother_fixed=True)


def backward_capturing_p(P, cfg, tokens, bnd):
    """Forward + backward of the loss with the router's p kept (retain_grad) for inspection:
    returns (result, {"p": p, "forced": forced})."""
    captured = {}
    orig = Mdl.router_probs

    def hooked(*a, **k):
        p, forced = orig(*a, **k)
        p.retain_grad()
        captured["p"], captured["forced"] = p, forced
        return p, forced

    Mdl.router_probs = hooked
    try:
        res = R.forward(P, cfg, tokens, None, bnd)
        res["loss"].backward()
    finally:
        Mdl.router_probs = orig
    return res, captured


@test
def p_gets_gradient_only_from_aux():
    d, cfg, params, tokens = fixture("dlcm", "pgrad", [], rows=3, L=20)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    P = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
    res, captured = backward_capturing_p(P, cfg, tokens, bnd)
    p, forced = captured["p"], captured["forced"]
    Rr, F, lam = cfg.target_R, float(res["F"]), cfg.aux_weight
    expect = lam * Rr * (Rr * F - 1) / ((Rr - 1) * p.numel())
    gp = p.grad[~forced].numpy()
    check(np.allclose(gp, expect, rtol=1e-9, atol=1e-15), f"dL/dp = {gp[:4]} expected {expect}")


# ----------------------------------------------------------------------------------------------
def causality_case(arch, sets, seed, given_boundaries):
    d, cfg, params, tokens = fixture(arch, f"caus_{arch}_{seed}", sets, rows=2, L=20, seed=seed)
    P = to64(params)
    g = torch.Generator().manual_seed(seed)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt")) if given_boundaries else None
    base = R.forward(P, cfg, tokens, None, bnd)
    for t0 in (1, 5, 11, 19):
        tk = tokens.clone()
        tk[:, t0] = (tk[:, t0] + 1 + torch.randint(cfg.vocab_size - 1, (tk.shape[0],), generator=g)) % cfg.vocab_size
        tg = R.default_targets(tokens)  # same targets so only the input changes
        b2 = None
        if bnd is not None:
            b2 = bnd.clone()
            b2[:, t0:] = torch.randint(2, b2[:, t0:].shape, generator=g)
        new = R.forward(P, cfg, tk, tg, b2)
        ref = R.forward(P, cfg, tokens, tg, bnd)
        check(np.abs(new["logits"][:, :t0].numpy() - ref["logits"][:, :t0].numpy()).max() < 1e-12,
              f"{arch} logits before {t0} changed")
        check(np.abs(new["logits"][:, t0:].numpy() - ref["logits"][:, t0:].numpy()).max() > 1e-9,
              f"{arch}: change at {t0} had no effect at all (test is vacuous)")
        if cfg.is_dlcm:
            check(np.array_equal(new["p"][:, :t0].numpy(), ref["p"][:, :t0].numpy()), f"p before {t0} changed")
            check(np.array_equal(new["b"][:, :t0].numpy(), ref["b"][:, :t0].numpy()), f"b before {t0} changed")
    return base


@test
def causality_baseline():
    causality_case("baseline", [], 11, False)


@test
def causality_dlcm_thresholded():
    for i, (name, sets) in enumerate(DLCM_VARIANTS.items()):
        causality_case("dlcm", sets, 20 + i, False)


@test
def causality_dlcm_given_boundaries():
    causality_case("dlcm", [], 31, True)


# ----------------------------------------------------------------------------------------------
def check_replicate_equals_compact(what, cfg, params, tokens, bnd):
    """Logits and every gradient of both cross-attention forms agree, with the given boundaries
    and with thresholded ones."""
    for b in (bnd, None):
        outs = {}
        for impl in ("replicate", "compact"):
            P = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
            res = R.forward(P, cfg, tokens, None, b, xattn_impl=impl)
            res["loss"].backward()
            outs[impl] = (res["logits"].detach().numpy(), {k: v.grad.numpy() for k, v in P.items()})
        check(rel_err(outs["compact"][0], outs["replicate"][0]) < 1e-12, f"{what}: logits differ")
        for k in outs["replicate"][1]:
            check(np.abs(outs["compact"][1][k] - outs["replicate"][1][k]).max() < 1e-10, f"{what}: grad {k}")


@test
def replicate_equals_compact():
    for i, (name, sets) in enumerate(DLCM_VARIANTS.items()):
        d, cfg, params, tokens = fixture("dlcm", f"xa_{name}", sets, rows=3, L=24, seed=40 + i)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        check_replicate_equals_compact(name, cfg, params, tokens, bnd)


@test
def multiplicity_formula():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        L = int(torch.randint(1, 30, (1,), generator=g))
        b = (torch.rand(L, generator=g) < 0.4).long()
        b[0] = 1
        seg = torch.cumsum(b, 0) - 1
        M1 = int(seg[-1]) + 1
        # definition: number of positions s <= t carrying list entry k (position s carries seg(s))
        onehot = torch.nn.functional.one_hot(seg, M1)
        mult_def = torch.cumsum(onehot, 0)
        spans = Mdl.segments_of_row(b.tolist())
        for t in range(L):
            for k in range(M1):
                st, en = spans[k]
                if k < seg[t]:
                    m = en - st
                elif k == seg[t]:
                    m = t - st + 1
                else:
                    m = 0
                check(int(mult_def[t, k]) == m, "multiplicity")


@test
def xattn_direct_formula():
    """Cross-attention output of one token, written out by hand from SPEC 4.7."""
    d, cfg, params, tokens = fixture("dlcm", "xa_direct", [], rows=1, L=16, seed=50)
    P = to64(params)
    hd, Hq, Hkv = cfg.head_dim, cfg.x_heads, cfg.x_kv_heads
    L = 16
    q = torch.randn(L, Hq, hd, dtype=torch.float64)
    Zlist = torch.randn(6, cfg.d_concept, dtype=torch.float64)
    b = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0])
    seg = torch.cumsum(b, 0) - 1
    out = Mdl.xattn_replicate(q, Zlist, seg, P, cfg).view(L, Hq, hd)

    def kv(z):
        k = (P["xattn.wk.weight"] @ z).view(Hkv, hd)
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * P["xattn.k_norm.weight"]
        return k, (P["xattn.wv.weight"] @ z).view(Hkv, hd)

    for t in range(L):
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            scores, vals = [], []
            for s in range(t + 1):
                k, v = kv(Zlist[int(seg[s])])  # = zs_{seg(s)-1}, entry 0 = z_null
                scores.append(float(q[t, h] @ k[kvh]) / math.sqrt(hd))
                vals.append(v[kvh])
            w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            ref = sum(wi * vi for wi, vi in zip(w, vals))
            check(torch.allclose(out[t, h], ref, atol=1e-12), f"token {t} head {h}")


@test
def smoother_values():
    Z = torch.randn(5, 3, dtype=torch.float64)
    b = [1, 0, 1, 1, 0, 0, 1, 0, 1]
    forced = torch.tensor([True, False, False, False, False, False, True, False, False])
    p = torch.tensor([1.0, 0.3, 0.0, 0.9, 0.2, 0.1, 1.0, 0.5, 1.0], dtype=torch.float64)
    spans = Mdl.segments_of_row(b)
    zs = Mdl.smooth_row(Z, spans, forced, p)
    e = 1e-4
    ref = [Z[0]]                                   # row start: P = 1
    ref.append(e * Z[1] + (1 - e) * ref[-1])       # p = 0 -> clamped to 1e-4
    ref.append(0.9 * Z[2] + 0.1 * ref[-1])
    ref.append(Z[3])                               # BOS: P = 1 exactly (restart)
    ref.append((1 - e) * Z[4] + e * ref[-1])       # p = 1 but not forced -> 1 - 1e-4
    check(torch.allclose(zs, torch.stack(ref), atol=1e-14), "smoother values")


# ----------------------------------------------------------------------------------------------
@test
def adamw_one_step_by_hand():
    for arch, sets in (("baseline", []), ("dlcm", [])):
        d, cfg, params, tokens = fixture(arch, f"adam_{arch}", sets)
        out = os.path.join(TMP, f"adam_{arch}.safetensors")
        lr, b1, b2, eps, wd, clip = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
        args = ["--ckpt", d, "--tokens", os.path.join(d, "tokens.txt"), "--out", out, "--adam-steps", 1,
                "--lr", lr, "--beta1", b1, "--beta2", b2, "--eps", eps, "--weight-decay", wd, "--grad-clip", clip]
        if cfg.is_dlcm:
            args += ["--boundaries", os.path.join(d, "boundaries.txt")]
        run_cli(*args)
        o, _ = R.read_safetensors(out)
        gn = math.sqrt(sum(float((o["grad." + k].astype(np.float64) ** 2).sum()) for k in params))
        check(abs(gn - float(o["grad_norm"][0])) < 1e-5 * gn, "grad_norm")
        check(gn > clip, "test should exercise clipping")
        scale = min(1.0, clip / (gn + 1e-6))
        for k, w in params.items():
            w = w.numpy().astype(np.float64)
            gk = o["grad." + k].astype(np.float64) * scale
            m = (1 - b1) * gk
            v = (1 - b2) * gk * gk
            wdk = wd if w.ndim == 2 else 0.0
            w1 = w * (1 - lr * wdk)
            w1 = w1 - (lr / (1 - b1)) * m / (np.sqrt(v) / math.sqrt(1 - b2) + eps)
            check(rel_err(o["param_after." + k], w1) < 1e-5, f"{arch} param_after.{k}")
            check(rel_err(o["exp_avg." + k], m) < 1e-5 or np.abs(m).max() == 0, f"exp_avg.{k}")


@test
def adamw_several_steps_decrease_loss():
    d, cfg, params, tokens = fixture("dlcm", "adam_multi", [])
    out = os.path.join(TMP, "adam_multi.safetensors")
    run_cli("--ckpt", d, "--tokens", os.path.join(d, "tokens.txt"), "--boundaries",
            os.path.join(d, "boundaries.txt"), "--out", out, "--adam-steps", 4, "--lr", 3e-3,
            "--weight-decay", 0.1, "--grad-clip", 1.0)
    o, _ = R.read_safetensors(out)
    ls = o["loss_steps"]
    check(len(ls) == 4 and ls[0] == o["loss"][0], "loss_steps[0] = loss")
    check(ls[-1] < ls[0], f"loss should go down: {ls}")


# ----------------------------------------------------------------------------------------------
# SPEC 4.9 research variants
# ----------------------------------------------------------------------------------------------
@test
def variant_config_validation():
    base = {"arch": "dlcm"}
    try:
        R.config_from_dict(dict(base, concept_visibility="inclusive"))
        raise AssertionError("inclusive + mean accepted")
    except ValueError as e:
        check("inclusive" in str(e) and "concept_repr" in str(e), f"unclear message: {e}")
    for bad in ({"concept_repr": "max"}, {"concept_visibility": "all"}, {"enc_window": -1},
                {"dec_window": 2.5}, {"concept_path": 1}):
        try:
            R.config_from_dict(dict(base, **bad))
            raise AssertionError(f"{bad} accepted")
        except ValueError as e:
            check(list(bad)[0] in str(e), f"message should name the key: {e}")
    c = R.config_from_dict(base)
    check((c.concept_repr, c.concept_visibility, c.enc_window, c.dec_window, c.concept_path) ==
          ("mean", "shifted", 0, 0, True), "defaults")
    for ok in (FIRST_INCL, PREFIX_INCL):
        R.config_from_dict(dict(base, **{k: v.strip('"') for k, v in (x.split("=") for x in ok)}))


@test
def cli_research_variants():
    for name, sets in RESEARCH_VARIANTS.items():
        if name != "first":  # its pooling is in first_inclusive
            cli_case("dlcm", "cli_" + name, sets)


@test
def cli_no_concept_path_with_unused_tensors():
    """A concept_path = false checkpoint that still carries the concept path's tensors: they are
    loaded, get exactly zero gradient, and the rest equals a checkpoint without them."""
    d, cfg, params, tokens = fixture("dlcm", "cli_unused", [])
    d2, cfg2, params2, _ = fixture("dlcm", "cli_unused2", ["concept_path=false"])
    R.save_checkpoint(d, dict(make_fixture.TINY["dlcm"], concept_path=False), params)
    unused = {n for n, _, _ in R.unused_specs(cfg2)}
    check(unused and unused.isdisjoint(n for n, _, _ in R.param_specs(cfg2)), "unused specs")
    outs = []
    for dd in (d, d2):
        R.save_checkpoint(dd, dict(make_fixture.TINY["dlcm"], concept_path=False),
                          {k: v for k, v in params.items() if dd == d or k not in unused})
        out = os.path.join(dd, "o.safetensors")
        run_cli("--ckpt", dd, "--tokens", os.path.join(d, "tokens.txt"), "--boundaries",
                os.path.join(d, "boundaries.txt"), "--out", out, "--adam-steps", 1, "--weight-decay", 0.1)
        outs.append(R.read_safetensors(out)[0])
    a, b = outs
    for n in unused:
        check(("grad." + n) in a and not np.any(a["grad." + n]), f"grad.{n} should be zero")
        check(("grad." + n) not in b, f"grad.{n} without the tensor")
    for k in b:
        check(np.array_equal(a[k], b[k]), f"{k} differs with the unused tensors present")


@test
def gradcheck_research_variants():
    # every option value once ("first" pooling via first_inclusive); one random direction per
    # tensor and one backbone layer keep this affordable on 2 cores
    for i, name in enumerate(("first_inclusive", "prefix_inclusive", "windows", "no_concept_path")):
        d, cfg, params, tokens = fixture("dlcm", f"fd_{name}", GRAD_TINY + RESEARCH_VARIANTS[name] + ["bb_layers=1"],
                                         rows=2, L=12, seed=70 + i)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        fd_check(cfg, params, tokens, bnd, smoother_fixed=not cfg.router["smooth_grad"], n_per_tensor=0,
                 seed=i)


@test
def causality_research_variants():
    for i, (name, sets) in enumerate(RESEARCH_VARIANTS.items()):
        causality_case("dlcm", sets, 80 + i, False)
    for i, sets in enumerate((FIRST_INCL, PREFIX_INCL)):
        causality_case("dlcm", sets, 90 + i, True)


@test
def replicate_equals_compact_inclusive():
    """Inclusive visibility: the replication form (first: L+1 slots, z_null visible to all, slot
    s+1 carrying zs_seg(s); prefix_mean: per-query slots) == the multiplicity form."""
    for i, sets in enumerate((FIRST_INCL, PREFIX_INCL + ["router.smooth_grad=true"])):
        d, cfg, params, tokens = fixture("dlcm", f"xai_{i}", sets, rows=3, L=20, seed=100 + i)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        check_replicate_equals_compact(sets, cfg, params, tokens, bnd)


@test
def xattn_rope_variant():
    """xattn_rope (docs/dlcm.md): validated; replicate == compact (every copy of concept j
    carries the key rotated at start_j); it changes the function; and the z_null score is
    position-free while a concept's score depends on t - start_j only (checked on
    xattn_attend directly)."""
    try:
        R.config_from_dict({"arch": "dlcm", "xattn_rope": 1})
        raise AssertionError("xattn_rope = 1 accepted")
    except ValueError as e:
        check("xattn_rope" in str(e), f"message should name the key: {e}")
    check(R.config_from_dict({"arch": "dlcm"}).xattn_rope is False, "default")
    for i, sets in enumerate(([], FIRST_INCL, PREFIX_INCL)):
        sets = list(sets) + ["xattn_rope=true"]
        d, cfg, params, tokens = fixture("dlcm", f"xrope_{i}", sets, rows=3, L=20, seed=130 + i)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        if i < 2:  # prefix_mean + inclusive has no replicate form in the engine; same reference
            check_replicate_equals_compact(f"rope {sets}", cfg, params, tokens, bnd)
        P = to64(params)
        on = R.forward(P, cfg, tokens, None, bnd, xattn_impl="compact")["logits"]
        off = R.forward(P, R.Config(dict(cfg, xattn_rope=False)), tokens, None, bnd,
                        xattn_impl="compact")["logits"]
        check((on - off).abs().max().item() > 1e-3, f"rope {sets}: no effect on the logits")
    # one query head, keys [z_null, a, b]: shifting every concept start and the query position
    # by the same offset keeps the output; the z_null score alone ignores the query position.
    cfg = R.Config(dict(R.config_from_dict({"arch": "dlcm"}), xattn_rope=True, head_dim=8))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 1, 8, generator=g, dtype=torch.float64)
    k = torch.randn(3, 1, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 3, dtype=torch.bool)
    a = Mdl.xattn_attend(q, k, v, mask, None, [-1, 0, 2], cfg)
    qs = torch.cat([torch.zeros(3, 1, 8, dtype=torch.float64), q])  # queries shifted by 3
    b = Mdl.xattn_attend(qs, k, v, torch.ones(9, 3, dtype=torch.bool), None, [-1, 3, 5], cfg)[3:]
    check((a - b).abs().max().item() < 1e-12, "rope: not relative in t - start_j")
    # by hand, keys [z_null, a at start 0]: z_null scores q_t.k_null (no rotation), a scores
    # (R_t q_t).k_a
    two = torch.tensor([[True, True, False]]).expand(6, 3)
    got = Mdl.xattn_attend(q, k, v, two, None, [-1, 0, 2], cfg)
    qr = Mdl.rope_at(q, torch.arange(6)[:, None], cfg.rope_theta)[:, 0]  # [6, 8]
    sc = torch.stack([q[:, 0] @ k[0, 0], qr @ k[1, 0]], dim=1) / math.sqrt(8)
    want = torch.softmax(sc, dim=1) @ v[:2, 0]
    check((got - want).abs().max().item() < 1e-12, "rope: scores by hand")
    plain = torch.softmax(torch.stack([q[:, 0] @ k[0, 0], q[:, 0] @ k[1, 0]], 1) / math.sqrt(8), 1)
    check((got - plain @ v[:2, 0]).abs().max().item() > 1e-6, "rope: the rotation must matter")


@test
def xattn_inclusive_direct_formula():
    """Cross-attention term of every token under inclusive visibility, written out by hand from
    SPEC 4.9: slots [z_null] + [zs_seg(s)(t) for s <= t], the own concept j = seg(t) evaluated on
    the prefix start_j..t (prefix_mean) by an unpadded backbone run over [c_0 .. c_{j-1}, c_j(t)]."""
    for repr_ in ("first", "prefix_mean"):
        sets = [f'concept_repr="{repr_}"', 'concept_visibility="inclusive"', "router.smooth_grad=true"]
        d, cfg, params, tokens = fixture("dlcm", f"xid_{repr_}", sets, rows=2, L=14, seed=110)
        P = to64(params)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        hd, Hq, Hkv, eps = cfg.head_dim, cfg.x_heads, cfg.x_kv_heads, cfg.norm_eps
        res = {impl: R.forward(P, cfg, tokens, None, bnd, xattn_impl=impl) for impl in ("replicate", "compact")}
        H, p, b = res["compact"]["H"], res["compact"]["p"], res["compact"]["b"]
        B, L = tokens.shape

        def rms(x, w):
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

        for r in range(B):
            spans = Mdl.segments_of_row(b[r].long().tolist())
            seg = (torch.cumsum(b[r].long(), 0) - 1).tolist()
            forced = [t == 0 or int(tokens[r, t]) == cfg.bos_id for t in range(L)]

            def c_of(j, t_end):
                s0 = spans[j][0]
                h = H[r, s0] if repr_ == "first" else H[r, s0:t_end + 1].mean(0)
                return P["pool.w_up.weight"] @ h

            for t in range(L):
                j = seg[t]
                C = torch.stack([c_of(k, spans[k][1] - 1) for k in range(j)] + [c_of(j, t)])
                Z = Mdl.backbone(P, cfg, C[None])[0]
                zs, prev = [], torch.zeros(cfg.d_concept, dtype=torch.float64)
                for k in range(j + 1):
                    s0 = spans[k][0]
                    g = 1.0 if forced[s0] else min(max(float(p[r, s0]), 1e-4), 1 - 1e-4)
                    prev = g * Z[k] + (1 - g) * prev
                    zs.append(prev)
                slots = [P["xattn.null_concept"]] + [zs[seg[s]] for s in range(t + 1)]
                q = P["xattn.wq.weight"] @ rms(H[r, t], P["xattn.norm.weight"])
                q = rms(q.view(Hq, hd), P["xattn.q_norm.weight"])
                heads = []
                for h in range(Hq):
                    kvh = h // (Hq // Hkv)
                    ks = [rms((P["xattn.wk.weight"] @ z).view(Hkv, hd)[kvh], P["xattn.k_norm.weight"]) for z in slots]
                    vs = [(P["xattn.wv.weight"] @ z).view(Hkv, hd)[kvh] for z in slots]
                    w = torch.softmax(torch.stack([q[h] @ k for k in ks]) / math.sqrt(hd), 0)
                    heads.append(sum(wi * vi for wi, vi in zip(w, vs)))
                xo = P["xattn.wo.weight"] @ torch.cat(heads)
                for impl in res:
                    check(torch.allclose(res[impl]["xattn_out"][r, t], xo, atol=1e-10),
                          f"{repr_}/{impl}: row {r} token {t}")


@test
def prefix_mean_shifted_equals_mean():
    """Under shifted visibility every concept a token sees is closed, so prefix_mean == mean."""
    d, cfg, params, tokens = fixture("dlcm", "pm_sh", [], rows=2, L=20, seed=120)
    cfg2 = R.config_from_dict(dict(make_fixture.TINY["dlcm"], concept_repr="prefix_mean"))
    P = to64(params)
    for b in (R.read_rows(os.path.join(d, "boundaries.txt")), None):
        check(torch.equal(R.forward(P, cfg, tokens, None, b)["logits"], R.forward(P, cfg2, tokens, None, b)["logits"]),
              "prefix_mean + shifted != mean + shifted")


@test
def windows_at_least_L_equal_full_attention():
    L = 16
    for t in range(L):  # the mask itself: token t sees s in (t - w, t]
        for w in (1, 3):
            row = Mdl.window_mask(L, w)[0, t]
            check(row.tolist() == [t - w < s <= t for s in range(L)], f"window mask w={w} t={t}")
    d, cfg, params, tokens = fixture("dlcm", "win_full", [], rows=2, L=L, seed=130)
    P = to64(params)
    ref = R.forward(P, cfg, tokens)
    for w in (L, L + 7):
        cw = R.config_from_dict(dict(make_fixture.TINY["dlcm"], enc_window=w, dec_window=w))
        out = R.forward(P, cw, tokens)
        check(torch.equal(out["logits"], ref["logits"]) and torch.equal(out["b"], ref["b"]), f"w = {w}")
    cw = R.config_from_dict(dict(make_fixture.TINY["dlcm"], enc_window=2, dec_window=2))
    check(not torch.equal(R.forward(P, cw, tokens)["logits"], ref["logits"]), "w = 2 should differ")


@test
def window_far_information_only_via_concepts():
    """enc/dec windows w, one encoder and one decoder block: without the concept path the logit
    at t depends only on tokens s >= t - 2(w-1); with it, farther tokens reach t (via concepts)."""
    w = 3
    far = 2 * (w - 1)
    sets = [f"enc_window={w}", f"dec_window={w}", "enc_layers=1", "dec_layers=1"]
    g = torch.Generator().manual_seed(7)
    for path in (False, True):
        d, cfg, params, tokens = fixture("dlcm", f"win_far_{path}", sets + [f"concept_path={str(path).lower()}"],
                                         rows=2, L=24, seed=140)
        P = to64(params)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))  # same segmentation for both inputs
        tg = R.default_targets(tokens)
        ref = R.forward(P, cfg, tokens, tg, bnd)["logits"]
        reached_far = False
        for s0 in (2, 6, 9):
            tk = tokens.clone()
            tk[:, s0] = (tk[:, s0] + 1 + torch.randint(cfg.vocab_size - 1, (2,), generator=g)) % cfg.vocab_size
            tk[:, s0] = torch.where(tk[:, s0] == cfg.bos_id, (tk[:, s0] + 1) % cfg.vocab_size, tk[:, s0])
            tk[:, s0] = torch.where(tokens[:, s0] == cfg.bos_id, tokens[:, s0], tk[:, s0])  # keep BOS
            diff = (R.forward(P, cfg, tk, tg, bnd)["logits"] - ref).abs().amax(dim=(0, 2))  # [L]
            check(float(diff[s0]) > 1e-9 or bool((tokens[:, s0] == cfg.bos_id).all()), "perturbation had no effect")
            beyond = diff[s0 + far + 1:]
            if not path:
                check(float(beyond.max()) == 0.0, f"token {s0} reached t > {s0 + far} without concepts")
            reached_far |= float(beyond.max()) > 1e-9
        check(reached_far == path, "with the concept path far tokens must reach later logits")


# ----------------------------------------------------------------------------------------------
# concept-usage diagnostics
# ----------------------------------------------------------------------------------------------
@test
def diagnostics_no_concept_path_exact_zero():
    for sets in (["concept_path=false"], ["concept_path=false", "enc_window=4"]):
        d, cfg, params, tokens = fixture("dlcm", "diag_np", sets, rows=3, L=20, seed=150)
        dg = Diag.concept_usage(to64(params), cfg, tokens)
        check(dg["delta_null"] == 0.0 and dg["delta_shuffle"] == 0.0 and dg["xattn_ratio"] == 0.0,
              f"no concept path: {dg}")


@test
def diagnostics_with_concepts():
    ce_null = []
    for i, sets in enumerate(([], FIRST_INCL, PREFIX_INCL, ["enc_window=3"])):
        d, cfg, params, tokens = fixture("dlcm", f"diag_{i}", sets, rows=3, L=20, seed=160)
        P = to64(params)
        tg = R.default_targets(tokens)
        tg[:, ::5] = -1
        for bnd in (None, R.read_rows(os.path.join(d, "boundaries.txt"))):
            dg = Diag.concept_usage(P, cfg, tokens, tg, bnd)
            check(abs(dg["delta_null"]) > 1e-6 and abs(dg["delta_shuffle"]) > 1e-6, f"{sets}: {dg}")
            check(dg["xattn_ratio"] > 0, "ratio")
            res = R.forward(P, cfg, tokens, tg, bnd)
            check(abs(dg["ce"] - float(res["ce"])) < 1e-12, "ce")
            # (c) by hand
            xo = res["xattn_out"].norm(dim=-1).mean() / res["H"].norm(dim=-1).mean()
            check(abs(dg["xattn_ratio"] - float(xo)) < 1e-12, "xattn_ratio")
            # (d): counts and the weighted mean
            check(sum(dg["pos_count"]) == int((tg >= 0).sum()), "pos_count total")
            wm = sum(c * n for c, n in zip(dg["pos_ce"], dg["pos_count"])) / sum(dg["pos_count"])
            check(abs(wm - dg["ce"]) < 1e-12, "weighted pos_ce == ce")
            bb = res["b"].long()
            for r in range(bb.shape[0]):
                last = 0
                for t in range(bb.shape[1]):
                    last = t if bb[r, t] else last
                    check(int(Diag.position_in_concept(bb)[r, t]) == t - last, "position in concept")
            if bnd is not None:
                ce_null.append(dg["ce_null"])
            # (a) by hand: every token's cross-attention output is Wv z_null per head
            nul = R.forward(P, cfg, tokens, tg, bnd, concept_ablation="null")["xattn_out"]
            v = (P["xattn.wv.weight"] @ P["xattn.null_concept"]).view(cfg.x_kv_heads, cfg.head_dim)
            v = v.repeat_interleave(cfg.x_heads // cfg.x_kv_heads, dim=0).reshape(-1)
            check(torch.allclose(nul, (P["xattn.wo.weight"] @ v).expand_as(nul), atol=1e-12), "null = Wo Wv z_null")
    # without concepts, the variants differ only in the concept path
    check(max(ce_null[:3]) - min(ce_null[:3]) < 1e-12, f"ce_null depends on the concept variant: {ce_null}")


@test
def diagnostics_shuffle_definition():
    d, cfg, params, tokens = fixture("dlcm", "diag_sh", [], rows=3, L=20, seed=170)
    P = to64(params)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    # identical rows get their own lists back; so does a single row
    same = tokens[:1].repeat(3, 1)
    dg = Diag.concept_usage(P, cfg, same, None, bnd[:1].repeat(3, 1))
    check(dg["delta_shuffle"] == 0.0, f"identical rows: {dg['delta_shuffle']}")
    check(Diag.concept_usage(P, cfg, tokens[:1], None, bnd[:1])["delta_shuffle"] == 0.0, "B = 1")
    # row r's list = row (r+1)'s, truncated or padded with z_null: row 0 with 2 concepts sees
    # row 1's first two; row 1 with more concepts than row 2 sees row 2's then z_null
    b = torch.zeros(3, 20, dtype=torch.long)
    b[:, 0] = 1
    b[0, 10] = 1
    b[1, [4, 8, 12, 16]] = 1
    b[2, [5, 15]] = 1
    tk = tokens.clone()
    tk[:, 1:][tk[:, 1:] == cfg.bos_id] = 5  # no forced boundaries beyond t = 0
    sh = R.forward(P, cfg, tk, None, b, xattn_impl="compact", concept_ablation="shuffle")
    base = R.forward(P, cfg, tk, None, b, xattn_impl="compact")
    # rebuild the lists from the per-row smoothed concepts of the base run
    H = base["H"]
    spans = [Mdl.segments_of_row(b[r].tolist()) for r in range(3)]
    Mmax = max(len(s) for s in spans)
    C = torch.stack([torch.stack([H[r, s:e].mean(0) for s, e in spans[r]] +
                                 [torch.zeros(cfg.d_token, dtype=torch.float64)] * (Mmax - len(spans[r])))
                     for r in range(3)]) @ P["pool.w_up.weight"].t()
    Z = Mdl.backbone(P, cfg, C)
    p_sm = base["p"]
    forced = torch.zeros(3, 20, dtype=torch.bool)
    forced[:, 0] = True
    ZS = [Mdl.smooth_row(Z[r], spans[r], forced[r], p_sm[r]) for r in range(3)]
    nul = P["xattn.null_concept"][None]
    lists = [torch.cat([nul, ZS[1][:2]]),
             torch.cat([nul, ZS[2], nul, nul]),
             torch.cat([nul, ZS[0], nul])]
    q = Mdl.rmsnorm(Mdl.linear(Mdl.rmsnorm(H, P["xattn.norm.weight"], cfg.norm_eps), P["xattn.wq.weight"])
                    .view(3, 20, cfg.x_heads, cfg.head_dim), P["xattn.q_norm.weight"], cfg.norm_eps)
    seg = torch.cumsum(b, 1) - 1
    for r in range(3):
        xo = Mdl.linear(Mdl.xattn_compact(q[r], lists[r], seg[r], P, cfg), P["xattn.wo.weight"])
        check(torch.allclose(sh["xattn_out"][r], xo, atol=1e-12), f"shuffled row {r}")


@test
def cli_diagnostics():
    for name, sets, given in (("cdg_default", [], False), ("cdg_prefix", PREFIX_INCL, True),
                              ("cdg_nopath", ["concept_path=false"], True)):
        d, cfg, params, tokens = fixture("dlcm", name, sets, rows=3, L=20, seed=180)
        out = os.path.join(TMP, name + ".safetensors")
        args = ["--ckpt", d, "--tokens", os.path.join(d, "tokens.txt"), "--out", out, "--mode", "infer",
                "--diagnostics", "--xattn", "compact"]
        bnd = None
        if given:
            args += ["--boundaries", os.path.join(d, "boundaries.txt")]
            bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        run_cli(*args)
        o, _ = R.read_safetensors(out)
        dg = Diag.concept_usage(to64(params), cfg, tokens, None, bnd)
        for k in ("ce", "ce_null", "ce_shuffle", "xattn_ratio"):
            check(abs(float(o["diag." + k][0]) - dg[k]) < 1e-5 * max(1.0, abs(dg[k])), f"{name}: diag.{k}")
        check(np.array_equal(o["diag.pos_count"], np.array(dg["pos_count"], dtype=np.float32)), "pos_count")
        check(np.allclose(o["diag.pos_ce"], dg["pos_ce"], rtol=1e-5), f"{name}: pos_ce")
        check(abs(float(o["diag.ce"][0]) - float(o["ce"][0])) < 1e-6 * float(o["ce"][0]), "diag.ce == ce")


# ----------------------------------------------------------------------------------------------
# controls (issue 20 section 3)
CONTROLS = {
    "fixed": ['router.kind="fixed"', "router.stride=3"],
    "sequence_aux": ['aux_kind="sequence"'],
    "smoother_off": ["smoother=false"],
}
BASELINE_EXTRAS = ["baseline_extras=true", "n_layers=3", "n_layers_pre=1", "x_d_ff=10"]


@test
def rule_routers_exact():
    d, cfg, params, _ = fixture("dlcm", "rule_fixed", CONTROLS["fixed"], rows=2, L=10)
    check("router.wq.weight" not in params, "rule routers have no router parameters")
    bos = cfg.bos_id
    tokens = torch.tensor([[bos, 5, 6, 7, 8, 9, bos, 5, 6, 7],
                           [4, 5, 6, 7, bos, 9, 10, 11, 12, 4]])
    want = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0, 1],
                         [1, 0, 0, 1, 1, 0, 0, 1, 0, 0]])
    P = to64(params)
    given = torch.ones_like(tokens)  # a rule ignores given samples: it decides in training too
    for bnd in (None, given):
        res = R.forward(P, cfg, tokens, None, bnd)
        check(torch.equal(res["b"].long(), want), f"fixed-stride b {res['b'].tolist()}")
        check(torch.equal(res["p"], want.to(res["p"].dtype)), "p = the rule's decision")
        check(float(res["aux"]) == 0.0, "no aux loss for rules")
    ws = torch.zeros(cfg.vocab_size, dtype=torch.uint8)
    ws[[5, 9, 12]] = 1
    cw = R.config_from_dict(dict(cfg, router=dict(cfg.router, kind="word")))
    res = R.forward(P, cw, tokens, None, None, word_starts=ws)
    want_w = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 0, 0],
                           [1, 1, 0, 0, 1, 1, 0, 0, 1, 0]])
    check(torch.equal(res["b"].long(), want_w), f"word b {res['b'].tolist()}")
    try:
        R.forward(P, cw, tokens, None, None)
        check(False, "word router without its table must fail")
    except ValueError as e:
        check("word-start table" in str(e), str(e))


@test
def sequence_aux_gradient_on_p():
    d, cfg, params, tokens = fixture("dlcm", "seqaux", CONTROLS["sequence_aux"], rows=3, L=20)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    P = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
    res, captured = backward_capturing_p(P, cfg, tokens, bnd)
    p, forced, b = captured["p"], captured["forced"], res["b"]
    Rr, lam = cfg.target_R, cfg.aux_weight
    B, L = p.shape
    Fr = b.double().mean(dim=1)
    Gr = p.detach().mean(dim=1)
    val = (Rr / (Rr - 1) * ((Rr - 1) * Fr * Gr + (1 - Fr) * (1 - Gr)) - 1).mean()
    check(abs(float(res["aux"]) - float(val)) < 1e-12, "per-row aux value")
    for r in range(B):
        expect = lam * Rr * (Rr * float(Fr[r]) - 1) / ((Rr - 1) * L * B)
        gp = p.grad[r][~forced[r]].numpy()
        check(np.allclose(gp, expect, rtol=1e-9, atol=1e-15), f"row {r}: dL/dp = {gp[:3]} expected {expect}")
    check(len(set(Fr.tolist())) > 1, "rows with different F_r (else the test equals the global one)")


@test
def smoother_off_is_identity():
    d, cfg, params, tokens = fixture("dlcm", "sm_off", CONTROLS["smoother_off"], rows=2, L=16)
    Z = torch.randn(4, 5, dtype=torch.float64)
    forced = torch.zeros(16, dtype=torch.bool)
    spans = [(0, 3), (3, 7), (7, 9), (9, 16)]
    check(torch.equal(Mdl.smooth_row(Z, spans, forced, None), Z), "smoother off: zs = z")
    on = R.config_from_dict(dict(cfg, smoother=True))
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    a = R.forward(to64(params), cfg, tokens, None, bnd)["loss"]
    b = R.forward(to64(params), on, tokens, None, bnd)["loss"]
    check(abs(float(a) - float(b)) > 1e-9, "smoother off must change the loss (else vacuous)")


@test
def baseline_extras_structure():
    d, cfg, params, tokens = fixture("baseline", "bx", BASELINE_EXTRAS, rows=2, L=12)
    names = list(params)
    check(names[:2] == ["tok_embeddings.weight", "encoder.layers.0.attn_norm.weight"], names[:2])
    for n in ("encoder.norm.weight", "xattn.ffn_norm.weight", "xattn.ffn.w1.weight",
              "decoder.layers.1.ffn.w3.weight", "norm.weight", "lm_head.weight"):
        check(n in params, n)
    check(not any(n.startswith("layers.") for n in names), "no plain layers.* with extras")
    # with the cross FFN zeroed and encoder.norm at 1 the extras reduce to a mid-stack RMSNorm
    P = to64(params)
    P["xattn.ffn.w2.weight"] = torch.zeros_like(P["xattn.ffn.w2.weight"])
    P["encoder.norm.weight"] = torch.ones_like(P["encoder.norm.weight"])
    x = P["tok_embeddings.weight"][tokens.long()]
    x = Mdl.block(P, "encoder.layers.0.", x, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg)
    x = Mdl.rmsnorm(x, P["encoder.norm.weight"], cfg.norm_eps)
    for i in range(2):
        x = Mdl.block(P, f"decoder.layers.{i}.", x, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg)
    logits = Mdl.linear(Mdl.rmsnorm(x, P["norm.weight"], cfg.norm_eps), P["lm_head.weight"])
    check(rel_err(R.forward(P, cfg, tokens)["logits"].numpy(), logits.numpy()) < 1e-12, "extras by hand")
    run_cli("--ckpt", d, "--tokens", os.path.join(d, "tokens.txt"), "--out", os.path.join(TMP, "bx.st"))


@test
def gradcheck_controls():
    for i, (name, sets) in enumerate(CONTROLS.items()):
        d, cfg, params, tokens = fixture("dlcm", f"fd_c_{name}", GRAD_TINY + sets + ["bb_layers=1"],
                                         rows=2, L=12, seed=120 + i)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        # smoother off / rules: no gate to hold; otherwise the detached gate's function
        fd_check(cfg, params, tokens, bnd, smoother_fixed=cfg.smoother and not cfg.rule_router,
                 n_per_tensor=1, seed=i)
    d, cfg, params, tokens = fixture("baseline", "fd_bx", ["vocab_size=13", "d_token=8", "n_heads=2",
                                                           "n_kv_heads=1", "d_ff=12"] + BASELINE_EXTRAS,
                                     rows=2, L=9, seed=130)
    fd_check(cfg, params, tokens, None, False)


@test
def causality_controls():
    for i, (name, sets) in enumerate(CONTROLS.items()):
        causality_case("dlcm", sets, 140 + i, False)
    causality_case("dlcm", CONTROLS["smoother_off"], 150, True)
    causality_case("baseline", BASELINE_EXTRAS, 151, False)


if __name__ == "__main__":
    # optional arguments: substrings selecting tests by name
    for fn in TESTS:
        if len(sys.argv) < 2 or any(a in fn.__name__ for a in sys.argv[1:]):
            run_test(fn)
    if FAILS:
        print(f"temporary files kept in {TMP}")
        print(f"{len(FAILS)} FAILED: {', '.join(FAILS)}")
        sys.exit(1)
    shutil.rmtree(TMP, ignore_errors=True)
    print("all reference self-checks passed")

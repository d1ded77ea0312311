#!/usr/bin/python3
"""Self-check of the PyTorch reference (plain script; exits non-zero on failure).

  /usr/bin/python3 python/test_reference.py [NAME_SUBSTRING...]

Checks: safetensors round trip; reference.py CLI outputs for both architectures and the DLCM
variants; float64 finite-difference gradients (including the detached smoother gate, the aux-loss
gradient on p and router.smooth_grad); causality (a future token or boundary changes nothing at
earlier positions); replicate == compact cross-attention (and the multiplicity formula); one AdamW
step against a hand-written update with weight-decay groups and global-norm clipping.
"""
import math
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dlcm_ref as R  # noqa: E402
import make_fixture  # noqa: E402
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
    try:
        fn()
        print(f"[ OK ] {name}", flush=True)
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


@test
def p_gets_gradient_only_from_aux():
    d, cfg, params, tokens = fixture("dlcm", "pgrad", [], rows=3, L=20)
    bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
    P = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
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
@test
def replicate_equals_compact():
    for i, (name, sets) in enumerate(DLCM_VARIANTS.items()):
        d, cfg, params, tokens = fixture("dlcm", f"xa_{name}", sets, rows=3, L=24, seed=40 + i)
        bnd = R.read_rows(os.path.join(d, "boundaries.txt"))
        for b in (bnd, None):
            outs = {}
            for impl in ("replicate", "compact"):
                P = {k: v.clone().requires_grad_(True) for k, v in to64(params).items()}
                res = R.forward(P, cfg, tokens, None, b, xattn_impl=impl)
                res["loss"].backward()
                outs[impl] = (res["logits"].detach().numpy(), {k: v.grad.numpy() for k, v in P.items()})
            check(rel_err(outs["compact"][0], outs["replicate"][0]) < 1e-12, f"{name}: logits differ")
            for k in outs["replicate"][1]:
                check(np.abs(outs["compact"][1][k] - outs["replicate"][1][k]).max() < 1e-10, f"{name}: grad {k}")


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

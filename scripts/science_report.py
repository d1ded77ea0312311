#!/usr/bin/env python3
"""Tables (markdown) and learning curves (SVG) of scripts/science.sh's runs.

    python3 scripts/science_report.py --out runs/science [--svg DIR]
    python3 scripts/science_report.py --out runs/science --best-lr DESIGN

Reads each run folder's eval.json (full validation split, written by `dlcm eval`, with the
concept-usage diagnostics for DLCM runs) and train_log.jsonl. Main-phase runs are grouped by
design over seeds (mean +/- sample std). --best-lr prints the learning rate of the lr phase
with the lowest validation loss for that architecture (science.sh uses it for the main phase).
"""
import argparse
import glob
import json
import math
import os
import re
import statistics
import sys


def load_run(d):
    r = {"name": os.path.basename(d), "dir": d}
    ev = os.path.join(d, "eval.json")
    if os.path.exists(ev):
        r["eval"] = json.load(open(ev))
    cfgp = os.path.join(d, "checkpoint", "config.json")
    if os.path.exists(cfgp):
        r["config"] = json.load(open(cfgp))
    log = os.path.join(d, "train_log.jsonl")
    r["log"] = []
    if os.path.exists(log):
        for line in open(log):
            line = line.strip()
            if line:
                try:
                    r["log"].append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by an interrupted run
    return r


def usage(r):
    return (r.get("eval") or {}).get("concept_usage") or {}


def fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def first(d, *keys):
    for k in keys:
        if k in d:
            return d[k]
    return None


def design_table(runs):
    rows = ["| run | val loss | bits/byte | val compression | delta CE, concepts -> z_null | "
            "delta CE, concepts shuffled | abs(Wo att) / abs(H) | val tokens |",
            "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = r.get("eval")
        if not e:
            rows.append(f"| {r['name']} | (not evaluated) | | | | | | |")
            continue
        u = usage(r)
        rows.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], fmt(e.get("val_loss")), fmt(e.get("val_bpb")),
            fmt(e.get("val_compression"), 2),
            fmt(first(u, "delta_null", "delta_loss_null"), 4),
            fmt(first(u, "delta_shuffle", "delta_loss_shuffled"), 4),
            fmt(u.get("xattn_ratio"), 4), e.get("val_tokens", "-")))
    return "\n".join(rows)


def row_position_table(runs):
    """CE by the target's position in its row (dlcm eval's val_ce_by_row_position), for the runs
    whose eval has it; None when none has."""
    have = [r for r in runs if (r.get("eval") or {}).get("val_ce_by_row_position")]
    if not have:
        return None
    widest = max(have, key=lambda r: len(r["eval"]["val_ce_by_row_position"]["from"]))
    b = widest["eval"]["val_ce_by_row_position"]
    heads = [f"positions {f}-{t}" for f, t in zip(b["from"], b["to"])]
    rows = ["| run | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for r in have:
        ce = r["eval"]["val_ce_by_row_position"]["ce"]
        cells = [fmt(float(x)) for x in ce] + ["-"] * (len(heads) - len(ce))
        rows.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f} (1 seed)"
    return f"{statistics.mean(xs):.4f} +/- {statistics.stdev(xs):.4f} ({len(xs)} seeds)"


def split_seed(name):
    """("sg_incl_rope_w2", "3") for "sg_incl_rope_w2_s3"; (name, None) without a seed suffix."""
    base, _, seed = name.rpartition("_s")
    return (base, seed) if base and seed.isdigit() else (name, None)


def main_table(runs):
    groups = {}
    for r in runs:
        groups.setdefault(split_seed(r["name"])[0], []).append(r)
    rows = ["| design | val loss | bits/byte | delta CE, z_null | delta CE, shuffled |",
            "|---|---|---|---|---|"]
    for g, rs in sorted(groups.items()):
        ev = [r.get("eval") or {} for r in rs]
        us = [usage(r) for r in rs]
        rows.append("| {} | {} | {} | {} | {} |".format(
            g, mean_std([e.get("val_loss") for e in ev]), mean_std([e.get("val_bpb") for e in ev]),
            mean_std([first(u, "delta_null", "delta_loss_null") for u in us]),
            mean_std([first(u, "delta_shuffle", "delta_loss_shuffled") for u in us])))
    return "\n".join(rows)


def paired_table(runs, design):
    """The chosen design's validation loss minus every other main-phase design's, paired by
    seed (only seeds both have): mean +/- sample std and the per-seed differences."""
    by = {}
    for r in runs:
        base, seed = split_seed(r["name"])
        e = r.get("eval")
        if seed is not None and e and e.get("val_loss") is not None:
            by.setdefault(base, {})[seed] = e["val_loss"]
    if design not in by:
        return None
    rows = [f"| {design} minus | seeds | val loss difference, mean +/- std | per seed |",
            "|---|---|---|---|"]
    for g in sorted(by):
        common = sorted(set(by[g]) & set(by[design]), key=int)
        if g == design or not common:
            continue
        d = [by[design][k] - by[g][k] for k in common]
        sd = f" +/- {statistics.stdev(d):.4f}" if len(d) > 1 else ""
        per = ", ".join(f"s{k} {x:+.4f}" for k, x in zip(common, d))
        rows.append(f"| {g} | {len(d)} | {statistics.mean(d):+.4f}{sd} | {per} |")
    return "\n".join(rows)


def curves_svg(runs, path, key="ce", w=720, h=420):
    """Training CE against tokens for several runs, one polyline each, with a legend."""
    series = []
    for r in runs:
        pts = [(x["tokens"], x[key]) for x in r["log"] if key in x and "tokens" in x
               and x[key] is not None and math.isfinite(x[key])]
        if pts:
            series.append((r["name"], pts))
    if not series:
        return False
    xs = [p[0] for _, s in series for p in s]
    ys = [p[1] for _, s in series for p in s]
    x0, x1 = min(xs), max(xs)
    ys_sorted = sorted(ys)
    y0, y1 = ys_sorted[0], ys_sorted[int(0.98 * (len(ys_sorted) - 1))]  # clip the first steps
    m = 60
    sx = lambda x: m + (x - x0) / max(x1 - x0, 1) * (w - 2 * m)
    sy = lambda y: h - m - (min(y, y1) - y0) / max(y1 - y0, 1e-9) * (h - 2 * m)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h-m}" x2="{w-m}" y2="{h-m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h-m}" stroke="black"/>',
           f'<text x="{w/2}" y="{h-20}" text-anchor="middle">training tokens</text>',
           f'<text x="15" y="{h/2}" transform="rotate(-90 15 {h/2})" text-anchor="middle">training {key}</text>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{m-5}" y="{sy(yv)+4:.1f}" text-anchor="end">{yv:.2f}</text>')
        out.append(f'<text x="{sx(xv):.1f}" y="{h-m+15}" text-anchor="middle">{xv/1e6:.2f}M</text>')
    for i, (name, pts) in enumerate(series):
        c = colors[i % len(colors)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{d}"/>')
        out.append(f'<rect x="{w-m-170}" y="{m+i*16-9}" width="10" height="10" fill="{c}"/>')
        out.append(f'<text x="{w-m-155}" y="{m+i*16}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return True


def best_lr(out, name):
    """The lr-phase learning rate with the lowest full-split validation loss for design `name`.

    A design without its own sweep takes mean_shifted's (any DLCM design, and the legacy
    argument "dlcm") or the baseline's (baseline, baseline_extras)."""
    fallback = "baseline" if name.startswith("baseline") else "mean_shifted"
    for cand in ([name] if name not in ("dlcm", fallback) else []) + [fallback]:
        best = None
        for d in glob.glob(os.path.join(out, "lr", cand + "_lr*")):
            r = load_run(d)
            e = r.get("eval")
            if e is None or r["name"].rsplit("_lr", 1)[0] != cand:
                continue
            lr = r["name"].rsplit("_lr", 1)[1]
            if best is None or e["val_loss"] < best[0]:
                best = (e["val_loss"], lr)
        if best is not None:
            print(best[1])
            return
    sys.exit(f"science_report: no evaluated lr-phase run for {name} (or {fallback}) under {out}/lr")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/science")
    ap.add_argument("--svg", help="folder for learning-curve SVGs (one per phase)")
    ap.add_argument("--best-lr", metavar="DESIGN", help="a science.sh design name (or dlcm)")
    ap.add_argument("--design", help="main phase: also list its runs one by one, the design's "
                    "loss minus every other design's paired by seed, and draw only the design, "
                    "its no-path control and the two baselines")
    a = ap.parse_args()
    if a.best_lr:
        best_lr(a.out, a.best_lr)
        return
    for phase in ["lr", "design", "main", "ablations"]:
        dirs = sorted(d for d in glob.glob(os.path.join(a.out, phase, "*")) if os.path.isdir(d))
        if not dirs:
            continue
        runs = [load_run(d) for d in dirs]
        print(f"## {phase}\n")
        print(main_table(runs) if phase == "main" else design_table(runs))
        print()
        rp = row_position_table(runs)
        if rp:
            print("Validation CE by position in the row:\n")
            print(rp)
            print()
        if phase == "main" and a.design:
            pt = paired_table(runs, a.design)
            if pt is None:
                sys.exit(f"science_report: --design {a.design}: no evaluated main-phase run of it under {a.out}/main")
            m = re.search(r"_(w\d+)$", a.design)
            keep = {a.design, "nopath_" + m.group(1) if m else "nopath", "baseline", "baseline_extras"}
            runs = [r for r in runs if split_seed(r["name"])[0] in keep]
            print(design_table(runs))
            print()
            print(pt)
            print()
        if a.svg:
            os.makedirs(a.svg, exist_ok=True)
            p = os.path.join(a.svg, f"science_{phase}_curves.svg")
            if curves_svg(runs, p):
                print(f"Learning curves: `{p}`\n")


if __name__ == "__main__":
    main()

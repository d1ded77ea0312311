#!/usr/bin/env python3
"""Every option of every `dlcm` subcommand with each of a dozen kinds of bad or odd value.

Robustness check (docs/reliability.md). The test command runs it on a DLCM trained two steps on a
small byte-level corpus (tests/cli_sweep_check.sh, CTest `cli_sweep`); 1,346 runs in 1.5-2.5
minutes on the Zen 4 host of session 35. For each subcommand (from `--help`), the required options get working values (a
checkpoint, a data folder, a config; --ckpt/--data/--config below), the cheap extras keep real
work short (one training step, two new tokens, one batch), and then one option at a time is set
to each value of VALUES (or given alone, for a flag). Each run starts in an empty working folder.
A finding is a run that dies by a signal, exits with 126 or more, prints a sanitizer report,
`terminate called` or an `internal:` check; a run past --timeout is listed apart (a valid value
may start long work, e.g. `bench train`). Exits 1 when there is a finding.

  python3 scripts/cli_sweep.py --ckpt runs/bf16-check-dlcm/fp32 --data data/prepared \\
      --config configs/dlcm-small.json [--only eval,analyze] [--timeout 60]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

VALUES = ["-1", "0", "nan", "inf", "1e999", "", "abc", "/nonexistent/x",
          "99999999999999999999", "0.5", "\xff\xfe"]
# Servers and sweeps that run until stopped or for many minutes whatever their options.
SKIP = {("serve",), ("mup", "lr-sweep"), ("mup", "coord-check"), ("bench", "train"),
        ("bench", "gemm"), ("bench", "xattn"), ("bench", "serve"), ("prepare",), ("plot",),
        ("scaling", "fit")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dlcm", default="build/dlcm")
    ap.add_argument("--ckpt", required=True, help="a DLCM checkpoint or run folder")
    ap.add_argument("--data", required=True, help="a prepared data folder")
    ap.add_argument("--config", required=True, help="a config file")
    ap.add_argument("--only", default="", help="comma-separated subcommands (default: all)")
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()
    dlcm = os.path.abspath(a.dlcm)
    ckpt, data, config = (os.path.abspath(p) for p in (a.ckpt, a.data, a.config))
    work = tempfile.mkdtemp(prefix="dlcm-cli-sweep-")

    def help_of(cmd):
        return subprocess.run([dlcm] + cmd + ["--help"], capture_output=True, text=True,
                              timeout=30).stdout

    def subcommands(cmd):
        parts = help_of(cmd).split("Subcommands:")
        if len(parts) < 2:
            return []
        return [l.split()[0] for l in parts[1].splitlines() if re.match(r"^  \S", l)]

    def options(cmd):  # (name, takes a value, required)
        out = []
        for line in help_of(cmd).splitlines():
            m = re.match(r"^\s+(?:-\w,)?(--[\w-]+)\s*(.*)$", line)
            if m and m.group(1) not in ("--help", "--threads"):
                out.append((m.group(1), bool(re.match(r"(TEXT|INT|FLOAT|UINT|ENUM)", m.group(2))),
                            "REQUIRED" in m.group(2)))
        return out

    counter = [0]

    def fresh_out():
        counter[0] += 1
        return os.path.join(work, "out%d" % counter[0])

    fill = {"--ckpt": lambda: ckpt, "--data": lambda: data, "--out": fresh_out,
            "--config": lambda: config, "--tokens": lambda: os.path.join(data, "val.bin"),
            "--format": lambda: "hf", "--in": lambda: ckpt, "--match": lambda: config,
            "--dir": lambda: data, "--ids": lambda: "[1, 2, 3]"}
    extras = {
        ("generate",): ["--max-new-tokens", "2", "--prompt", "The cat"],
        ("segment",): ["--text", "The cat sat"],
        ("train",): ["--steps", "1", "--config", config, "--quiet", "--no-final-eval",
                     "--set", "train.eval_batches=1", "--set", "train.seq_len=32",
                     "--set", "train.batch_size=1"],
        ("eval",): ["--ckpt", ckpt, "--data", data, "--limit", "1"],
        ("analyze",): ["--batches", "1"],
        ("bench", "prefill"): ["--ckpt", ckpt, "--repeats", "1"],
        ("bench", "decode"): ["--ckpt", ckpt, "--repeats", "1", "--no-recompute"],
        ("tokenizer", "encode"): ["--text", "hi"],
    }
    cmds = []
    for s in subcommands([]):
        subs = subcommands([s])
        cmds += [[s, t] for t in subs] if subs else [[s]]
    only = set(filter(None, a.only.split(",")))
    cmds = [c for c in cmds if tuple(c) not in SKIP and (not only or c[0] in only)]

    findings, timeouts, runs = [], [], 0
    for cmd in cmds:
        opts = options(cmd)
        required = [o for o, _, r in opts if r]
        for opt, takes, _ in opts:
            for v in (VALUES if takes else [None]):
                extra = list(extras.get(tuple(cmd), []))
                if opt in extra:  # the varied option replaces its working value
                    i = extra.index(opt)
                    del extra[i:i + (1 if extra[i + 1:i + 2] and extra[i + 1].startswith("--") else 2)]
                args = [dlcm] + cmd
                for q in required:
                    if q != opt and q not in extra:
                        args += [q, fill.get(q, lambda: "x")()]
                args += extra + ([opt] if v is None else [opt, v])
                cwd = os.path.join(work, "cwd")
                shutil.rmtree(cwd, ignore_errors=True)
                os.makedirs(cwd)
                runs += 1
                shown = " ".join(args[1:])
                try:
                    r = subprocess.run(args, capture_output=True, timeout=a.timeout, cwd=cwd,
                                       stdin=subprocess.DEVNULL,
                                       env=dict(os.environ, OMP_NUM_THREADS="1"))
                except subprocess.TimeoutExpired:
                    timeouts.append(shown)
                    print("timeout:", shown, flush=True)
                    continue
                err = r.stderr.decode(errors="replace")
                if (r.returncode < 0 or r.returncode >= 126 or "Sanitizer" in err or
                        "terminate called" in err or "internal:" in err):
                    findings.append(shown)
                    print("FINDING: %s -> exit %d: %s" % (shown, r.returncode,
                                                           err[-400:].replace("\n", " | ")),
                          flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print("cli_sweep: %d runs of %d subcommands, %d findings, %d past the %g s timeout"
          % (runs, len(cmds), len(findings), len(timeouts), a.timeout))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

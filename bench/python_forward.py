"""What calling the engine from Python costs: Model.forward from Python against the same
computation timed inside C++ (Model._time_forward, the loop `dlcm forward` runs), and the CLI's
`dlcm forward` end to end, on the reference shape (8 rows of 512 tokens). Not a test; the
figures are in docs/python.md.

    PYTHONPATH=build/python OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive \
        .venv/bin/python bench/python_forward.py \
        [--config configs/baseline-reference.json] [--repeats 5] [--dlcm build/dlcm]

The model has the config's shape and the weights of one training step (the repository's docs
are prepared as a corpus and trained on first, in a temporary folder).
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import dlcm

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "baseline-reference.json"))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dlcm", default=str(ROOT / "build" / "dlcm"), help="the CLI binary")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The repository's docs as corpus, for a BPE tokenizer of the config's vocabulary size.
        docs = [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
        (tmp / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        vocab = dlcm.resolve_config(a.config)["vocab_size"]
        dlcm.prepare([tmp / "c.jsonl"], tmp / "data", vocab_size=vocab, val_fraction=0.1)
        dlcm.train(a.config, tmp / "data", tmp / "run", steps=1, quiet=True, final_eval=False,
                   overrides={"train.batch_size": 1, "train.seq_len": 64})
        rng = np.random.default_rng(0)

        model = dlcm.load(tmp / "run")
        tokens = rng.integers(4, vocab, size=(a.rows, a.seq_len)).astype(np.int32)
        model.forward(tokens)  # warm-up: buffers, GEMM primitives, page faults

        # Interleaved, so that a change in the machine's load hits both sides alike. Wall time,
        # and the process's CPU time (all threads), which other programs on a shared machine
        # disturb less (with OMP_WAIT_POLICY=passive, idle OpenMP threads do not spin).
        cpp, py, cpp_cpu, py_cpu, py_out = [], [], [], [], []
        buf = np.empty((a.rows, a.seq_len, vocab), np.float32)
        for _ in range(a.repeats):
            u0 = time.process_time()
            cpp += model._time_forward(tokens, 1)
            u1 = time.process_time()
            t0 = time.perf_counter()
            model.forward(tokens)
            py.append(time.perf_counter() - t0)
            u2 = time.process_time()
            cpp_cpu.append(u1 - u0)
            py_cpu.append(u2 - u1)
            t0 = time.perf_counter()
            model.forward(tokens, out=buf)
            py_out.append(time.perf_counter() - t0)
        c, p = statistics.median(cpp), statistics.median(py)

        (tmp / "tokens.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in tokens))
        cli = []
        for _ in range(max(1, a.repeats // 2)):
            t0 = time.perf_counter()
            subprocess.run([a.dlcm, "forward", "--ckpt", str(tmp / "run"), "--tokens",
                            str(tmp / "tokens.txt"), "--out", str(tmp / "out.safetensors")],
                           check=True, capture_output=True)
            cli.append(time.perf_counter() - t0)
        e2e = []
        for _ in range(max(1, a.repeats // 2)):
            t0 = time.perf_counter()
            with dlcm.load(tmp / "run") as m:
                m.forward(tokens)
            e2e.append(time.perf_counter() - t0)

    print(f"{model.arch} {Path(a.config).name}, tokens [{a.rows}, {a.seq_len}], "
          f"median of {a.repeats}")
    print(f"  forward inside C++ (Model._time_forward): {c * 1e3:9.1f} ms")
    ratios = sorted(y / x for x, y in zip(cpp, py))
    print(f"  Model.forward called from Python:        {p * 1e3:9.1f} ms  (median of the paired "
          f"ratios {100 * (statistics.median(ratios) - 1):+.2f}%, range {100 * (ratios[0] - 1):+.1f}% "
          f"to {100 * (ratios[-1] - 1):+.1f}%)")
    out_r = sorted(y / x for x, y in zip(cpp, py_out))
    print(f"  Model.forward(out=buffer) from Python:   {statistics.median(py_out) * 1e3:9.1f} ms  "
          f"(median of the paired ratios {100 * (statistics.median(out_r) - 1):+.2f}%)")
    cpu = sorted(y / x for x, y in zip(cpp_cpu, py_cpu))
    print(f"  CPU time, C++ / Python:                  {statistics.median(cpp_cpu) * 1e3:9.1f} ms / "
          f"{statistics.median(py_cpu) * 1e3:.1f} ms  (median of the paired ratios "
          f"{100 * (statistics.median(cpu) - 1):+.2f}%)")
    print(f"  `dlcm forward` process, end to end:      {statistics.median(cli) * 1e3:9.1f} ms"
          f"  (load, token file, {a.rows * a.seq_len * model.vocab_size * 4 / 2**20:.0f} MiB written)")
    print(f"  dlcm.load + Model.forward from Python:   {statistics.median(e2e) * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()

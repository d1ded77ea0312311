#!/usr/bin/env python3
"""The copy-task corpus of docs/science.md ("A positive control"): documents of LINES lines
`xxxxxxxx xxxxxxxx` (WIDTH random lowercase letters, a space, the same letters), separated by
blank lines, so `dlcm prepare --tokenizer bytes` splits them into documents. Deterministic.

usage: python3 scripts/make_copy_corpus.py --out copy.txt [--docs 6000] [--lines 28] [--width 8] [--seed 7]
"""
import argparse
import random


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--lines", type=int, default=28)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    if min(a.docs, a.lines, a.width) < 1:
        ap.error("--docs, --lines and --width must be >= 1")
    rng = random.Random(a.seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(a.out, "w") as f:
        for _ in range(a.docs):
            lines = []
            for _ in range(a.lines):
                w = "".join(rng.choice(letters) for _ in range(a.width))
                lines.append(w + " " + w)
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The copy-task corpus of docs/science.md ("A positive control"): documents of LINES lines
`xxxxxxxx xxxxxxxx` (WIDTH random lowercase letters, a space, the same letters), separated by
blank lines, so `dlcm prepare --tokenizer bytes` splits them into documents. Deterministic.
With --vocab N the words are drawn from a fixed list of N random words instead of being random
letters: the token path can then learn to spell a word once it has seen its first letters, and
what only the concepts can carry across the line is which word it was (log N nats per line), a
concept-sized piece of information rather than every letter.

usage: python3 scripts/make_copy_corpus.py --out copy.txt [--docs 6000] [--lines 28] [--width 8]
                                          [--vocab N] [--gap N] [--seed 7]
"""
import argparse
import random


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--lines", type=int, default=28)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=0, help="draw words from N fixed random words (0 = random letters)")
    ap.add_argument("--gap", type=int, default=0, help="dots between the two copies (0 = none)")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    if min(a.docs, a.lines, a.width) < 1:
        ap.error("--docs, --lines and --width must be >= 1")
    if a.vocab < 0 or a.gap < 0:
        ap.error("--vocab and --gap must be >= 0")
    sep = " " + "." * a.gap + " " if a.gap else " "
    rng = random.Random(a.seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(a.width)) for _ in range(a.vocab)})
    with open(a.out, "w") as f:
        for _ in range(a.docs):
            lines = []
            for _ in range(a.lines):
                if words:
                    w = rng.choice(words)
                else:
                    w = "".join(rng.choice(letters) for _ in range(a.width))
                lines.append(w + sep + w)
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

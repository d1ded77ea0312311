#!/usr/bin/env python3
"""Mutation check: do the tests notice when the code is wrong? (docs/reliability.md, "Tests that
can fail").

Takes one source file, makes single-token mutants of its lines (a comparison flipped or loosened,
`+ 1` -> `+ 0`, `+=` -> `=`, `&&` <-> `||`, `true` <-> `false`, `==` <-> `!=`, `++` -> `--`, a
statement deleted), and for each: rebuilds the given targets, runs the given test binaries, and
records whether a test failed ("killed"), none did ("survived"), or the mutant does not compile
("nobuild", not counted). A survivor is either a mutant that changes nothing observable (a log
line, a capacity never reached) or a gap in the tests: read each one.

The file is edited in place and restored after every mutant (also on Ctrl-C), so run it in a
separate worktree with its own build folder, not in the checkout you are working in:

  git worktree add ../dlcm-mut HEAD && cd ../dlcm-mut
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2
  python3 scripts/mutation_check.py --file src/models/dlcm_stream.cpp --lines 30-288 \\
      --count 40 --targets "dlcm test_stream test_dlcm_stream" --tests "test_stream test_dlcm_stream"

Before the first mutant the tests run once on the unmutated code: they must pass (a failing test
would "kill" every mutant), and the tests they skip are listed (a skipped test kills nothing:
in a worktree, link tests/interop/node_modules and .venv from the main checkout so the interop
tests run). The `dlcm` binary is always rebuilt too: many tests run the command line.

--replay RESULTS.jsonl runs again only the survivors of an earlier run (found by their line's text
when lines moved): after a test was added, to see which of them it kills now.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

# (pattern, replacement): one match at a time is replaced
OPERATORS = [
    (r"(?<![<>=!-])<(?![<=])(?=\s)", "<="), (r"<=", "<"),
    (r"(?<![-<>=])>(?![>=])(?=\s)", ">="), (r">=", ">"),
    (r"\+ 1\b", "+ 0"), (r"- 1\b", "- 0"), (r"\+=", "="),
    (r"\btrue\b", "false"), (r"\bfalse\b", "true"),
    (r"&&", "||"), (r"\|\|", "&&"), (r"==", "!="), (r"!=", "=="), (r"\+\+", "--"),
    (r"^(\s*)(\S.*;)\s*$", r"\1/* deleted */"),
]


def candidates(lines, first, last):
    """(line index, operator index, match start) of every mutable spot in lines [first, last]."""
    out = []
    for i in range(first - 1, min(last, len(lines))):
        s = lines[i].strip()
        # comments, preprocessor lines and checks (whose messages are all they would change)
        if not s or s.startswith(("//", "#", "*", "/*")) or "DLCM_CHECK" in lines[i]:
            continue
        for k, (pat, _) in enumerate(OPERATORS):
            for m in re.finditer(pat, lines[i]):
                out.append((i, k, m.start()))
    return out


def build(root, targets):
    """Rebuilds the targets in root/build; the completed process."""
    return subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target",
                           *targets], cwd=root, capture_output=True, text=True, errors="replace")


def run_tests(root, tests, timeout):
    """Runs the test binaries; (None, skipped) when all pass, else (kill record, skipped)."""
    skipped = []
    for t in tests:
        binary, _, flt = t.partition(":")
        if binary == "ctest":  # ctest:REGEX, the CTest entries that are not gtest binaries
            cmd = ["ctest", "--test-dir", "build", "-R", flt, "--no-tests=error"]
        else:
            cmd = [os.path.join(root, "build", binary)] + ([f"--gtest_filter={flt}"] if flt else [])
        try:
            r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, errors="replace",
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"result": "killed", "by": t + " (timeout)"}, skipped
        if binary == "ctest":
            if r.returncode != 0:
                failed = re.findall(r"\d+ - (\S+) \((?:Failed|Timeout|SEGFAULT|Subprocess)",
                                    r.stdout)
                return {"result": "killed", "by": t, "tests": sorted(set(failed))[:3]}, skipped
            skipped += [f"ctest:{name}" for name in
                        sorted(set(re.findall(r"Test +#\d+: (\S+) \.+\*+Skipped", r.stdout)))]
            continue
        if r.returncode != 0:
            failed = re.findall(r"\[  FAILED  \] ([^\s,]+)", r.stdout)
            return {"result": "killed", "by": binary, "tests": sorted(set(failed))[:3]}, skipped
        skipped += [f"{binary}:{name}" for name in
                    sorted(set(re.findall(r"\[  SKIPPED \] ([^\s,]+) \(", r.stdout)))]
    return None, skipped


def run_one(root, path, orig_lines, i, new_line, targets, tests, timeout):
    """Builds and tests the file with line i replaced; returns the result fields."""
    lines = list(orig_lines)
    lines[i] = new_line
    with open(path, "w") as f:
        f.write("\n".join(lines))
    if build(root, targets).returncode != 0:
        return {"result": "nobuild"}
    kill, _ = run_tests(root, tests, timeout)
    return kill or {"result": "survived"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", required=True, help="source file, relative to the project root")
    ap.add_argument("--lines", default="1-1000000", help="line range FIRST-LAST to mutate")
    ap.add_argument("--count", type=int, default=30, help="mutants that build, at most")
    ap.add_argument("--seed", type=int, default=1, help="which mutants (a random sample)")
    ap.add_argument("--targets", required=True, help="CMake targets to rebuild, space-separated")
    ap.add_argument("--tests", required=True,
                    help="test binaries in build/, space-separated (BINARY:GTEST_FILTER "
                         "allowed; ctest:REGEX runs those CTest entries, e.g. the interop checks)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per test binary")
    ap.add_argument("--out", default="mutants.jsonl", help="results, one JSON line per mutant")
    ap.add_argument("--replay", help="an earlier --out: run only its survivors again")
    a = ap.parse_args()
    root = os.getcwd()
    path = os.path.join(root, a.file)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(root, "build")):
        sys.exit(f"mutation_check: run it from a project root with a build/ folder; {a.file} "
                 "must exist there (see --help: use a separate worktree)")
    with open(path) as f:
        orig = f.read()
    orig_lines = orig.split("\n")
    targets, tests = a.targets.split(), a.tests.split()
    if "dlcm" not in targets:
        targets.append("dlcm")
        print("mutation_check: rebuilding the dlcm binary too (tests run the command line)")
    b = build(root, targets)
    if b.returncode != 0:
        sys.exit("mutation_check: the unmutated code does not build:\n" + b.stdout[-2000:])
    kill, skipped = run_tests(root, tests, a.timeout)
    if kill:
        sys.exit(f"mutation_check: the tests fail on the unmutated code ({kill}); fix that first")
    if skipped:
        print(f"mutation_check: {len(skipped)} tests skip here and can kill nothing: "
              + ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))

    def restore(*_):
        with open(path, "w") as f:
            f.write(orig)
        if _:
            sys.exit("mutation_check: interrupted; the file is restored")
    signal.signal(signal.SIGINT, restore)
    signal.signal(signal.SIGTERM, restore)

    jobs = []  # (line index, mutated line)
    if a.replay:
        with open(a.replay) as f:
            for r in map(json.loads, f):
                if r["result"] != "survived" or r["file"] != a.file:
                    continue
                at = [k for k, l in enumerate(orig_lines) if l.strip() == r["orig"]]
                if not at:
                    print(f"line {r['line']} no longer in the file: {r['orig']}")
                    continue
                i = min(at, key=lambda k: abs(k - (r["line"] - 1)))
                indent = orig_lines[i][:len(orig_lines[i]) - len(orig_lines[i].lstrip())]
                jobs.append((i, indent + r["mut"]))
    else:
        first, _, last = a.lines.partition("-")
        cands = candidates(orig_lines, int(first), int(last or first))
        random.Random(a.seed).shuffle(cands)
        for i, k, pos in cands:
            pat, rep = OPERATORS[k]
            m = re.compile(pat).search(orig_lines[i], pos)
            new = orig_lines[i][:m.start()] + m.expand(rep) + orig_lines[i][m.end():]
            if new != orig_lines[i]:
                jobs.append((i, new))
    counts = {"killed": 0, "survived": 0, "nobuild": 0}
    built = 0
    try:
        with open(a.out, "w") as out:
            for i, new in jobs:
                if built >= a.count and not a.replay:
                    break
                t0 = time.time()
                res = run_one(root, path, orig_lines, i, new, targets, tests, a.timeout)
                res = {"file": a.file, "line": i + 1, "orig": orig_lines[i].strip(),
                       "mut": new.strip(), **res, "seconds": round(time.time() - t0, 1)}
                counts[res["result"]] += 1
                built += res["result"] != "nobuild"
                out.write(json.dumps(res) + "\n")
                out.flush()
                print(f"{res['result']:8} {a.file}:{i + 1}: {res['mut']}"
                      + (f"  [{res.get('by')}]" if res["result"] == "killed" else ""), flush=True)
    finally:
        restore()
        build(root, targets)
    n = counts["killed"] + counts["survived"]
    print(f"{a.file}: {counts['killed']} of {n} mutants killed, {counts['survived']} survived, "
          f"{counts['nobuild']} did not build; results in {a.out}")


if __name__ == "__main__":
    main()

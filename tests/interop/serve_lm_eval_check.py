"""lm-evaluation-harness against `dlcm serve` (docs/serving.md, "Clients"; CTest
interop_serve_lm_eval_*, run with the project venv's python).

A tiny checkpoint of the given architecture with a SentencePiece BPE tokenizer (trained here on
ARC-Easy text past the evaluated items) is served on a free loopback port; lm-eval's
`local-completions` model, tokenizing with transformers' AutoTokenizer on the checkpoint's HF
export (`dlcm tokenizer export-hf`) and sending token ids (echo, logprobs, max_tokens 1), runs
the local task lm_eval_tasks/dlcm_arc_easy.yaml on the first N items of the bench folder's
arc_easy.jsonl (no hub access: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE). Its acc and acc_norm must
equal `dlcm eval --tasks arc_easy --limit N`'s; per request, lm-eval's (context, continuation)
strings must be dlcm's and its log-likelihoods within 1e-4 of dlcm's.

Without the bench folder (a clone on a machine without ../shared, as CI may be) the check runs on
a bench folder of its own: multiple-choice items in ARC-Easy's layout generated here (arithmetic,
categories, opposites, places with accented names; choices of different lengths, so acc_norm is
not acc), the tokenizer trained on later generated items and the project's docs. lm-eval and
`dlcm eval` read the same file either way, so the check is the same.

usage: serve_lm_eval_check.py --dlcm BUILD/dlcm --arch baseline|dlcm --bench-dir DIR (DLCM_BENCH_DIR wins)
                              [--limit 100] [--work DIR] [--generated]
Exit status 0: all checks pass; 1: a failure (printed).
"""
import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from serve_common import FAILS, Server, check, finish, run, train_tiny, write

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_YAML = os.path.join(HERE, "lm_eval_tasks", "dlcm_arc_easy.yaml")
MAX_SEQ = 1024  # every one of the first items fits: neither side truncates


def arc_corpus(bench, limit, path, extra=()):
    """ARC-Easy questions and their answers after the evaluated items, one per line; then the
    text of the files in `extra`."""
    lines = []
    with open(os.path.join(bench, "arc_easy.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= limit:
                d = json.loads(line)
                lines.append(d["query"] + " Answer: " + d["choices"][int(d["gold"])])
    for e in extra:
        lines.append(open(e, encoding="utf-8").read())
    return write(path, "\n".join(lines) + "\n")


# Word lists of the generated items (written here; no benchmark text).
CATEGORIES = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "grey", "turquoise"],
    "animal": ["horse", "sparrow", "salmon", "beetle", "otter", "tortoise", "elephant", "owl"],
    "tool": ["hammer", "screwdriver", "saw", "wrench", "chisel", "pliers", "spanner", "drill"],
    "fruit": ["apple", "pear", "plum", "mango", "cherry", "apricot", "banana", "pomegranate"],
    "metal": ["iron", "copper", "zinc", "silver", "aluminium", "tin", "nickel", "tungsten"],
}
OPPOSITES = [("hot", "cold"), ("wet", "dry"), ("early", "late"), ("heavy", "light"),
             ("loud", "quiet"), ("full", "empty"), ("rough", "smooth"), ("ancient", "modern"),
             ("narrow", "wide"), ("shallow", "deep"), ("sour", "sweet"), ("tight", "loose")]
PLACES = [("Zürich", "Switzerland"), ("Málaga", "Spain"), ("Kraków", "Poland"),
          ("Göteborg", "Sweden"), ("São Paulo", "Brazil"), ("Besançon", "France"),
          ("Reykjavík", "Iceland"), ("Brno", "Czechia"), ("Tromsø", "Norway"),
          ("Düsseldorf", "Germany"), ("Ōsaka", "Japan"), ("Plzeň", "Czechia")]


def generated_item(rng):
    """One multiple-choice item in ARC-Easy's layout: {"query", "choices", "gold"}."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(2, 60), rng.randrange(2, 60)
        right = a + b
        wrong = rng.sample([x for x in range(max(0, right - 12), right + 13) if x != right], 3)
        q, choices = f"What is {a} plus {b}?", [str(right)] + [str(w) for w in wrong]
    elif kind == 1:
        cat = rng.choice(sorted(CATEGORIES))
        others = [c for c in sorted(CATEGORIES) if c != cat]
        q = f"Which of these is a {cat}?"
        choices = [rng.choice(CATEGORIES[cat])] + [rng.choice(CATEGORIES[c])
                                                   for c in rng.sample(others, 3)]
    elif kind == 2:
        w, right = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            right, w = w, right
        pool = [x for pair in OPPOSITES for x in pair if x not in (w, right)]
        q, choices = f"What is the opposite of \u201c{w}\u201d?", [right] + rng.sample(pool, 3)
    else:
        city, country = rng.choice(PLACES)
        pool = sorted({c for _, c in PLACES if c != country})
        q = f"In which country is {city}?"
        choices = [country] + rng.sample(pool, 3)
    gold = rng.randrange(4)
    choices[0], choices[gold] = choices[gold], choices[0]
    return {"query": "Question: " + q, "choices": choices, "gold": gold}


def generated_bench(work, n):
    """A bench folder of its own: arc_easy.jsonl with n generated items (seeded)."""
    rng = random.Random(1234)
    d = os.path.join(work, "generated_bench")
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, "arc_easy.jsonl"),
          "".join(json.dumps(generated_item(rng), ensure_ascii=False) + "\n" for _ in range(n)))
    return d


def task_dir(work, bench):
    """The task YAML with its data file taken from the given bench folder."""
    text = open(TASK_YAML, encoding="utf-8").read()
    rel = "../shared/bench/arc_easy.jsonl"
    assert rel in text, f"{TASK_YAML} no longer names {rel}"
    d = os.path.join(work, "lm_eval_tasks")
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, "dlcm_arc_easy.yaml"),
          text.replace(rel, json.dumps(os.path.join(os.path.abspath(bench), "arc_easy.jsonl"))))
    return d


def number(x):
    return float(x[0] if isinstance(x, (list, tuple)) else x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dlcm", required=True)
    ap.add_argument("--arch", choices=["baseline", "dlcm"], required=True)
    ap.add_argument("--bench-dir", required=True, help="the benchmark folder (DLCM_BENCH_DIR wins)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--work")
    ap.add_argument("--generated", action="store_true",
                    help="use generated items even where the bench folder has arc_easy.jsonl")
    a = ap.parse_args()
    a.dlcm = os.path.abspath(a.dlcm)
    a.bench_dir = os.environ.get("DLCM_BENCH_DIR") or a.bench_dir  # as tests/test_eval.cpp
    work = a.work or tempfile.mkdtemp(prefix="dlcm_lm_eval_")
    os.makedirs(work, exist_ok=True)
    try:
        extra = ()
        if a.generated or not os.path.exists(os.path.join(a.bench_dir, "arc_easy.jsonl")):
            if not a.generated:
                print(f"no arc_easy.jsonl in {a.bench_dir} (DLCM_BENCH_DIR): generated items instead")
            a.bench_dir = generated_bench(work, a.limit + 3000)
            # later items alone repeat a few hundred words: the docs give the tokenizer text
            extra = sorted(glob.glob(os.path.join(HERE, "..", "..", "docs", "*.md")))
        corpus = arc_corpus(a.bench_dir, a.limit, os.path.join(work, "corpus.txt"), extra)
        ckpt = train_tiny(a.dlcm, work, a.arch, corpus, vocab=512, max_seq_len=MAX_SEQ, steps=40)
        hf_tok = os.path.join(work, "hf_tokenizer")
        run(a.dlcm, "tokenizer", "export-hf", "--dir", ckpt, "--out", hf_tok,
            "--model-max-length", MAX_SEQ)

        # dlcm's own scoring of the same items.
        report = os.path.join(work, "dlcm_eval.json")
        t0 = time.time()
        run(a.dlcm, "eval", "--ckpt", ckpt, "--tasks", "arc_easy", "--bench-dir", a.bench_dir,
            "--limit", a.limit, "--out", report, "--log-samples", "--quiet")
        t_dlcm = time.time() - t0
        ours = json.load(open(report))["tasks"]["arc_easy"]
        ours_samples = [json.loads(l) for l in open(glob.glob(os.path.join(work, "dlcm_eval*samples*arc_easy*.jsonl"))[0])]
        check(ours["n"] == a.limit and ours["truncated"] == 0,
              f"dlcm eval: {ours['n']} items, {ours['requests']} requests, none truncated "
              f"(acc {ours['acc']:.4f}, acc_norm {ours['acc_norm']:.4f}, {t_dlcm:.1f} s)")

        # lm-eval through the server.
        # One model thread: lm-eval (Python) and CTest neighbours share the 2 cores, and OpenMP
        # barriers between 2 threads then cost more than this tiny model's GEMMs gain.
        with Server(a.dlcm, ckpt, work, "--slots", 4, "--threads", 1,
                    "--model-name", "tiny-" + a.arch) as srv:
            out = os.path.join(work, "lm_eval_out")
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "HF_HOME": os.path.join(work, "hf_home"),
                   "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"}
            model_args = ",".join([
                f"base_url={srv.url}/v1/completions", f"model=tiny-{a.arch}",
                "tokenizer_backend=huggingface", f"tokenizer={hf_tok}", "tokenized_requests=True",
                # lm-eval keeps max_length - 1 tokens for the prompt and asks for 1 more token;
                # the server adds BOS in front: BOS + 1022 + 1 <= the model's 1024.
                f"max_length={MAX_SEQ - 1}", "num_concurrent=4", "max_retries=1", "timeout=120"])
            cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
                   "--model_args", model_args, "--tasks", "dlcm_arc_easy",
                   "--include_path", task_dir(work, a.bench_dir), "--limit", str(a.limit),
                   "--batch_size", "4", "--output_path", out, "--log_samples", "--seed", "1234"]
            before = srv.metric("dlcm_requests_total")
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
            t_lm = time.time() - t0
            served = srv.metric("dlcm_requests_total") - before
            if not check(r.returncode == 0, f"lm-eval local-completions on dlcm_arc_easy exits 0 ({t_lm:.1f} s)"):
                print(r.stdout[-3000:] + r.stderr[-5000:])
                print("server log (last lines):\n" + srv.tail())
                finish("lm-eval")
            check(srv.stop() == 0, "the server exits 0 on SIGTERM")
        res_file = sorted(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True))[-1]
        theirs = json.load(open(res_file))["results"]["dlcm_arc_easy"]
        samples = [json.loads(l) for l in open(sorted(glob.glob(
            os.path.join(out, "**", "samples_dlcm_arc_easy_*.jsonl"), recursive=True))[-1])]
        n_req = sum(len(s["arguments"]) for s in samples)
        check(len(samples) == a.limit and served > 0,
              f"lm-eval scored {len(samples)} items, {n_req} requests, through {served:.0f} "
              f"HTTP requests to the server (batches of 4, 4 concurrent)")

        # Request by request: the same strings, the same log-likelihoods.
        ours_by = {(s["doc_id"], s["choice"]): s for s in ours_samples}
        same_text, worst, missing = True, 0.0, 0
        for s in samples:
            args = s["arguments"]
            args = [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))] \
                if isinstance(args, dict) else args
            for j, (arg, resp) in enumerate(zip(args, s["resps"])):
                ctx, cont = (arg["arg_0"], arg["arg_1"]) if isinstance(arg, dict) else arg[:2]
                o = ours_by.get((s["doc_id"], j))
                if o is None:
                    missing += 1
                    continue
                same_text &= (ctx, cont) == (o["context"], o["continuation"])
                worst = max(worst, abs(number(resp[0]) - o["loglik"]))
        check(missing == 0 and same_text,
              "every lm-eval request (context, continuation) is dlcm eval's, string for string")
        check(worst <= 1e-4, f"per-request log-likelihoods: lm-eval via the server vs dlcm eval, "
              f"max |diff| {worst:.2e} <= 1e-4")
        for m in ("acc", "acc_norm"):
            differ = [s["doc_id"] for s in samples
                      if number(s[m]) != ours_by[(s["doc_id"], 0)][m]]
            got = theirs[f"{m},none"]
            # The same 0/1 items; the means differ at most in the last bit (summation order).
            check(not differ and abs(got - ours[m]) < 1e-12,
                  f"{m}: lm-eval {got:.4f} == dlcm eval {ours[m]:.4f} (first {a.limit} items"
                  + (f"; items that differ: {differ}" if differ else ", item for item") + ")")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    finish(f"lm-eval ({a.arch})")


if __name__ == "__main__":
    main()

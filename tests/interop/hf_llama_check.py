"""dlcm <-> Hugging Face transformers LlamaForCausalLM, judged by transformers itself
(docs/interop.md; CTest interop_hf_llama, run with the project venv's python).

(a) Baselines trained by dlcm (standard and µP with logit_mult 0.25, GQA, head_dim != d/heads)
    exported with `dlcm export --format hf`: AutoModelForCausalLM loads them; logits on fixed
    token rows agree with `dlcm forward` to <= 1e-4 relative (f32); 32 greedy tokens equal
    `dlcm generate --temperature 0 --ids`; sharded, bf16 and f16 exports load too; importing
    the f32 export gives back the checkpoint bit for bit.
(b) Tiny LLaMAs made by transformers (random init, save_pretrained; tied, GQA, sharded, bf16,
    head_dim != hidden/heads) imported with `dlcm import --format hf`: logits agree.

usage: hf_llama_check.py --dlcm BUILD/dlcm [--work DIR]
"""
import argparse
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

FAILS = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS.append(what)


def rel(a, b):
    """max |a - b| relative to the reference's largest magnitude."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run(dlcm, *args):
    r = subprocess.run([dlcm, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dlcm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def dlcm_logits(dlcm, ckpt, rows, work):
    tokens = os.path.join(work, "rows.txt")
    with open(tokens, "w") as f:
        f.write("\n".join(" ".join(map(str, r)) for r in rows) + "\n")
    out = os.path.join(work, "fwd.safetensors")
    run(dlcm, "forward", "--ckpt", ckpt, "--tokens", tokens, "--out", out)
    return load_file(out)["logits"]


def hf_logits(model_dir, rows, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(rows)).logits.float().numpy(), m


def token_rows(vocab, bos, n=3, length=24, seed=5):
    g = random.Random(seed)
    return [[bos] + [g.randrange(vocab) for _ in range(length - 1)] for _ in range(n)]


def dtypes_of(folder):
    found = set()
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "np") as s:
                for k in s.keys():
                    found.add(s.get_slice(k).get_dtype())  # "F32", "BF16", "F16"
    return found


def exported_baselines(dlcm, work):
    corpus = os.path.join(work, "corpus.txt")
    g = random.Random(1)
    words = ("the quick brown fox jumps over a lazy dog while seven cats sat on warm mats and "
             "birds sang in tall green trees near the river").split()
    with open(corpus, "w") as f:
        for _ in range(2000):
            f.write(" ".join(g.choice(words) for _ in range(g.randint(4, 25))) + ".\n")
    data = os.path.join(work, "data")
    run(dlcm, "prepare", "--input", corpus, "--out", data, "--tokenizer", "bytes")
    base = {"arch": "baseline", "vocab_size": 260, "d_token": 64, "n_heads": 4, "n_kv_heads": 2,
            "head_dim": 16, "d_ff": 128, "n_layers": 2, "qk_norm": False, "max_seq_len": 128,
            "rope_theta": 500000.0,
            "train": {"seq_len": 64, "batch_size": 8, "steps": 40, "warmup_steps": 5, "lr": 0.01,
                      "eval_every": 0, "log_every": 10, "ckpt_every": 1000}}
    mup = copy.deepcopy(base)
    mup.update({"n_kv_heads": 1, "head_dim": 24, "norm_eps": 1e-6,
                "mup": {"enabled": True, "d_base": 16}})
    for name, cfg in (("standard", base), ("mup", mup)):
        cfg_path = os.path.join(work, name + ".json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        run_dir = os.path.join(work, "run_" + name)
        run(dlcm, "train", "--config", cfg_path, "--data", data, "--out", run_dir, "--quiet",
            "--no-final-eval")
        yield name, os.path.join(run_dir, "checkpoint")


def check_exports(dlcm, work):
    for name, ckpt in exported_baselines(dlcm, work):
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        hf = os.path.join(work, "hf_" + name)
        run(dlcm, "export", "--ckpt", ckpt, "--format", "hf", "--out", hf)
        hcfg = json.load(open(os.path.join(hf, "config.json")))
        check(hcfg["model_type"] == "llama" and hcfg["architectures"] == ["LlamaForCausalLM"]
              and hcfg["torch_dtype"] == "float32", f"{name}: config.json names LlamaForCausalLM")
        rows = token_rows(260, 1)
        ref = dlcm_logits(dlcm, ckpt, rows, work)
        got, model = hf_logits(hf, rows)
        e = rel(got, ref)
        check(e <= 1e-4, f"{name} (logit_mult {cfg['logit_mult']}): transformers logits vs dlcm "
              f"forward, rel err {e:.2e} <= 1e-4")

        # Greedy: dlcm generate --temperature 0 against transformers' generate(do_sample=False),
        # both past EOS so that 32 tokens are compared.
        out = run(dlcm, "generate", "--ckpt", ckpt, "--prompt-file",
                  write(work, "prompts.txt", "the quick brown\nseven cats sat on\n"),
                  "--temperature", "0", "--max-new-tokens", "32", "--ignore-eos", "--ids",
                  "--quiet")
        gc = copy.deepcopy(model.generation_config)
        gc.eos_token_id = None
        for line in out.strip().splitlines():
            prompt, completion = line.split("->")
            prompt = [int(x) for x in prompt.split()]
            completion = [int(x) for x in completion.split()]
            with torch.no_grad():
                seq = model.generate(torch.tensor([prompt]), generation_config=gc,
                                     max_new_tokens=32, do_sample=False, pad_token_id=0,
                                     # given, so that generate does not probe torch.distributed
                                     # (whose FSDP module fails to import on Debian's torch 1.13
                                     # under Python 3.11)
                                     synced_gpus=False)
            hf_ids = seq[0, len(prompt):].tolist()
            check(len(completion) == 32 and hf_ids == completion,
                  f"{name}: 32 greedy tokens identical ({completion[:8]}...)")

        # Back into dlcm: the same checkpoint bit for bit (weights and config).
        back = os.path.join(work, "back_" + name)
        run(dlcm, "import", "--format", "hf", "--in", hf, "--out", back)
        a, b = load_file(os.path.join(ckpt, "model.safetensors")), load_file(
            os.path.join(back, "model.safetensors"))
        same = a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint32),
                                                           b[k].view(np.uint32)) for k in a)
        cb = json.load(open(os.path.join(back, "config.json")))
        check(same and cb == cfg, f"{name}: export -> import is bit-identical (weights, config)")

        # The tokenizer travels both ways: AutoTokenizer on the export gives dlcm's ids, and
        # the imported-back checkpoint (its tokenizer now read from HF's tokenizer.json)
        # generates the same greedy ids as the original.
        text = "Ça va? naïve café, 東京 and 😀 emoji;\n\ttabs  and   spaces end"
        ours = json.loads(run(dlcm, "tokenizer", "encode", "--dir", ckpt, "--text", text))
        at = AutoTokenizer.from_pretrained(hf)
        theirs = at(text, add_special_tokens=False)["input_ids"]
        check(theirs == ours and at.decode(theirs) == text,
              f"{name}: AutoTokenizer on the export encodes a UTF-8-rich text to dlcm's "
              f"{len(ours)} ids and decodes it back")
        # its length limit is the model's context (else transformers' default, ~1e30: no
        # warning before a prompt longer than the model can attend)
        hf_cfg = json.load(open(os.path.join(hf, "config.json")))
        check(at.model_max_length == hf_cfg["max_position_embeddings"],
              f"{name}: AutoTokenizer's model_max_length {at.model_max_length} is the model's "
              f"context {hf_cfg['max_position_embeddings']}")
        out_back = run(dlcm, "generate", "--ckpt", back, "--prompt-file",
                       write(work, "prompts.txt", "the quick brown\nseven cats sat on\n"),
                       "--temperature", "0", "--max-new-tokens", "32", "--ignore-eos", "--ids",
                       "--quiet")
        check(out_back == out, f"{name}: the imported-back checkpoint generates the same ids")

        # Sharded and 16-bit exports load too (one model is enough).
        if name != "standard":
            continue
        for dtype, tol, extra in (("f32", 1e-4, ["--shard-size", "100KB"]), ("bf16", 3e-2, []),
                                  ("f16", 3e-3, [])):
            d = os.path.join(work, f"hf_{name}_{dtype}{'_sharded' if extra else ''}")
            run(dlcm, "export", "--ckpt", ckpt, "--format", "hf", "--out", d, "--dtype", dtype,
                *extra)
            want = {"f32": "F32", "bf16": "BF16", "f16": "F16"}[dtype]
            shards = [f for f in os.listdir(d) if f.startswith("model-")]
            check(dtypes_of(d) == {want} and (not extra or (len(shards) > 1 and os.path.exists(
                os.path.join(d, "model.safetensors.index.json")))),
                f"{name} {dtype}{' sharded into %d files' % len(shards) if extra else ''}: "
                f"weights stored as {want}")
            got, _ = hf_logits(d, rows)
            e = rel(got, ref)
            check(e <= tol, f"{name} {dtype} export: transformers logits vs dlcm f32, rel err "
                  f"{e:.2e} <= {tol}")


def write(work, name, text):
    p = os.path.join(work, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def check_imports(dlcm, work):
    variants = [
        ("untied_mha", dict(num_key_value_heads=4, tie_word_embeddings=False), None, torch.float32),
        ("tied_gqa", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
         None, torch.float32),
        ("sharded", dict(num_key_value_heads=2), "30KB", torch.float32),
        ("head_dim", dict(num_key_value_heads=1, head_dim=16), None, torch.float32),
        ("bf16", dict(num_key_value_heads=2), None, torch.bfloat16),
    ]
    for name, kw, shard, dtype in variants:
        torch.manual_seed(len(name))
        cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                          initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=1,
                          eos_token_id=2, **kw)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # norms away from ones, so a swapped norm would show
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        model = model.to(dtype)
        d = os.path.join(work, "hf_made_" + name)
        if shard:
            model.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
        else:
            model.save_pretrained(d, safe_serialization=True)
        ck = os.path.join(work, "imported_" + name)
        run(dlcm, "import", "--format", "hf", "--in", d, "--out", ck)
        rows = token_rows(300, 1, seed=len(name))
        ours = dlcm_logits(dlcm, ck, rows, work)
        # transformers on the same weights in float32 (for bf16: the bf16 values, upcast).
        theirs, _ = hf_logits(d, rows, torch.float32)
        e = rel(ours, theirs)
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        check(e <= 1e-4, f"import {name} ({len(files)} file(s)): dlcm logits vs transformers "
              f"f32, rel err {e:.2e} <= 1e-4")
        if dtype == torch.bfloat16:
            native, _ = hf_logits(d, rows, torch.bfloat16)
            e = rel(ours, native)
            check(e <= 6e-2, f"import {name}: dlcm logits vs transformers computing in bf16, "
                  f"rel err {e:.2e} <= 6e-2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dlcm", required=True)
    ap.add_argument("--work")
    a = ap.parse_args()
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    work = a.work or tempfile.mkdtemp(prefix="dlcm_hf_")
    os.makedirs(work, exist_ok=True)
    try:
        check_exports(a.dlcm, work)
        check_imports(a.dlcm, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    if FAILS:
        sys.exit(f"{len(FAILS)} check(s) failed: " + "; ".join(FAILS))
    print("all transformers interop checks passed")


if __name__ == "__main__":
    main()

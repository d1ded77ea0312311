"""Fixtures for the tests of the Python package dlcm: a small corpus prepared with
dlcm.prepare, a tiny baseline and a tiny DLCM trained on it with dlcm.train (a few seconds
each), and the command-line tool (DLCM_BINARY, set by CTest; else build/dlcm) for the
comparisons with the CLI."""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import dlcm

ROOT = Path(__file__).resolve().parents[2]

TRAIN = {"seq_len": 32, "batch_size": 4, "steps": 6, "log_every": 1, "eval_every": 3,
         "eval_batches": 2, "ckpt_every": 3, "warmup_steps": 1, "lr": 0.01}

BASELINE = {"arch": "baseline", "vocab_size": 260, "d_token": 32, "n_heads": 2, "n_kv_heads": 1,
            "head_dim": 16, "d_ff": 64, "n_layers": 2, "max_seq_len": 64, "init_std": 0.2,
            "train": TRAIN}

DLCM = {"arch": "dlcm", "vocab_size": 260, "d_token": 32, "n_heads": 2, "n_kv_heads": 1,
        "head_dim": 16, "d_ff": 64, "enc_layers": 1, "dec_layers": 1, "d_concept": 48,
        "bb_layers": 1, "bb_heads": 3, "bb_kv_heads": 1, "bb_d_ff": 64, "x_heads": 2,
        "x_kv_heads": 1, "x_d_ff": 48, "max_seq_len": 64, "init_std": 0.2,
        "router": {"tau": 0.5}, "train": TRAIN}

WORDS = ("the cat dog sat on a mat and ran to see big small red blue tree house over under "
         "quick brown fox jumps lazy river stone light dark").split()


def corpus(n_docs=60, seed=7):
    """Deterministic English-like documents (words from a short list)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(3, 8))):
            words = rng.choice(WORDS, size=int(rng.integers(4, 10)))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def cli():
    exe = os.environ.get("DLCM_BINARY") or str(ROOT / "build" / "dlcm")
    if not Path(exe).exists():
        pytest.skip(f"no dlcm binary at {exe} (set DLCM_BINARY)")
    return exe


def run_cli(*args, check=True, text=True):
    r = subprocess.run([cli(), *map(str, args)], capture_output=True, text=text,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if check and r.returncode != 0:
        raise AssertionError(f"dlcm {' '.join(map(str, args))} failed:\n{r.stderr!r}")
    return r


def read_safetensors(path):
    """name -> array (float32 / int32 / ...) of a .safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    dtypes = {"F32": np.float32, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus()))
    meta = dlcm.prepare([src], root / "prepared", tokenizer="bytes", val_fraction=0.1)
    assert isinstance(meta, dict)
    return root / "prepared"


def _train(tmp_path_factory, data_dir, config, name):
    out = tmp_path_factory.mktemp(name) / "run"
    records = []
    summary = dlcm.train(config, data_dir, out, on_log=records.append, quiet=True)
    return {"out": out, "summary": summary, "records": records}


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, data_dir):
    return _train(tmp_path_factory, data_dir, BASELINE, "baseline")


@pytest.fixture(scope="session")
def dlcm_run(tmp_path_factory, data_dir):
    return _train(tmp_path_factory, data_dir, DLCM, "dlcm")


@pytest.fixture(scope="session", params=["baseline", "dlcm"])
def run(request, baseline_run, dlcm_run):
    return baseline_run if request.param == "baseline" else dlcm_run


@pytest.fixture(scope="session")
def baseline_model(baseline_run):
    return dlcm.load(baseline_run["out"])


@pytest.fixture(scope="session")
def dlcm_model(dlcm_run):
    return dlcm.load(dlcm_run["out"])


@pytest.fixture(scope="session", params=["baseline", "dlcm"])
def model(request, baseline_model, dlcm_model):
    return baseline_model if request.param == "baseline" else dlcm_model


@pytest.fixture
def tokens():
    rng = np.random.default_rng(3)
    return rng.integers(4, 260, size=(3, 24)).astype(np.int32)

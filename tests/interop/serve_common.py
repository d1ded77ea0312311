"""Shared by the `dlcm serve` client checks (serve_openai_check.py, serve_lm_eval_check.py):
tiny checkpoints that dlcm prepares and trains itself in seconds, the server started on a free
loopback port (`--port 0`, URL parsed from its "listening on" line), raw HTTP for what an SDK
will not send, and the ok/FAIL lines of the other interop checks."""
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

FAILS = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS.append(what)
    return ok


def finish(name):
    if FAILS:
        sys.exit(f"{len(FAILS)} check(s) failed: " + "; ".join(FAILS))
    print(f"all {name} checks passed")


def run(dlcm, *args):
    r = subprocess.run([dlcm, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dlcm {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


WORDS = ("the quick brown fox jumps over a lazy dog while seven cats sat on warm mats and birds "
         "sang in tall green trees near the river").split()


def synthetic_corpus(path, lines=3000, seed=1):
    """One document of English-like lines (no blank line, so EOS is rare: long streams)."""
    g = random.Random(seed)
    return write(path, "".join(" ".join(g.choice(WORDS) for _ in range(g.randint(4, 25))) + ".\n"
                               for _ in range(lines)))


def tiny_config(arch, vocab, max_seq_len, steps=40):
    train = {"seq_len": 64, "batch_size": 8, "steps": steps, "warmup_steps": 5, "lr": 0.01,
             "eval_every": 0, "log_every": 10, "ckpt_every": 100000}
    common = {"arch": arch, "vocab_size": vocab, "d_token": 64, "n_heads": 4, "n_kv_heads": 2,
              "head_dim": 16, "d_ff": 128, "max_seq_len": max_seq_len, "train": train}
    if arch == "baseline":
        return {**common, "n_layers": 2}
    return {**common, "enc_layers": 1, "dec_layers": 1, "d_concept": 96, "bb_layers": 1,
            "bb_heads": 4, "bb_kv_heads": 2, "bb_d_ff": 128, "x_heads": 4, "x_kv_heads": 2,
            "x_d_ff": 96, "router": {"tau": 0.5}}


def train_tiny(dlcm, work, arch, corpus, vocab=300, max_seq_len=1024, steps=40):
    """prepare (SentencePiece BPE of `vocab` pieces) + train: the run's checkpoint folder."""
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        run(dlcm, "prepare", "--input", corpus, "--out", data, "--tokenizer", "bpe",
            "--vocab-size", vocab)
    cfg = write(os.path.join(work, arch + ".json"), json.dumps(tiny_config(arch, vocab, max_seq_len, steps)))
    out = os.path.join(work, "run_" + arch)
    run(dlcm, "train", "--config", cfg, "--data", data, "--out", out, "--quiet", "--no-final-eval",
        "--overwrite")
    return os.path.join(out, "checkpoint")


class Server:
    """`dlcm serve --port 0 ...` as a child process; its stderr (the request log) goes to a file."""

    def __init__(self, dlcm, ckpt, work, *extra, name="serve", env=None):
        self.log_path = os.path.join(work, name + ".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([dlcm, "serve", "--ckpt", ckpt, "--port", "0", *map(str, extra)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})
        found = {}

        def read():  # the first stdout line that names the URL; later stdout lines are drained
            for line in self.proc.stdout:
                m = re.search(r"listening on (http://\S+)", line)
                if m and "url" not in found:
                    found["url"] = m.group(1)
                    found["line"] = line.rstrip("\n")

        threading.Thread(target=read, daemon=True).start()
        t0 = time.time()
        while "url" not in found and self.proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
        if "url" not in found:
            self.stop()
            sys.exit(f"dlcm serve did not print its URL (exit {self.proc.returncode}):\n{self.tail()}")
        self.url = found["url"]
        self.line = found["line"]
        u = urllib.parse.urlparse(self.url)
        self.host, self.port = u.hostname, u.port
        self.base = self.url.rstrip("/") + "/v1"

    def tail(self, n=30):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, parsed JSON or raw text) over a fresh connection; body: dict, str or bytes."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        h = {"Content-Type": "application/json", **(headers or {})}
        if isinstance(body, dict) or isinstance(body, list):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read().decode("utf-8", errors="replace")
            try:
                return r.status, json.loads(data)
            except ValueError:
                return r.status, data
        finally:
            c.close()

    def health(self):
        return self.request("GET", "/health")[1]

    def wait_idle(self, seconds):
        """True when /health reports no busy slot and an empty queue within `seconds`."""
        t0 = time.time()
        while time.time() - t0 < seconds:
            h = self.health()
            if isinstance(h, dict) and h.get("slots_busy") == 0 and h.get("queue") == 0:
                return True
            time.sleep(0.05)
        return False

    def metric(self, name):
        """The sum of a Prometheus counter's samples from GET /metrics."""
        status, text = self.request("GET", "/metrics")
        total = 0.0
        for line in str(text).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        """SIGTERM, then the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()

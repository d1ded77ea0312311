"""`dlcm serve` judged by the official OpenAI SDKs (docs/serving.md, "Clients"; CTest
interop_serve_python_* and interop_serve_node_*, run with the project venv's python).

A tiny checkpoint of the given architecture (BPE tokenizer, trained here in seconds) is served on
a free loopback port, and:
  --client python: the openai Python SDK: /v1/models; completions from a string, a list of
    strings, token ids (with and without BOS) and a batch of id lists; stop strings; n; seeded
    sampling is reproducible; chat completions (string and list-of-parts content); streaming of
    both (deltas, finish_reason, usage chunk); logprobs (top-N, text offsets; chat's content
    logprobs); every greedy output equals `dlcm generate --temperature 0` (text, token count,
    finish reason); echo log-probabilities (max_tokens 0) equal the log-softmax of
    `dlcm forward`'s logits (<= 1e-4); 32 concurrent streaming clients (AsyncOpenAI) each get
    what the same request gets alone; a streaming client SIGKILLed mid-stream, and a raw socket
    closed mid-stream, free their slot (GET /health) and the rest of the generation is not
    computed (GET /metrics); --api-key: the SDK's AuthenticationError for a wrong key, success
    with the right one; hostile raw requests (bad JSON, invalid UTF-8, an oversized body, ...)
    get their 4xx and the server keeps serving; SIGTERM ends the server with status 0.
  --client node: the same model through the official `openai` npm SDK
    (tests/interop/serve_openai.mjs): completions, chat, streaming, logprobs, ids, echo,
    against the same `dlcm generate` / `dlcm forward` references.

usage: serve_openai_check.py --dlcm BUILD/dlcm --arch baseline|dlcm [--client python|node]
                             [--work DIR]
Exit status 0: all checks pass; 1: a failure (printed); 77: node or the npm SDK is missing.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

from serve_common import FAILS, Server, check, finish, run, synthetic_corpus, train_tiny, write

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["the quick brown", "seven cats sat on", "birds sang in tall green", "a lazy dog"]
MAX_NEW = 20
# A prompt longer than the server's prefill chunk (--prefill-chunk 32 below): chunked prefill.
LONG = (("the quick brown fox jumps over a lazy dog while seven cats sat on warm mats and birds "
        "sang in tall green trees near the river. ") * 4).strip()
CHAT = [{"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "the quick brown fox"}]
CHAT_PROMPT = "System: You answer in one line.\n\nUser: the quick brown fox\n\nAssistant:"


def generate(dlcm, ckpt, work, prompts, max_new, *extra):
    """`dlcm generate --temperature 0 --json` per prompt, with the prompt's ids (BOS first)."""
    f = write(os.path.join(work, "prompts.txt"), "\n".join(prompts) + "\n")
    js = [json.loads(l) for l in run(dlcm, "generate", "--ckpt", ckpt, "--prompt-file", f,
                                     "--temperature", "0", "--max-new-tokens", max_new,
                                     "--json", "--quiet", *extra).splitlines() if l.strip()]
    ids = run(dlcm, "generate", "--ckpt", ckpt, "--prompt-file", f, "--temperature", "0",
              "--max-new-tokens", max_new, "--ids", "--quiet", *extra).splitlines()
    for j, line in zip(js, ids):
        j["prompt_ids"] = [int(x) for x in line.split("->")[0].split()]
    return js


def piece_bytes(piece):
    """The bytes of a logprobs token: "bytes:\\xNN..." marks a piece that is not whole UTF-8."""
    if piece.startswith("bytes:"):
        return bytes(int(h, 16) for h in piece[len("bytes:"):].split("\\x")[1:])
    return piece.encode()


def finish_of(ref):
    return "length" if ref["stop_reason"] == "length" else "stop"


def echo_reference(dlcm, ckpt, work, prompt_ids):
    """log-softmax of `dlcm forward`'s logits at each prompt token after BOS (float64)."""
    rows = write(os.path.join(work, "echo_row.txt"), " ".join(map(str, prompt_ids)) + "\n")
    out = os.path.join(work, "echo_fwd.safetensors")
    run(dlcm, "forward", "--ckpt", ckpt, "--tokens", rows, "--out", out)
    logits = load_file(out)["logits"][0].astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    ls = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return [float(ls[t, prompt_ids[t + 1]]) for t in range(len(prompt_ids) - 1)]


# ---------------------------------------------------------------- the Python SDK
def python_checks(a, srv, ckpt, work, refs, chat_ref, long_ref):
    import openai
    from openai import AsyncOpenAI, OpenAI

    client = OpenAI(base_url=srv.base, api_key="unused", max_retries=0, timeout=120)
    name = "tiny-" + a.arch
    bos = refs[0]["prompt_ids"][0]

    models = client.models.list().data
    meta = models[0].to_dict().get("meta", {}) if models else {}
    check(len(models) == 1 and models[0].id == name and meta.get("arch") == a.arch,
          f"models.list: one model '{name}', meta.arch {a.arch} (got {[m.id for m in models]}, {meta})")

    def same(c, ref, what):
        ok = (c.text == ref["text"] and c.finish_reason == finish_of(ref))
        check(ok, f"{what}: {ref['text']!r} ({finish_of(ref)}) == dlcm generate's"
              + ("" if ok else f", got {c.text!r} ({c.finish_reason})"))

    # Completions: a string, a list of strings, ids (with and without BOS), a batch of ids.
    for p, ref in zip(PROMPTS, refs):
        r = client.completions.create(model="ignored", prompt=p, max_tokens=MAX_NEW, temperature=0)
        same(r.choices[0], ref, f"completion of {p!r}")
        check(r.usage.completion_tokens == ref["new_tokens"]
              and r.usage.prompt_tokens == len(ref["prompt_ids"]) - 1
              and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
              and r.model == name and r.object == "text_completion",
              f"usage of {p!r}: prompt {r.usage.prompt_tokens} (without BOS), completion "
              f"{r.usage.completion_tokens} tokens as generate's {ref['new_tokens']}")
    r = client.completions.create(model=name, prompt=PROMPTS, max_tokens=MAX_NEW, temperature=0)
    ch = sorted(r.choices, key=lambda c: c.index)
    check([c.index for c in ch] == list(range(len(PROMPTS)))
          and all(c.text == ref["text"] for c, ref in zip(ch, refs)),
          f"a list of {len(PROMPTS)} prompts in one request: each choice equals its prompt's greedy text")
    ids = refs[0]["prompt_ids"][1:]
    for what, prompt in (("token ids", ids), ("token ids starting with BOS", [bos] + ids)):
        r = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        same(r.choices[0], refs[0], f"completion of {what}")
    r = client.completions.create(model=name, prompt=[ref["prompt_ids"][1:] for ref in refs],
                                  max_tokens=MAX_NEW, temperature=0)
    ch = sorted(r.choices, key=lambda c: c.index)
    check(all(c.text == ref["text"] for c, ref in zip(ch, refs)) and len(ch) == len(refs),
          f"a batch of {len(refs)} id lists: each choice equals generate's")
    r = client.completions.create(model=name, prompt=LONG, max_tokens=MAX_NEW, temperature=0)
    same(r.choices[0], long_ref, f"a {len(long_ref['prompt_ids'])}-token prompt (prefilled in chunks of 32)")

    # Stop strings, n, seeded sampling.
    text = refs[1]["text"]
    if len(text) >= 8:
        stop = text[len(text) // 2:len(text) // 2 + 3]
        r = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=MAX_NEW,
                                      temperature=0, stop=[stop, "never seen"])
        c = r.choices[0]
        check(c.text == text[:text.find(stop)] and c.finish_reason == "stop",
              f"stop {stop!r}: the text ends before it ({c.text!r}, {c.finish_reason})")
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_NEW,
                                  temperature=0, n=3)
    check(len(r.choices) == 3 and all(c.text == refs[0]["text"] for c in r.choices),
          "n=3 greedy: three identical choices")
    kw = dict(model=name, prompt=PROMPTS[2], max_tokens=MAX_NEW, temperature=1.0, seed=11, n=2)
    s1 = [c.text for c in sorted(client.completions.create(**kw).choices, key=lambda c: c.index)]
    s2 = [c.text for c in sorted(client.completions.create(**kw).choices, key=lambda c: c.index)]
    check(s1 == s2, f"sampling with seed 11, n=2: the same texts twice ({s1[0][:30]!r}, ...)")

    # Streaming completions: deltas add up, one finish_reason at the end, a usage chunk.
    for p, ref in zip(PROMPTS[:2], refs):
        parts, finishes, usage, n_chunks = [], [], None, 0
        for chunk in client.completions.create(model=name, prompt=p, max_tokens=MAX_NEW,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            n_chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                parts.append(c.text or "")
                if c.finish_reason:
                    finishes.append(c.finish_reason)
        check("".join(parts) == ref["text"] and finishes == [finish_of(ref)] and usage is not None
              and usage.completion_tokens == ref["new_tokens"] and n_chunks > 2,
              f"streamed completion of {p!r}: {n_chunks} chunks add up to generate's text, "
              f"finish_reason {finishes}, usage chunk {usage.completion_tokens if usage else None} tokens")

    # Chat: the default template gives exactly the completion of its rendered prompt.
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=MAX_NEW, temperature=0)
    m = r.choices[0]
    check(m.message.role == "assistant" and m.message.content == chat_ref["text"]
          and m.finish_reason == finish_of(chat_ref) and r.object == "chat.completion",
          f"chat completion == dlcm generate of the rendered template (stop \"\\n\\nUser:\"): "
          f"{chat_ref['text']!r}" + ("" if m.message.content == chat_ref["text"] else f", got {m.message.content!r}"))
    parts_msgs = [{"role": x["role"], "content": [{"type": "text", "text": x["content"]}]} for x in CHAT]
    r2 = client.chat.completions.create(model=name, messages=parts_msgs, max_tokens=MAX_NEW, temperature=0)
    check(r2.choices[0].message.content == m.message.content,
          "chat with content as a list of text parts: the same answer")
    deltas, roles, finishes, objects = [], [], [], set()
    for chunk in client.chat.completions.create(model=name, messages=CHAT, max_tokens=MAX_NEW,
                                                temperature=0, stream=True):
        objects.add(chunk.object)
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                deltas.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    check(objects == {"chat.completion.chunk"} and roles[:1] == ["assistant"] and "".join(deltas) == m.message.content
          and finishes == [m.finish_reason],
          f"streamed chat: role first, {len(deltas)} content deltas add up to the answer, "
          f"finish_reason {finishes}")

    # Logprobs: top-N alternatives, greedy picks the best, pieces spell the text.
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    ok = (len(lp.tokens) == r.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
          and b"".join(map(piece_bytes, lp.tokens)).decode(errors="replace") == c.text
          and all(len(t) == 3 and max(t.values()) == v and t.get(tok) == v and v <= 0
                  for tok, v, t in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
          and lp.text_offset == [sum(len(piece_bytes(x)) for x in lp.tokens[:i])
                                 for i in range(len(lp.tokens))])
    check(ok, f"logprobs=3: {len(lp.tokens)} tokens spelling the text, each the best of its 3 "
          f"alternatives, byte offsets")
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else []
    check(len(content) == r.usage.completion_tokens
          and bytes(b for t in content for b in t.bytes).decode(errors="replace")
          == r.choices[0].message.content
          and all(bytes(t.bytes) == piece_bytes(t.token) and len(t.top_logprobs) == 2
                  and t.top_logprobs[0].logprob == t.logprob for t in content),
          f"chat logprobs: {len(content)} tokens with bytes and 2 alternatives, the first the chosen")

    # Echo: the prompt's log-probabilities == log-softmax of dlcm forward's logits.
    worst = 0.0
    for p, ref in zip(PROMPTS + [LONG], refs + [long_ref]):
        ids = ref["prompt_ids"]
        want = echo_reference(a.dlcm, ckpt, work, ids)
        for prompt in (p, ids[1:]):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True,
                                          logprobs=1, temperature=0)
            lp = r.choices[0].logprobs
            got = lp.token_logprobs
            ok = (len(got) == len(want) and all(v is not None for v in got)
                  and r.choices[0].text == p and r.usage.completion_tokens == 0)
            err = max(abs(x - y) for x, y in zip(got, want)) if ok else float("inf")
            worst = max(worst, err)
            check(ok and err <= 1e-4, f"echo of {len(want)} prompt tokens "
                  f"({'text' if isinstance(prompt, str) else 'ids'}): logprobs vs dlcm forward, "
                  f"max |diff| {err:.2e} <= 1e-4")
    # A text with multi-byte characters: byte-fallback pieces ("bytes:\\xNN"), byte offsets.
    utf8 = "Ça va? 東京 and 😀"
    ids = [bos] + json.loads(run(a.dlcm, "tokenizer", "encode", "--dir", ckpt, "--text", utf8))
    want = echo_reference(a.dlcm, ckpt, work, ids)
    r = client.completions.create(model=name, prompt=utf8, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    ok = r.choices[0].text == utf8 and len(lp.token_logprobs) == len(want)
    err = max(abs(x - y) for x, y in zip(lp.token_logprobs, want)) if ok else float("inf")
    worst = max(worst, err)
    check(ok and err <= 1e-4 and b"".join(map(piece_bytes, lp.tokens)) == utf8.encode()
          and lp.text_offset == [sum(len(piece_bytes(x)) for x in lp.tokens[:i])
                                 for i in range(len(lp.tokens))],
          f"echo of {utf8!r} ({len(want)} tokens, {sum(t.startswith('bytes:') for t in lp.tokens)} "
          f"partial-UTF-8 pieces): the pieces' bytes spell it, byte offsets, logprobs vs dlcm "
          f"forward max |diff| {err:.2e}")
    print(f"     (largest echo logprob difference: {worst:.3e})")
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=5, echo=True,
                                  logprobs=0, temperature=0)
    lp = r.choices[0].logprobs
    gen5 = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=5, temperature=0).choices[0].text
    check(r.choices[0].text == PROMPTS[0] + gen5
          and len(lp.tokens) == len(refs[0]["prompt_ids"]) - 1 + r.usage.completion_tokens,
          "echo with max_tokens 5: prompt + completion, tokens of both")

    concurrent_checks(srv, name)
    # The tiny model writes 900 tokens in a few milliseconds, sooner than a client process can be
    # killed after its first chunks: the disconnect checks run on a second server of the same
    # checkpoint whose decode steps pause 2 ms each (DLCM_SERVE_STEP_PAUSE_MS, a test setting).
    with Server(a.dlcm, ckpt, work, "--slots", 2, "--model-name", name, name="serve_paced",
                env={"DLCM_SERVE_STEP_PAUSE_MS": "2"}) as paced:
        check("DLCM_SERVE_STEP_PAUSE_MS=2: every decode step pauses 2 ms" in paced.tail(),
              "a server with DLCM_SERVE_STEP_PAUSE_MS set says so in its log")
        disconnect_checks(a, paced, name)
    hostile_checks(srv, name, refs[0])
    # Still serving after all of that.
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0)
    same(r.choices[0], refs[0], "after the hostile requests, the same greedy completion")


def concurrent_checks(srv, name):
    from openai import AsyncOpenAI, OpenAI

    reqs = []
    for i in range(32):
        p = f"{PROMPTS[i % 4]} {['and', 'the', 'over', 'near'][i // 8]}"
        kw = dict(model=name, prompt=p, max_tokens=8 + (i * 7) % 40, temperature=0)
        if i % 8 == 7:  # a few sampled ones: a seed gives the same text whatever else runs
            kw.update(temperature=0.9, seed=100 + i)
        reqs.append(kw)

    async def one(client, kw):
        text, finishes = [], []
        stream = await client.completions.create(stream=True, **kw)
        async for chunk in stream:
            for c in chunk.choices:
                text.append(c.text or "")
                if c.finish_reason:
                    finishes.append(c.finish_reason)
        return "".join(text), finishes

    async def all_of():
        async with AsyncOpenAI(base_url=srv.base, api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, kw) for kw in reqs), return_exceptions=True)

    t0 = time.time()
    got = asyncio.run(all_of())
    dt = time.time() - t0
    errors = [g for g in got if isinstance(g, BaseException)]
    check(not errors and all(len(f) == 1 for _, f in got),
          f"32 concurrent streaming clients all complete ({dt:.1f} s)"
          + (f": {len(errors)} failed, first {errors[0]!r}" if errors else ""))
    client = OpenAI(base_url=srv.base, api_key="unused", max_retries=0, timeout=120)
    bad = []
    for i, (kw, g) in enumerate(zip(reqs, got)):
        if isinstance(g, BaseException):
            continue
        c = client.completions.create(**kw).choices[0]
        if (c.text, [c.finish_reason]) != g:
            bad.append(i)
    check(not errors and not bad, f"each of the 32 (28 greedy, 4 seeded samples) equals the same "
          f"request run alone" + (f"; differ: {bad}" if bad else ""))
    check(srv.wait_idle(5), "afterwards /health shows every slot idle and an empty queue")


KILLED_CLIENT = r"""
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
for chunk in c.completions.create(model="m", prompt=sys.argv[2], max_tokens=int(sys.argv[3]),
                                  temperature=0, stream=True):
    print("chunk", flush=True)
"""


def disconnect_checks(a, srv, name):
    max_tokens = 900
    # (1) an SDK client in a child process, SIGKILLed after a few chunks.
    before = srv.metric("dlcm_generated_tokens_total")
    child = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, srv.base, PROMPTS[0], str(max_tokens)],
                             stdout=subprocess.PIPE, text=True)
    seen = 0
    while seen < 5 and child.stdout.readline():
        seen += 1
    busy = srv.health().get("slots_busy")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    t0 = time.time()
    idle = srv.wait_idle(3)
    dt = time.time() - t0
    generated = srv.metric("dlcm_generated_tokens_total") - before
    check(seen == 5 and busy == 1 and idle and generated < max_tokens,
          f"an SDK client SIGKILLed after {seen} chunks (slots_busy was {busy}): its slot is free "
          f"after {dt:.2f} s, {generated:.0f} of {max_tokens} tokens generated")
    # (2) a raw socket that reads the first event and closes.
    before = srv.metric("dlcm_generated_tokens_total")
    body = json.dumps({"model": name, "prompt": PROMPTS[1], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((srv.host, srv.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 3:
        d = s.recv(4096)
        if not d:
            break
        got += d
    s.close()
    t0 = time.time()
    idle = srv.wait_idle(3)
    dt = time.time() - t0
    generated = srv.metric("dlcm_generated_tokens_total") - before
    check(b"200" in got.split(b"\r\n")[0] and idle and generated < max_tokens,
          f"a raw socket closed after 3 events: its slot is free after {dt:.2f} s, "
          f"{generated:.0f} of {max_tokens} tokens generated")


def hostile_checks(srv, name, ref):
    big = "x" * (80 << 10)  # the server runs with --max-body 65536
    cases = [
        ("malformed JSON", "POST", "/v1/completions", '{"prompt": "the", ', 400),
        ("JSON array body", "POST", "/v1/completions", "[1, 2]", 400),
        ("prompt of the wrong type", "POST", "/v1/completions", {"prompt": 5}, 400),
        ("empty prompt", "POST", "/v1/completions", {"prompt": ""}, 400),
        ("negative max_tokens", "POST", "/v1/completions", {"prompt": "the", "max_tokens": -1}, 400),
        ("max_tokens beyond the context", "POST", "/v1/completions",
         {"prompt": "the", "max_tokens": 100000}, 400),
        ("prompt over the context", "POST", "/v1/completions", {"prompt": "the cat " * 1200}, 400),
        ("token id out of the vocabulary", "POST", "/v1/completions", {"prompt": [5, 999999]}, 400),
        ("invalid UTF-8 in the prompt", "POST", "/v1/completions",
         b'{"prompt": "the \xff\xfe cat", "max_tokens": 2}', 400),
        ("body over --max-body", "POST", "/v1/completions", {"prompt": big}, 413),
        ("n = 0", "POST", "/v1/completions", {"prompt": "the", "n": 0}, 400),
        ("logprobs 21", "POST", "/v1/completions", {"prompt": "the", "logprobs": 21}, 400),
        ("chat without messages", "POST", "/v1/chat/completions", {"messages": []}, 400),
        ("chat role 'wizard'", "POST", "/v1/chat/completions",
         {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("GET on a POST endpoint", "GET", "/v1/completions", None, 405),
        ("unknown path", "POST", "/v1/nothing", {"prompt": "the"}, 404),
    ]
    for what, method, path, body, want in cases:
        status, resp = srv.request(method, path, body)
        err = resp.get("error") if isinstance(resp, dict) else None
        ok = status == want and isinstance(err, dict) and isinstance(err.get("message"), str) \
            and isinstance(err.get("type"), str)
        check(ok, f"hostile: {what} -> {want} with an error object"
              + ("" if ok else f" (got {status}: {str(resp)[:160]!r})"))
    h = srv.health()
    check(srv.proc.poll() is None and isinstance(h, dict) and h.get("status") == "ok",
          f"after {len(cases)} hostile requests the server is up, /health ok")


def auth_checks(a, ckpt, work):
    import openai
    from openai import OpenAI

    with Server(a.dlcm, ckpt, work, "--api-key", "s3cret", "--model-name", "tiny", name="serve_auth") as srv:
        for key, want in (("wrong", False), ("s3cret", True)):
            client = OpenAI(base_url=srv.base, api_key=key, max_retries=0, timeout=60)
            try:
                r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
                got = "accepted" if r.choices else "empty"
            except openai.AuthenticationError as e:
                got = f"AuthenticationError ({e.status_code})"
            check(got == ("accepted" if want else "AuthenticationError (401)"),
                  f"--api-key: the SDK with {'the right' if want else 'a wrong'} key: {got}")
        status, _ = srv.request("POST", "/v1/completions", {"prompt": "the"})
        hs, h = srv.request("GET", "/health")
        check(status == 401 and hs == 200, f"--api-key: no Authorization header -> {status}; "
              f"GET /health stays open -> {hs}")
        check(srv.stop() == 0, "SIGTERM: the server exits with status 0")


# ---------------------------------------------------------------- the npm SDK
def node_checks(a, srv, ckpt, work, refs, chat_ref, long_ref):
    node = shutil.which("node")
    sdk = os.path.join(HERE, "node_modules", "openai", "package.json")
    if not node or not os.path.exists(sdk):
        print(f"skipped: no node or no {sdk} (scripts/setup.sh runs npm ci in tests/interop)")
        sys.exit(77)
    spec = {"base": srv.base, "model": "tiny-" + a.arch, "max_new": MAX_NEW,
            "cases": [{"prompt": p, "ids": ref["prompt_ids"][1:], "text": ref["text"],
                       "finish": finish_of(ref), "completion_tokens": ref["new_tokens"],
                       "echo": echo_reference(a.dlcm, ckpt, work, ref["prompt_ids"])}
                      for p, ref in zip(PROMPTS + [LONG], refs + [long_ref])],
            "chat": {"messages": CHAT, "text": chat_ref["text"], "finish": finish_of(chat_ref)}}
    path = write(os.path.join(work, "node_spec.json"), json.dumps(spec))
    r = subprocess.run([node, os.path.join(HERE, "serve_openai.mjs"), path], capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stdout.flush()
    check(r.returncode == 0, f"node serve_openai.mjs exits 0 (got {r.returncode})"
          + (f": {r.stderr.strip()[-600:]}" if r.returncode else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dlcm", required=True)
    ap.add_argument("--arch", choices=["baseline", "dlcm"], required=True)
    ap.add_argument("--client", choices=["python", "node"], default="python")
    ap.add_argument("--work")
    a = ap.parse_args()
    a.dlcm = os.path.abspath(a.dlcm)
    work = a.work or tempfile.mkdtemp(prefix="dlcm_serve_")
    os.makedirs(work, exist_ok=True)
    try:
        ckpt = train_tiny(a.dlcm, work, a.arch, synthetic_corpus(os.path.join(work, "corpus.txt")))
        refs = generate(a.dlcm, ckpt, work, PROMPTS, MAX_NEW)
        long_ref = generate(a.dlcm, ckpt, work, [LONG], MAX_NEW)[0]
        chat_ref = json.loads(run(a.dlcm, "generate", "--ckpt", ckpt, "--prompt", CHAT_PROMPT,
                                  "--stop", "\n\nUser:", "--temperature", "0", "--max-new-tokens",
                                  MAX_NEW, "--json", "--quiet"))
        with Server(a.dlcm, ckpt, work, "--slots", 4, "--prefill-chunk", 32, "--max-body", 65536,
                    "--model-name", "tiny-" + a.arch) as srv:
            print(f"     {srv.line}")
            if a.client == "python":
                python_checks(a, srv, ckpt, work, refs, chat_ref, long_ref)
            else:
                node_checks(a, srv, ckpt, work, refs, chat_ref, long_ref)
            rc = srv.stop()
            check(rc == 0, f"SIGTERM: the server exits with status 0 (got {rc})")
            if FAILS:
                print("server log (last lines):\n" + srv.tail())
        if a.client == "python":
            auth_checks(a, ckpt, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    finish(f"serve ({a.client} SDK, {a.arch})")


if __name__ == "__main__":
    main()

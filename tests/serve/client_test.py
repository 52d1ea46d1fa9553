"""End-to-end tests of `logquant serve` with the real OpenAI Python client.

Run by tests/serve.rs (cargo nextest) in the venv of scripts/py-venv.sh:

    python tests/serve/client_test.py --bin target/release/logquant --model MODEL.gguf

Starts its own servers on loopback (port 0: the system picks a free one), runs every
check, stops the servers with SIGTERM and checks that they exit 0. Prints one line per
check; exits non-zero at the first failure.
"""

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai

KEY = "test-key-7f3a"
ALIAS = "tiny"


class Server:
    """A `logquant serve` process; `url` is known once it printed its startup line."""

    def __init__(self, binary, model, *extra):
        args = [binary, "serve", "-m", model, "--alias", ALIAS, "--port", "0", *extra]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"server exited before listening: {self.lines}")
            self.lines.append(line.rstrip())
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise AssertionError("server did not start within 120 s")
        # Keep reading stderr so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metrics(self):
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(logquant_\w+) (\S+)$", text, re.M)}

    def stop(self):
        """SIGTERM; the server must finish and exit 0."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert code == 0, f"exit code {code} after SIGTERM; log:\n" + "\n".join(self.lines[-20:])


def prompts(n):
    """n distinct prompts of different lengths (some longer than one prefill chunk of
    the two-tier cache, 64 tokens, and than its budget)."""
    words = "the cache keeps a few tokens at full precision and the rest at two bits".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(3 + 12 * i)) for i in range(n)]


def error_of(resp, status):
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    body = resp.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


# ---------------------------------------------------------------- the main server


def check_models(s):
    data = s.client().models.list().data
    assert [m.id for m in data] == [ALIAS], data


def check_completion(s):
    r = s.client().completions.create(model=ALIAS, prompt="Hello there", max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length"), c
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8, r.usage
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 8, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def chat(s, text, **kw):
    return s.client().chat.completions.create(
        model=ALIAS, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}], **kw
    )


def check_chat(s):
    r = chat(s, "What is a KV cache?", max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant", r
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 12


def check_stream_equals_whole(s):
    whole = chat(s, "Tell me about caches.", max_tokens=16, temperature=0)
    parts, usage, finish = [], None, None
    for chunk in chat(s, "Tell me about caches.", max_tokens=16, temperature=0, stream=True,
                      stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content, (parts, whole)
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
    # A completion streams too.
    text = "".join(c.choices[0].text for c in s.client().completions.create(
        model=ALIAS, prompt="Hello there", max_tokens=8, temperature=0, stream=True) if c.choices)
    alone = s.client().completions.create(model=ALIAS, prompt="Hello there", max_tokens=8, temperature=0)
    assert text == alone.choices[0].text


def complete(s, prompt, max_tokens=24):
    r = s.client().completions.create(model=ALIAS, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text, r.usage.completion_tokens


def check_concurrent_equals_alone(s):
    """16 clients at once against 4 sequences: every request completes, and at
    temperature 0 each answer equals the same request served alone."""
    ps = prompts(16)
    alone = [complete(s, p) for p in ps]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: complete(s, p), ps))
    assert all(n > 0 for _, n in alone) and len({text for text, _ in alone}) >= 2, alone
    for i, (a, t) in enumerate(zip(alone, together)):
        assert a == t, f"prompt {i}: alone {a!r}, under load {t!r}"
    m = s.metrics()
    assert m["logquant_active_sequences"] == 0 and m["logquant_queue_length"] == 0, m
    # the engine thread's time by part covers the decode calls it made
    parts = sum(m[f"logquant_engine_{p}_seconds_total"] for p in ("llama_decode", "policy"))
    assert 0 < parts <= m["logquant_decode_seconds_total"] + 1e-3, m
    assert m["logquant_engine_sample_seconds_total"] > 0, m
    # greedy requests are sampled in the graph (the default)
    assert m["logquant_device_sampled_tokens_total"] >= sum(n for _, n in alone + together), m


def check_sampled_beside_greedy(s):
    """Requests at temperature 0.9 between greedy ones: each sampled request turns its
    sequence's in-graph greedy sampler off (llama.cpp reserves its buffers again) and
    the next greedy one turns it back on; the greedy answers stay those served alone,
    and a seeded sampled request repeats its answer."""
    ps = prompts(8)
    alone = [complete(s, p) for p in ps]

    def sampled(p):
        r = s.client().completions.create(model=ALIAS, prompt=p, max_tokens=24, temperature=0.9, seed=7)
        return r.choices[0].text, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, s, p) if i % 2 == 0 else pool.submit(sampled, p) for i, p in enumerate(ps)]
        got = [f.result() for f in futures]
    for i in range(0, len(ps), 2):
        assert got[i] == alone[i], f"prompt {i}: alone {alone[i]!r}, beside sampled requests {got[i]!r}"
    assert all(n > 0 for _, n in got[1::2]), got
    assert sampled(ps[1]) == sampled(ps[1])


def check_cancel_frees_sequence(s):
    before = s.metrics()["logquant_requests_cancelled_total"]
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Count with me", "max_tokens": 900, "stream": True, "temperature": 0}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]  # a few events arrived: the sequence is running
            assert any(g.startswith("data: ") for g in got), got
    deadline = time.time() + 20
    while time.time() < deadline:
        m = s.metrics()
        if m["logquant_requests_cancelled_total"] > before and m["logquant_active_sequences"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the cancelled request still holds a sequence: {s.metrics()}")
    # The freed sequence serves the next request.
    assert complete(s, "after the cancel", 4)[1] > 0


def check_bad_requests(s):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = s.url + "/v1/completions"
    post = lambda body, **kw: httpx.post(url, headers={**auth, **kw.pop("headers", {})}, content=body, timeout=30)
    e = error_of(post(b"{not json"), 400)
    assert e["code"] == "invalid_json", e
    error_of(post(json.dumps({"prompt": "x", "max_tokens": "ten"}).encode()), 400)
    error_of(post(json.dumps({"prompt": 42}).encode()), 400)
    error_of(post(json.dumps({"prompt": "x", "temperature": -1}).encode()), 400)
    error_of(post(json.dumps({"prompt": "x", "n": 2}).encode()), 400)
    e = error_of(post(json.dumps({"prompt": "x", "model": "gpt-9"}).encode()), 404)
    assert e["code"] == "model_not_found", e
    e = error_of(post(json.dumps({"prompt": "word " * 3000}).encode()), 400)
    assert e["code"] == "context_length_exceeded", e
    e = error_of(post(json.dumps({"prompt": "x", "max_tokens": 100000}).encode()), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "max_tokens", e
    error_of(post(b'{"prompt": "' + b"a" * (9 << 20) + b'"}'), 413)
    chat_url = s.url + "/v1/chat/completions"
    error_of(httpx.post(chat_url, headers=auth, json={"messages": "hi"}, timeout=30), 400)
    error_of(httpx.post(chat_url, headers=auth, json={"messages": [{"role": "robot", "content": "hi"}]}, timeout=30), 400)
    error_of(httpx.get(s.url + "/v1/nothing", headers=auth, timeout=30), 404)
    # The API key.
    error_of(httpx.post(url, json={"prompt": "x"}, timeout=30), 401)
    error_of(httpx.post(url, headers={"Authorization": "Bearer wrong"}, json={"prompt": "x"}, timeout=30), 401)
    error_of(httpx.get(s.url + "/v1/models", timeout=30), 401)
    try:
        s.client(key="wrong").models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    # Still serving, nothing left running.
    assert httpx.get(s.url + "/health", timeout=10).json()["status"] == "ok"
    assert complete(s, "still here", 4)[1] > 0
    m = s.metrics()
    assert m["logquant_active_sequences"] == 0 and m["logquant_requests_rejected_total"] >= 13, m


# ---------------------------------------------------------------- a small server


def check_busy_gets_503(s):
    """--parallel 1 --queue 1: of 6 long requests sent at once, those that find the
    sequence busy and the queue full get 503 with Retry-After and a JSON error; the
    others complete."""
    body = {"prompt": "busy busy", "max_tokens": 400, "temperature": 0}
    post = lambda _: httpx.post(s.url + "/v1/completions", json=body, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    for a in answers:
        if a.status_code == 503:
            assert a.headers.get("retry-after") == "1", a.headers
            assert error_of(a, 503)["code"] == "server_busy"
    assert s.metrics()["logquant_requests_busy_total"] == codes.count(503)


def check_sigterm_finishes_in_flight(s):
    """SIGTERM while a request streams: the request ends (finished, or with an error
    event), and the server exits 0."""
    events = []

    def stream():
        with httpx.Client(timeout=120) as h:
            with h.stream("POST", s.url + "/v1/completions",
                          json={"prompt": "last one", "max_tokens": 480, "stream": True,
                                "temperature": 0}) as r:
                for line in r.iter_lines():
                    events.append(line)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while not events and time.time() < deadline:
        time.sleep(0.01)
    assert events, "the stream did not start"
    at_term = len(events)
    s.stop()
    t.join(60)
    assert not t.is_alive()
    assert len(events) > at_term, "nothing arrived after SIGTERM: the request was not in flight"
    datas = [e for e in events if e.startswith("data: ")]
    assert datas[-1] == "data: [DONE]" or '"error"' in datas[-1], datas[-3:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv", default="logquant:D=48")
    a = ap.parse_args()

    checks = 0

    def run(name, f, s):
        nonlocal checks
        t = time.time()
        try:
            f(s)
        except Exception:
            print(f"FAIL {name}; server log tail:\n" + "\n".join(s.lines[-15:]), flush=True)
            raise
        checks += 1
        print(f"ok   {name} ({time.time() - t:.1f} s)", flush=True)

    # micro-batches of 64 tokens: a call carries up to 64 tokens of each of the 4
    # sequences (256), which llama.cpp splits into micro-batches of several sequences
    main_server = Server(a.bin, a.model, "--kv", a.kv, "-c", "1024", "--parallel", "4", "--api-key", KEY, "-t", "1",
                         "--ub", "64")
    try:
        for f in (check_models, check_completion, check_chat, check_stream_equals_whole,
                  check_concurrent_equals_alone, check_sampled_beside_greedy, check_cancel_frees_sequence,
                  check_bad_requests):
            run(f.__name__, f, main_server)
        reference = [complete(main_server, p) for p in prompts(4)]
        run("sigterm exits 0", Server.stop, main_server)
    finally:
        main_server.proc.kill()

    # keys by channel: groups of 64 prompt tokens coded in each stream under load (the
    # newest 64 kept, so every demoted key is read by channel)
    by_channel = Server(a.bin, a.model, "--kv", "streaming:D=64:keys=channel", "-c", "1024", "--parallel", "4",
                        "--api-key", KEY, "-t", "1")
    try:
        run("check_concurrent_equals_alone (keys by channel)", check_concurrent_equals_alone, by_channel)
    finally:
        by_channel.proc.kill()

    # sampled on the host (--host-sampling): the same greedy answers as in the graph (they
    # could differ only on an exact tie of two logits, which the host breaks by the first
    # and ggml's CPU argmax by the last; one sequence's arithmetic does not depend on the
    # others')
    small = Server(a.bin, a.model, "--kv", a.kv, "-c", "512", "--parallel", "1", "--queue", "1", "-t", "1",
                   "--host-sampling")
    try:
        def same_on_host(s):
            got = [complete(s, p) for p in prompts(4)]
            assert got == reference, f"host {got!r}, in the graph {reference!r}"
            assert s.metrics()["logquant_device_sampled_tokens_total"] == 0
        run("greedy on the host equals greedy in the graph", same_on_host, small)
        run("check_busy_gets_503", check_busy_gets_503, small)
        run("check_sigterm_finishes_in_flight", check_sigterm_finishes_in_flight, small)
    finally:
        small.proc.kill()
    print(f"{checks} checks passed")


if __name__ == "__main__":
    sys.exit(main())

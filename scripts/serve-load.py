#!/usr/bin/env python3
"""A bounded load generator for `logquant serve` (standard library only, so it runs
wherever python3 does, the GPU host included).

    python3 scripts/serve-load.py --url http://127.0.0.1:8080 --clients 32 --requests 64 \
        --prompt-words 3000 --max-tokens 128 [--api-key KEY] [--json FILE] [--label NAME]

Each of --clients threads sends streaming completions (temperature 0) one after another
until --requests have been sent in all; every prompt is a distinct text of about
--prompt-words words. Per request: the time to the first token (from sending to the
first text event) and the tokens generated (the final usage chunk). Reported: the
sequences the server holds (its /metrics), requests completed and refused, aggregate
generated tokens/s over the whole run (first send to last answer), the engine's decode
tokens/s summed over its steps, and time-to-first-token p50/p99.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

WORDS = ("the cache keeps a few tokens at full precision and every other token at two bits so "
         "that long contexts and many users fit in the memory of one machine while answers stay "
         "close to those of a sixteen bit cache").split()


def prompt(i, n_words):
    # Distinct per request (a number up front), so no two prompts are equal.
    return f"Request {i}. " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n_words))


def metrics(url):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("logquant_") and " " in line and "{" not in line:
            name, value = line.split(" ", 1)
            out[name] = float(value)
    return out


def one_request(url, key, i, n_words, max_tokens):
    u = urllib.parse.urlparse(url)
    body = json.dumps({"prompt": prompt(i, n_words), "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers=headers)
    r = c.getresponse()
    if r.status != 200:
        r.read()
        return {"status": r.status}
    ttft, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            return {"status": 500}
        if ev.get("usage"):
            usage = ev["usage"]
        if ttft is None and any(ch.get("text") for ch in ev.get("choices", [])):
            ttft = time.perf_counter() - t0
    end = time.perf_counter()
    return {"status": 200, "ttft": ttft, "start": t0, "end": end, "usage": usage}


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--label", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.clients < 1 or a.requests < 1 or a.max_tokens < 1 or a.prompt_words < 1:
        sys.exit("error: --clients, --requests, --max-tokens and --prompt-words must be at least 1")

    before = metrics(a.url)
    lock = threading.Lock()
    next_i = [0]
    results = []

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= a.requests:
                    return
                next_i[0] += 1
            try:
                res = one_request(a.url, a.api_key, i, a.prompt_words, a.max_tokens)
            except (OSError, http.client.HTTPException, ValueError) as e:
                res = {"status": f"error: {e}"}
            if res["status"] == 200 and not res.get("usage"):
                res["status"] = "error: the stream ended without a usage chunk"
            with lock:
                results.append(res)
                done = len(results)
            print(f"serve-load: {done}/{a.requests} requests answered", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics(a.url)

    ok = [r for r in results if r["status"] == 200]
    gen = sum(r["usage"]["completion_tokens"] for r in ok)
    prompt_tokens = [r["usage"]["prompt_tokens"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    steps = after.get("logquant_decode_seconds_total", 0) - before.get("logquant_decode_seconds_total", 0)
    decoded = after.get("logquant_completion_tokens_total", 0) - before.get("logquant_completion_tokens_total", 0)
    out = {
        "label": a.label,
        "sequences": int(after.get("logquant_parallel_sequences", 0)),
        "clients": a.clients,
        "requests": a.requests,
        "completed": len(ok),
        "refused": sum(1 for r in results if isinstance(r["status"], int) and r["status"] != 200),
        "errors": sorted({r["status"] for r in results if isinstance(r["status"], str)}),
        "prompt_tokens_mean": statistics.mean(prompt_tokens) if prompt_tokens else None,
        "generated_tokens": gen,
        "wall_seconds": wall,
        "aggregate_tokens_per_second": gen / wall if wall > 0 else None,
        "engine_seconds": steps,
        "engine_tokens_per_second": decoded / steps if steps > 0 else None,
        # the engine thread's time by part (see /metrics): where a step's time goes
        "engine_phase_seconds": {
            phase: after.get(f"logquant_engine_{phase}_seconds_total", 0)
            - before.get(f"logquant_engine_{phase}_seconds_total", 0)
            for phase in ("llama_decode", "policy", "sample")
        },
        "ttft_p50_seconds": pct(ttfts, 50),
        "ttft_p99_seconds": pct(ttfts, 99),
    }
    f = lambda v, spec: "" if v is None else format(v, spec)
    print("| label | sequences | completed | refused | prompt tokens | generated | wall s | tokens/s | TTFT p50 s | TTFT p99 s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {a.label} | {out['sequences']} | {out['completed']} | {out['refused']} | "
          f"{f(out['prompt_tokens_mean'], '.0f')} | {gen} | {wall:.1f} | {f(out['aggregate_tokens_per_second'], '.1f')} | "
          f"{f(out['ttft_p50_seconds'], '.2f')} | {f(out['ttft_p99_seconds'], '.2f')} |")
    print("engine seconds by part: " + ", ".join(f"{k} {v:.2f}" for k, v in out["engine_phase_seconds"].items()),
          file=sys.stderr)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0 if out["completed"] == a.requests else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Load generator for `ggpt serve` (or any OpenAI-compatible server, e.g. llama-server).

N concurrent streaming clients, each sending `--requests` completions of a fixed prompt mix
through the official `openai` client, one after another. Reports aggregate decode
throughput (generated tokens / wall time), time to first token and inter-token latency
p50/p99. Loopback only, bounded in count and time.

    python3 benches/serve_load.py --base http://127.0.0.1:8080/v1 --model NAME \\
        --streams 1,2,4,8,16 --requests 2 --max-tokens 128

`--soak SECONDS` instead runs 64 clients for that long with random lengths, ~10 % of streams
cancelled early and ~10 % malformed requests, and checks that no response is a 5xx other than
503, every response parses, every event is a completion chunk and every stream not cancelled
ends with [DONE]; RSS of `--pid` is sampled before and after.
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import openai

try:
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = [
    "The history of the printing press begins",
    "In a quiet village by the sea, an old fisherman",
    "The main advantages of renewable energy are",
    "Once upon a time, in a kingdom far away,",
    "A recipe for a simple tomato soup: first,",
    "The theory of relativity explains that",
    "Dear hiring manager, I am writing to apply for",
    "The three most important inventions of the twentieth century",
]


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one_stream(client, model, prompt, max_tokens, seed):
    t0 = time.perf_counter()
    ttft = None
    stamps = []
    n = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "logit_bias": {"50256": -100}},
    )
    usage = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            if ttft is None:
                ttft = now - t0
            stamps.append(now)
            n += 1
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return (usage if usage is not None else n), ttft, itl


async def level(base, key, model, streams, requests, max_tokens):
    client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)
    ttfts, itls, tokens = [], [], 0

    async def worker(w):
        nonlocal tokens
        for r in range(requests):
            p = PROMPTS[(w + r) % len(PROMPTS)]
            n, ttft, itl = await one_stream(client, model, p, max_tokens, seed=w * 1000 + r)
            tokens += n
            if ttft is not None:
                ttfts.append(ttft)
            itls.extend(itl)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    wall = time.perf_counter() - t0
    await client.close()
    return {
        "streams": streams,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttfts, 50) * 1e3, 1),
        "ttft_p99_ms": round(pct(ttfts, 99) * 1e3, 1),
        "itl_p50_ms": round(pct(itls, 50) * 1e3, 1),
        "itl_p99_ms": round(pct(itls, 99) * 1e3, 1),
    }


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


async def soak(base, key, model, seconds, pid):
    root = base.rsplit("/v1", 1)[0]
    headers = {"Authorization": f"Bearer {key}"}
    stats = {"ok": 0, "4xx": 0, "503": 0, "cancelled": 0, "bad_5xx": 0, "invalid": 0, "truncated": 0}
    deadline = time.time() + seconds
    rss0 = rss_kib(pid) if pid else None

    async def client_loop(c, http):
        rng = random.Random(c)
        while time.time() < deadline:
            kind = rng.random()
            try:
                if kind < 0.1:  # malformed
                    body = rng.choice([b'{"model": ', b'{"model": "%s", "prompt": 5}' % model.encode(),
                                       b'{"model": "%s", "prompt": "a", "temperature": 9}' % model.encode(),
                                       b'\xff\xfe'])
                    r = await http.post(root + "/v1/completions", content=body, headers=headers)
                    r.json()
                    stats["4xx" if 400 <= r.status_code < 500 else "bad_5xx"] += 1
                    continue
                body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 96),
                        "stream": True, "seed": rng.randint(0, 1 << 30)}
                async with http.stream("POST", root + "/v1/completions", json=body, headers=headers) as r:
                    if r.status_code == 503:
                        stats["503"] += 1
                        await r.aread()
                        await asyncio.sleep(0.2)
                        continue
                    if r.status_code >= 500:
                        stats["bad_5xx"] += 1
                        continue
                    cancel_after = rng.randint(1, 8) if kind < 0.2 else None
                    seen, ended = 0, False
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ev = json.loads(line[6:])
                            if "error" in ev or not isinstance(ev.get("choices"), list):
                                raise ValueError(f"bad event {line}")
                            seen += 1
                            if cancel_after and seen >= cancel_after:
                                stats["cancelled"] += 1
                                ended = True
                                break
                        elif line == "data: [DONE]":
                            stats["ok"] += 1
                            ended = True
                    if not ended:
                        stats["truncated"] += 1
            except (ValueError, json.JSONDecodeError):
                stats["invalid"] += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=128)) as http:
        await asyncio.gather(*(client_loop(c, http) for c in range(64)))
    rss1 = rss_kib(pid) if pid else None
    stats["rss_kib_before"], stats["rss_kib_after"] = rss0, rss1
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--key", default="none")
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream per level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--soak", type=float, default=0, help="seconds of soak instead of levels (<= 600)")
    ap.add_argument("--pid", type=int, help="server pid, for RSS during the soak")
    a = ap.parse_args()
    if not a.base.startswith(("http://127.0.0.1", "http://localhost")):
        sys.exit("loopback servers only")
    if a.soak:
        print(json.dumps(asyncio.run(soak(a.base, a.key, a.model, min(a.soak, 600), a.pid))))
        return
    for s in [int(x) for x in a.streams.split(",")]:
        if not 1 <= s <= 64:
            sys.exit("streams must be in 1..=64")
        print(json.dumps(asyncio.run(level(a.base, a.key, a.model, s, a.requests, a.max_tokens))), flush=True)


if __name__ == "__main__":
    main()

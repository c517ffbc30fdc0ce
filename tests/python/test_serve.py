"""`ggpt serve` through the official `openai` Python client (and raw httpx where a client
would never send such a request).

Converts the bundled tiny GPT-2 with the built `ggpt` binary, starts the server on a free
loopback port with an API key, and checks completions (plain, streamed, n > 1, logprobs,
echo, stop, seed), chat, embeddings (float and base64), every 4xx the server promises, auth,
cancellation of a stream whose client leaves, and a graceful SIGTERM.

The server binary: `ggpt serve` when the `ggpt` binary has that command, else `ggpt-serve`
next to it (both take the same flags). Nothing is skipped: a missing binary is a failure.
"""
import array

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import openai

try:  # the HTTP client the openai package itself depends on (httpx2 in openai >= 3)
    import httpx2 as httpx
except ImportError:
    import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
GGPT = Path(os.environ.get("GGPT_BIN", ROOT / "target" / "release" / "ggpt"))
KEY = "test-key-123"
M = "tiny-gpt2-F16"
Q = "tiny-gpt2-Q4_K_M"


def server_cmd():
    assert GGPT.is_file(), f"ggpt binary not found at {GGPT}"
    probe = subprocess.run([str(GGPT), "serve", "--help"], capture_output=True)
    if probe.returncode == 0:
        return [str(GGPT), "serve"]
    alt = GGPT.parent / "ggpt-serve"
    assert alt.is_file(), f"neither `{GGPT} serve` nor {alt} exists: build with `cargo build --release`"
    return [str(alt)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-models")
    r = subprocess.run([str(GGPT), "convert", ROOT / "models" / "tiny-gpt2", "--type", "all", "-o", out],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def start(models, *extra, ctx=256):
    cmd = server_cmd() + ["-m", str(models / f"{M}.gguf"), "-m", str(models / f"{Q}.gguf"),
                          "--port", "0", "--ctx", str(ctx), "-t", "2", *extra]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    port = None
    deadline = time.time() + 30
    while port is None:
        assert time.time() < deadline, "server did not report its port"
        line = p.stderr.readline()
        assert line or p.poll() is None, f"server exited: {p.returncode}"
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
    base = f"http://127.0.0.1:{port}"
    while True:
        assert time.time() < deadline, "server not healthy within 30 s"
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return p, base


@pytest.fixture(scope="module")
def server(models):
    p, base = start(models, "--api-key", KEY, "--parallel", "4", "--max-queue", "16")
    yield base
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion_plain_and_seeded(client):
    a = client.completions.create(model=M, prompt="The quick brown fox", max_tokens=10, seed=5)
    b = client.completions.create(model=M, prompt="The quick brown fox", max_tokens=10, seed=5)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 10 and a.usage.prompt_tokens == 4
    c = client.completions.create(model=M, prompt="The quick brown fox", max_tokens=10, seed=6)
    assert c.choices[0].text != a.choices[0].text


def test_completion_stream_matches_plain(client):
    plain = client.completions.create(model=Q, prompt="Once upon a time", max_tokens=16, seed=11)
    chunks = list(client.completions.create(model=Q, prompt="Once upon a time", max_tokens=16, seed=11,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_n_logprobs_echo(client):
    r = client.completions.create(model=M, prompt="Hello", max_tokens=5, n=3, seed=1, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 5
        assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
        assert "".join(c.logprobs.tokens) == c.text
    e = client.completions.create(model=M, prompt="The cat sat", max_tokens=0, echo=True, logprobs=1)
    assert e.choices[0].text == "The cat sat"
    assert e.choices[0].logprobs.token_logprobs[0] is None
    assert all(x < 0 for x in e.choices[0].logprobs.token_logprobs[1:])


def test_stop_spanning_tokens(client):
    base = client.completions.create(model=M, prompt="Once upon a time", max_tokens=20, temperature=0, logprobs=1)
    toks = base.choices[0].logprobs.tokens
    stop = toks[3][1:] + toks[4] + toks[5][:1]
    before = "".join(toks[:3]) + toks[3][:1]
    assert base.choices[0].text.find(stop) == len(before)
    r = client.completions.create(model=M, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == before and r.choices[0].finish_reason == "stop"
    s = list(client.completions.create(model=M, prompt="Once upon a time", max_tokens=20, temperature=0,
                                       stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in s) == before
    assert s[-1].choices[0].finish_reason == "stop"


def test_chat_plain_and_stream(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    r = client.chat.completions.create(model=M, messages=msgs, max_tokens=12, seed=2)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    s = list(client.chat.completions.create(model=M, messages=msgs, max_tokens=12, seed=2, stream=True))
    assert s[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in s) == r.choices[0].message.content


def test_embeddings_float_and_base64(client):
    f = client.embeddings.create(model=M, input=["hello world", "goodbye"], encoding_format="float")
    b = client.embeddings.create(model=M, input=["hello world", "goodbye"])  # the client asks for base64
    assert len(f.data) == 2 and len(f.data[0].embedding) == 256
    for x, y in zip(f.data, b.data):
        # JSON carries each f32 as its shortest decimal, base64 as its bits: equal as f32.
        assert array.array("f", x.embedding) == array.array("f", y.embedding)
    assert f.usage.prompt_tokens == 4  # "hello", " world", "good", "bye"


def test_models_lists_both(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [M, Q]


def test_errors_are_4xx_with_the_field_named(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="a")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="a", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="hello world", max_tokens=500)
    assert "2 in the prompt" in e.value.body["message"] and "500 for the completion" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="a", stop=["1", "2", "3", "4", "5"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="a", best_of=2)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="a", logprobs=9)
    assert e.value.body["param"] == "logprobs"
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/completions", content=b'{"model": "x", ', headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", content=b'{"model": "\xff"}', headers=h)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", content=b'{"prompt": "' + b"a" * (3 << 20) + b'"}', headers=h)
    assert r.status_code == 413 and "error" in r.json()


def test_auth(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=M, prompt="a", max_tokens=1)
    assert httpx.post(server + "/v1/completions", json={"model": M, "prompt": "a"}).status_code == 401
    assert httpx.get(server + "/health").status_code == 200


def metric(server, name):
    text = httpx.get(server + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_cancel_frees_the_slot_within_a_second(models):
    p, server = start(models, ctx=1024)
    try:
        # 1000 tokens with end-of-text banned: still running when the client leaves.
        body = {"model": M, "prompt": "Tell me a long story", "max_tokens": 1000, "stream": True, "seed": 1,
                "logit_bias": {"50256": -100}}
        with httpx.stream("POST", server + "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept open: leaving a `for` over it would close the stream
            assert next(lines).startswith("data: {")
            assert metric(server, "ggpt_busy_slots") == 1
        t = time.time()
        while metric(server, "ggpt_busy_slots") != 0:
            assert time.time() - t < 1.0, "slot still busy 1 s after the client left"
            time.sleep(0.02)
        # Cut short: far fewer than the 1000 tokens asked for were generated.
        assert metric(server, "ggpt_generated_tokens_total") < 1000
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0


def test_sigterm_ends_open_streams_and_exits_0(models):
    p, base = start(models)
    body = {"model": M, "prompt": "Tell me a long story", "max_tokens": 240, "stream": True, "seed": 1,
            "logit_bias": {"50256": -100}}
    lines = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=20) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 2:
                p.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    assert any("shutting down" in x for x in lines)
    assert p.wait(timeout=20) == 0

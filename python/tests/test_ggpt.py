"""Tests of the installed `ggpt` Python package (`pip install ./python`) against the bundled
tiny GPT-2, converted to the four formats by `ggpt.convert`.

References: the `ggpt` command line (the binary in $GGPT_BIN, default target/release/ggpt,
built by `cargo build --release`) for every result it can print, and models/tiny-gpt2/
golden.json (PyTorch/transformers float32 on the same weights) for greedy text, logits and,
through the tied output projection, hidden states. Nothing is skipped: a missing binary is a
failure.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ggpt

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-gpt2"
GOLDEN = json.loads((MODEL / "golden.json").read_text())
GGPT = Path(os.environ.get("GGPT_BIN", ROOT / "target" / "release" / "ggpt"))
TYPES = ["F16", "Q8_0", "Q6_K", "Q4_K_M"]
VAL = (MODEL / "val.txt").read_text()


def cli(*args):
    assert GGPT.is_file(), f"ggpt binary not found at {GGPT}: run `cargo build --release` or set GGPT_BIN"
    r = subprocess.run([str(GGPT), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"ggpt {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    summaries = ggpt.convert(MODEL, out, types=["all"], progress=False)
    assert [s["type"] for s in summaries] == TYPES
    paths = {t: out / f"tiny-gpt2-{t}.gguf" for t in TYPES}
    for s in summaries:
        assert Path(s["path"]) == paths[s["type"]]
        assert s["file_bytes"] == paths[s["type"]].stat().st_size
    return paths


@pytest.fixture(scope="session")
def models(files):
    return {t: ggpt.Model(p) for t, p in files.items()}


@pytest.fixture(scope="session")
def f16(models):
    return models["F16"]


# --- conversion -----------------------------------------------------------------------------


def test_convert_and_quantize_write_the_clis_bytes(files, tmp_path):
    cli("convert", MODEL, "--type", "all", "-o", tmp_path)
    for t, p in files.items():
        assert p.read_bytes() == (tmp_path / f"tiny-gpt2-{t}.gguf").read_bytes(), t
    summary = ggpt.quantize(files["F16"], tmp_path / "py-q8.gguf", "q8_0")
    assert summary["type"] == "Q8_0" and summary["n_tensors"] > 0
    cli("quantize", files["F16"], tmp_path / "cli-q8.gguf", "--type", "q8_0")
    assert (tmp_path / "py-q8.gguf").read_bytes() == (tmp_path / "cli-q8.gguf").read_bytes()


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", TYPES)
def test_greedy_generate_equals_ggpt_run(models, files, fmt):
    m = models[fmt]
    for p in GOLDEN["prompts"]:
        got = m.generate(p["text"], max_new_tokens=32, temperature=0, ignore_eos=True)
        assert len(got) == 1
        want = cli("run", "-m", files[fmt], "-p", p["text"], "-n", 32, "--temp", 0, "--ignore-eos")
        assert p["text"] + got[0] + "\n" == want, p["name"]


def test_greedy_generate_equals_pytorch(f16):
    for p in GOLDEN["prompts"]:
        assert f16.tokenize(p["text"]) == p["input_ids"], p["name"]
        text = f16.generate(p["text"], max_new_tokens=32, temperature=0, ignore_eos=True)[0]
        assert text == p["greedy"]["text"], p["name"]
        # Token ids in, the same text out.
        assert f16.generate(p["input_ids"], max_new_tokens=32, temperature=0, ignore_eos=True)[0] == text
        assert f16.detokenize(p["greedy"]["new_ids"]) == text


def test_sampled_sequences_equal_ggpt_run(files, models):
    prompt = "The kernel"
    got = models["Q4_K_M"].generate(prompt, max_new_tokens=24, num_return_sequences=3, seed=1234)
    out = cli("run", "-m", files["Q4_K_M"], "-p", prompt, "-n", 24, "--seed", 1234,
              "--num-return-sequences", 3)
    want = "".join(f"=== sequence {i + 1} ===\n{prompt}{t}\n" for i, t in enumerate(got))
    assert out == want
    assert len(set(got)) > 1, "three sampled sequences should not all be equal"
    one = models["Q4_K_M"].generate(prompt, max_new_tokens=24, seed=99)[0]
    assert cli("run", "-m", files["Q4_K_M"], "-p", prompt, "-n", 24, "--seed", 99) == prompt + one + "\n"


def test_stream_joined_equals_generate(f16):
    for seed in range(5):
        kw = dict(max_new_tokens=60, temperature=1.3, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        pieces = list(f16.stream("Unicode: ", **kw))
        assert all(isinstance(s, str) and s for s in pieces)
        assert "".join(pieces) == f16.generate("Unicode: ", **kw)[0]
    kw = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    full = f16.generate("The meaning of life is", **kw)[0]
    stop = full[10:14]
    cut = full[: full.index(stop)]
    assert f16.generate("The meaning of life is", stop=[stop], **kw)[0] == cut
    assert "".join(f16.stream("The meaning of life is", stop=[stop], **kw)) == cut


def test_stream_can_be_abandoned(f16):
    it = f16.stream("Hello", max_new_tokens=500, temperature=0, ignore_eos=True)
    first = next(it)
    assert first
    it.close()
    assert list(it) == []
    del it
    # The model is still usable afterwards, and the stream's first piece was the start.
    assert f16.generate("Hello", max_new_tokens=3, temperature=0)[0].startswith(first)


def test_seeds(f16):
    a = f16.generate("Once upon a time", max_new_tokens=20, seed=7)
    assert a == f16.generate("Once upon a time", max_new_tokens=20, seed=7)
    assert a != f16.generate("Once upon a time", max_new_tokens=20, seed=8)
    ggpt.set_seed(42)
    b = [f16.generate("Once upon a time", max_new_tokens=20)[0] for _ in range(2)]
    ggpt.set_seed(42)
    assert b == [f16.generate("Once upon a time", max_new_tokens=20)[0] for _ in range(2)]
    assert b[0] != b[1]


# --- pipelines ------------------------------------------------------------------------------


def test_text_generation_pipeline(files, f16):
    from ggpt import pipeline, set_seed

    generator = pipeline("text-generation", model=str(files["F16"]))
    prompt = "Hello, I'm a language model,"
    set_seed(42)
    out = generator(prompt, max_length=30, num_return_sequences=3)
    assert isinstance(out, list) and len(out) == 3
    for d in out:
        assert list(d) == ["generated_text"]
        assert d["generated_text"].startswith(prompt)
        # max_length counts the prompt's tokens, as in transformers.
        assert len(f16.tokenize(d["generated_text"])) <= 30
    set_seed(42)
    assert generator(prompt, max_length=30, num_return_sequences=3) == out
    set_seed(43)
    assert generator(prompt, max_length=30, num_return_sequences=3) != out
    new_only = generator(prompt, max_new_tokens=5, return_full_text=False, seed=3)
    assert not new_only[0]["generated_text"].startswith(prompt)
    # do_sample=False: greedy, as model.generate() in transformers.
    g = pipeline("text-generation", model=f16)
    p = GOLDEN["prompts"][0]
    greedy = g(p["text"], max_new_tokens=32, do_sample=False)
    text = greedy[0]["generated_text"]
    assert text == p["text"] + f16.generate(p["text"], max_new_tokens=32, temperature=0)[0]
    batch = g(["a", "b"], max_new_tokens=3, do_sample=False)
    assert len(batch) == 2 and all(len(x) == 1 for x in batch)
    with pytest.raises(ValueError):
        g(p["text"], max_new_tokens=3, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError):
        g(p["text"], max_length=3)
    with pytest.raises(TypeError):
        g(p["text"], no_such_argument=1)
    with pytest.raises(ValueError):
        pipeline("summarization", model=f16)


def test_feature_extraction_pipeline(f16):
    from ggpt import pipeline

    fx = pipeline("feature-extraction", model=f16)
    out = fx("Hello world, this is ggpt")
    n = len(f16.tokenize("Hello world, this is ggpt"))
    assert len(out) == 1 and len(out[0]) == n and len(out[0][0]) == f16.n_embd
    assert np.array_equal(np.array(out[0], dtype=np.float32), f16.features("Hello world, this is ggpt"))
    arr = fx("Hello", return_tensors=True)
    assert arr.shape == (1, 1, f16.n_embd) and arr.dtype == np.float32
    assert len(fx(["a b", "c"])) == 2


# --- logits and features --------------------------------------------------------------------


def test_logits_match_pytorch(f16):
    for p in GOLDEN["prompts"]:
        logits = f16.logits(p["input_ids"])
        assert logits.shape == (p["n_tokens"], f16.n_vocab) and logits.dtype == np.float32
        assert logits.argmax(axis=1).tolist() == p["per_position"]["argmax"], p["name"]
        last = logits[-1]
        assert np.argsort(-last)[:10].tolist() == p["last_position"]["top10_ids"], p["name"]
        np.testing.assert_allclose(last[p["last_position"]["top10_ids"]],
                                   p["last_position"]["top10_logits"], atol=2e-3)
        lse = np.log(np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        np.testing.assert_allclose(lse, p["per_position"]["logsumexp"], atol=4e-3)
    # A str and its token ids give the same array.
    p = GOLDEN["prompts"][1]
    assert np.array_equal(f16.logits(p["text"]), f16.logits(p["input_ids"]))
    assert np.array_equal(f16.logits(np.array(p["input_ids"])), f16.logits(p["input_ids"]))


def load_wte():
    """token_embd of the bundled checkpoint, read from its safetensors with numpy."""
    index = json.loads((MODEL / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if k.endswith("wte.weight"))
    raw = (MODEL / index["weight_map"][name]).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    info = header[name]
    a, b = info["data_offsets"]
    assert info["dtype"] == "F16"
    return np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float16).reshape(info["shape"]).astype(np.float32)


@pytest.mark.parametrize("fmt", TYPES)
def test_features_equal_ggpt_features(models, files, fmt):
    text = GOLDEN["prompts"][3]["text"]
    got = models[fmt].features(text)
    doc = json.loads(cli("features", "-m", files[fmt], text))
    assert doc["tokens"] == models[fmt].tokenize(text)
    want = np.array(doc["hidden"], dtype=np.float32)
    assert got.shape == want.shape == (len(doc["tokens"]), doc["n_embd"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_features_match_pytorch_hidden_states(f16):
    # GPT-2 ties the output projection to the token embedding: PyTorch's logits are
    # last_hidden_state @ wte.T, so the golden logits check the hidden states themselves.
    wte = load_wte()
    for p in GOLDEN["prompts"]:
        h = f16.features(p["input_ids"])
        assert h.shape == (p["n_tokens"], f16.n_embd)
        logits = h.astype(np.float64) @ wte.T.astype(np.float64)
        np.testing.assert_allclose(logits[-1][p["last_position"]["top10_ids"]],
                                   p["last_position"]["top10_logits"], atol=2e-3)
        assert logits.argmax(1).tolist() == p["per_position"]["argmax"]


# --- quality and memory ---------------------------------------------------------------------


def test_perplexity_and_kld_equal_ggpt_perplexity(models, files, tmp_path):
    text_file = tmp_path / "val.txt"
    text_file.write_text(VAL)
    r = models["Q8_0"].perplexity(VAL, n_ctx=256, max_chunks=4)
    doc = json.loads(cli("perplexity", "-m", files["Q8_0"], "-f", text_file, "-c", 256, "--chunks", 4, "--json"))
    assert r["tokens_scored"] == doc["tokens_scored"] == 4 * 127
    assert r["ppl"] == doc["ppl"] and r["ppl_err"] == doc["ppl_err"]
    assert r["method"] == doc["method"]
    k = models["Q4_K_M"].kl_divergence(models["F16"], VAL, n_ctx=256, max_chunks=4)
    doc = json.loads(cli("perplexity", "-m", files["Q4_K_M"], "-f", text_file, "-c", 256, "--chunks", 4,
                         "--kl-base", files["F16"], "--json"))
    for key in ["mean_kld", "median_kld", "p99_kld", "max_kld", "same_top", "same_top_err", "base_ppl", "ppl_ratio"]:
        assert k[key] == doc["kl_base"][key], key
    assert k["ppl"] == doc["ppl"]
    assert 0 < k["mean_kld"] < 1 and 0.5 < k["same_top"] <= 1


@pytest.mark.parametrize("fmt", TYPES)
def test_properties_and_memory_equal_ggpt_mem(models, files, fmt):
    m = models[fmt]
    assert m.format == fmt
    assert m.file_size == files[fmt].stat().st_size
    assert m.n_params == GOLDEN["model"]["parameters"]
    assert (m.n_ctx, m.n_ctx_train, m.n_embd, m.n_layer, m.n_head, m.n_vocab) == (1024, 1024, 256, 6, 8, 50257)
    assert m.bpw == m.memory()["tensor_bytes"] * 8 / m.n_params
    assert {"F16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q4_K_M": 4.5}[fmt] < m.bpw < 17
    assert m.eos_token_id == 50256
    for kw, flags in [({}, []), ({"n_ctx": 256, "n_seq": 3, "kv": "f32"}, ["-c", 256, "--seqs", 3, "--kv", "f32"])]:
        want = json.loads(cli("mem", files[fmt], "--json", "-t", m.n_threads, *flags))
        assert m.memory(**kw) == want


def test_compare_returns_the_report(tmp_path, files):
    out = tmp_path / "cmp"
    out.mkdir()
    for t, p in files.items():  # reused, as ggpt compare reuses converted files
        (out / p.name).symlink_to(p)
    doc = ggpt.compare(MODEL, out_dir=out, n_ctx=128, chunks=2, bench_prompt=16, bench_gen=4)
    rows = doc["formats"]
    # The formats of `ggpt compare`: the four of `types=["all"]` plus the Q5_K mixes, which it
    # converts because they are missing from out_dir.
    assert [r["format"] for r in rows] == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M"]
    assert (out / "tiny-gpt2-Q5_K_M.gguf").is_file() and (out / "tiny-gpt2-Q5_K_S.gguf").is_file()
    assert rows[0]["same_top_pct"] == 100.0 and rows[0]["mean_kld"] == 0.0
    assert all(r["ppl"] > 1 and r["decode_tps"] > 0 and r["peak_rss_bytes"] == 0 for r in rows)
    assert all(r["mean_kld"] > 0 and r["file_bytes"] < rows[0]["file_bytes"] for r in rows[1:])
    assert doc["setup"]["method"].startswith("2 windows of 128 tokens")


# --- concurrency ----------------------------------------------------------------------------


def test_threads_share_one_model(models):
    m = models["Q6_K"]
    jobs = [(f"Prompt number {i}:", 100 + i) for i in range(4)]
    sequential = [m.generate(p, max_new_tokens=40, seed=s)[0] for p, s in jobs]
    results = [None] * 4
    errors = []

    def work(i):
        try:
            p, s = jobs[i]
            results[i] = m.generate(p, max_new_tokens=40, seed=s)[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == sequential


def test_gil_is_released_during_generate(f16):
    count = 0
    stop = threading.Event()

    def counter():
        nonlocal count
        while not stop.is_set():
            count += 1

    t = threading.Thread(target=counter)
    t.start()
    time.sleep(0.05)
    before = count
    start = time.perf_counter()
    f16.generate("Count with me:", max_new_tokens=400, temperature=0, ignore_eos=True)
    took = time.perf_counter() - start
    during = count - before
    stop.set()
    t.join()
    # With the GIL held for the whole call the counter could not move at all.
    assert took > 0.05
    assert during > 10_000, f"the counter advanced only {during} times in {took:.2f} s"


INTERRUPT = """
import os, signal, sys, threading, time
import ggpt
# A shell that starts this test in the background hands SIGINT down ignored, and Python then
# leaves it ignored; Ctrl-C is what this script is about, so take the default handler back.
signal.signal(signal.SIGINT, signal.default_int_handler)
m = ggpt.Model(sys.argv[1])
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
start = time.perf_counter()
try:
    if sys.argv[2] == "generate":
        m.generate("x", max_new_tokens=1000, temperature=0, ignore_eos=True)
        m.generate("x", max_new_tokens=1000, temperature=0, ignore_eos=True)
    elif sys.argv[2] == "stream":
        for _ in m.stream("x", max_new_tokens=1000, temperature=0, ignore_eos=True):
            time.sleep(0.01)
    else:
        m.perplexity(open(sys.argv[3]).read() * 20, n_ctx=512)
except KeyboardInterrupt:
    print("interrupted after %.2f s" % (time.perf_counter() - start))
    sys.exit(0)
print("finished without interruption")
sys.exit(1)
"""


@pytest.mark.parametrize("what", ["generate", "stream", "perplexity"])
def test_ctrl_c_raises_keyboard_interrupt(files, what, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    r = subprocess.run([sys.executable, str(script), str(files["F16"]), what, str(MODEL / "val.txt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "interrupted after" in r.stdout
    assert float(r.stdout.split()[2]) < 10


# --- errors ---------------------------------------------------------------------------------


def test_bad_files_raise_documented_exceptions(tmp_path, files):
    with pytest.raises(FileNotFoundError):
        ggpt.Model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ggpt.GgufError, match="junk.gguf") as e:
        ggpt.Model(junk)
    assert isinstance(e.value, ValueError)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["Q8_0"].read_bytes()[:100_000])
    with pytest.raises(ggpt.GgufError, match="cut.gguf"):
        ggpt.Model(cut)
    with pytest.raises(ggpt.GgufError):
        ggpt.Model(tmp_path)  # a directory
    with pytest.raises(FileNotFoundError):
        ggpt.convert(tmp_path / "no-such-checkpoint", tmp_path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ggpt.convert(ckpt, tmp_path, progress=False)
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json"):
        ggpt.convert(ckpt, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        ggpt.quantize(tmp_path / "missing.gguf", tmp_path / "o.gguf", "q8_0")
    with pytest.raises(ValueError):
        ggpt.quantize(files["Q4_K_M"], tmp_path / "o.gguf", "q8_0")  # already quantized


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.generate("x", temperature=-1),
        lambda m: m.generate("x", temperature=float("nan")),
        lambda m: m.generate("x", top_p=0),
        lambda m: m.generate("x", min_p=2),
        lambda m: m.generate("x", repeat_penalty=0),
        lambda m: m.generate("x", num_return_sequences=0),
        lambda m: m.generate("x", num_return_sequences=65),
        lambda m: m.generate("x", max_new_tokens=1024),
        lambda m: m.generate("x " * 1000, max_new_tokens=100),
        lambda m: m.generate([50257]),
        lambda m: m.generate([-1]),
        lambda m: m.generate("x", stop=[""]),
        lambda m: m.stream("x", top_p=1.5),
        lambda m: m.logits([]),
        lambda m: m.logits([0] * 1025),
        lambda m: m.features(""),
        lambda m: m.detokenize([1 << 40]),
        lambda m: m.perplexity("too short", n_ctx=512),
        lambda m: m.perplexity(VAL, n_ctx=1),
        lambda m: m.perplexity(VAL, n_ctx=2048),
        lambda m: m.memory(kv="f8"),
        lambda m: m.memory(n_ctx=0),
        lambda m: m.memory(n_seq=0),
        lambda m: ggpt.Model(m.path, n_ctx=0),
        lambda m: ggpt.Model(m.path, n_ctx=1025),
        lambda m: ggpt.Model(m.path, n_threads=0),
        lambda m: ggpt.convert(MODEL, "/tmp", types=["q3_k"]),
        lambda m: ggpt.quantize(m.path, "/tmp/x.gguf", "q2"),
        lambda m: ggpt.pipeline("text-generation", model=m)("x", do_sample=True, temperature=0),
    ],
)
def test_bad_arguments_raise_value_error(f16, call):
    with pytest.raises(ValueError) as e:
        call(f16)
    assert not isinstance(e.value, ggpt.GgufError)
    assert str(e.value)


def test_wrong_types_raise_type_error(f16):
    with pytest.raises(TypeError):
        f16.generate(3.5)
    with pytest.raises(TypeError):
        ggpt.set_seed("42")
    with pytest.raises(TypeError):
        ggpt.pipeline("text-generation", model=3)

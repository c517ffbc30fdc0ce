"""Cross-check of `ggpt convert` against llama.cpp's own Python GGUF code (gguf-py).

Converts the bundled tiny GPT-2 to all four types with the built `ggpt` binary, then opens
every file with `gguf.GGUFReader` (llama.cpp's reader, an implementation independent of ours)
and checks:
- the metadata keys, their GGUF value types and values against config.json / vocab.json /
  merges.txt / tokenizer_config.json;
- the tensor names, ggml types and shapes against llama.cpp's rules (`llama_tensor_get_type`);
- that `gguf.quants.dequantize` of every tensor equals, value for value, what `ggpt dump`
  writes — llama.cpp's dequantizers agreeing with ours on our bytes;
- that the F16 file holds exactly the fp16 weights of the safetensors source, Conv1D weights
  transposed (the source is parsed here with numpy, not with ggpt).

Requirements: `pip install -r tests/python/requirements.txt`; the binary from
`cargo build --release` (path in $GGPT_BIN, default target/release/ggpt). Nothing is skipped:
a missing binary or package is a failure.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-gpt2"
GGPT = Path(os.environ.get("GGPT_BIN", ROOT / "target" / "release" / "ggpt"))
TYPES = {"F16": 1, "Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15}
CONFIG = json.loads((MODEL / "config.json").read_text())
N_LAYER, N_EMBD, N_VOCAB, N_CTX = CONFIG["n_layer"], CONFIG["n_embd"], CONFIG["vocab_size"], CONFIG["n_positions"]
N_FF = 4 * N_EMBD


def run(*args):
    assert GGPT.is_file(), f"ggpt binary not found at {GGPT}: run `cargo build --release` or set GGPT_BIN"
    r = subprocess.run([str(GGPT), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"ggpt {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    run("convert", MODEL, "--type", "all", "-o", out)
    files = {t: out / f"tiny-gpt2-{t}.gguf" for t in TYPES}
    for t, f in files.items():
        assert f.is_file(), f"{f} was not written"
    return files


def field(reader, key):
    f = reader.fields[key]
    return f.types, f.contents()


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def expected_type(ftype, name):
    """llama.cpp's type for tensor `name` in a file of `ftype` (tied head, rows of 256·k)."""
    matrix = name.endswith(".weight") and "norm" not in name and name != "position_embd.weight"
    if not matrix:
        return Q.F32
    if ftype == "F16":
        return Q.F16
    if ftype == "Q8_0":
        return Q.Q8_0
    if ftype == "Q6_K":
        return Q.Q6_K
    if name == "token_embd.weight":
        return Q.Q6_K  # the tied output head
    layer = int(name.split(".")[1])
    if "attn_qkv" in name:
        return Q.Q5_K
    if "ffn_down" in name and use_more_bits(layer, N_LAYER):
        return Q.Q6_K
    return Q.Q4_K


def expected_shape(name):
    """numpy shape (GGUF dims reversed)."""
    kind = name.split(".")[-2]
    weight = name.endswith(".weight")
    return {
        ("token_embd", True): (N_VOCAB, N_EMBD),
        ("position_embd", True): (N_CTX, N_EMBD),
        ("attn_qkv", True): (3 * N_EMBD, N_EMBD),
        ("attn_qkv", False): (3 * N_EMBD,),
        ("attn_output", True): (N_EMBD, N_EMBD),
        ("ffn_up", True): (N_FF, N_EMBD),
        ("ffn_up", False): (N_FF,),
        ("ffn_down", True): (N_EMBD, N_FF),
    }.get((kind, weight), (N_EMBD,))


def expected_order():
    names = ["output_norm.bias", "output_norm.weight", "position_embd.weight", "token_embd.weight"]
    per_block = sorted(
        f"{t}.{s}" for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down") for s in ("weight", "bias")
    )
    for i in range(N_LAYER):
        names += [f"blk.{i}.{n}" for n in per_block]
    return names


@pytest.mark.parametrize("ftype", list(TYPES))
def test_metadata(converted, ftype):
    r = GGUFReader(converted[ftype])
    keys = list(r.fields)[3:]  # after GGUF.version, tensor_count, kv_count
    want = [
        "general.architecture",
        "general.type",
        "general.name",
        "gpt2.block_count",
        "gpt2.context_length",
        "gpt2.embedding_length",
        "gpt2.feed_forward_length",
        "gpt2.attention.head_count",
        "gpt2.attention.layer_norm_epsilon",
        "general.file_type",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "general.quantization_version",
    ]
    if ftype != "F16":
        # llama-quantize sets quantization_version and file_type again, moving them to the end.
        want.remove("general.file_type")
        want.append("general.file_type")
    assert keys == want
    S, U32, F32, ARR, I32 = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY, GGUFValueType.INT32
    assert field(r, "general.architecture") == ([S], "gpt2")
    assert field(r, "general.type") == ([S], "model")
    assert field(r, "general.name") == ([S], "tiny-gpt2")
    assert field(r, "gpt2.block_count") == ([U32], N_LAYER)
    assert field(r, "gpt2.context_length") == ([U32], N_CTX)
    assert field(r, "gpt2.embedding_length") == ([U32], N_EMBD)
    assert field(r, "gpt2.feed_forward_length") == ([U32], N_FF)
    assert field(r, "gpt2.attention.head_count") == ([U32], CONFIG["n_head"])
    assert field(r, "gpt2.attention.layer_norm_epsilon") == ([F32], np.float32(CONFIG["layer_norm_epsilon"]))
    assert field(r, "general.file_type") == ([U32], TYPES[ftype])
    assert field(r, "general.quantization_version") == ([U32], 2)
    assert field(r, "tokenizer.ggml.model") == ([S], "gpt2")
    assert field(r, "tokenizer.ggml.pre") == ([S], "gpt-2")
    # bos/eos from config.json; unk because tokenizer_config.json names <|endoftext|> as unk_token.
    tc = json.loads((MODEL / "tokenizer_config.json").read_text())
    assert tc["unk_token"] == "<|endoftext|>"
    for k in ("bos", "eos", "unknown"):
        assert field(r, f"tokenizer.ggml.{k}_token_id") == ([U32], 50256)

    types, tokens = field(r, "tokenizer.ggml.tokens")
    assert types == [ARR, S]
    vocab = json.loads((MODEL / "vocab.json").read_text())
    assert len(tokens) == N_VOCAB
    assert all(tokens[i] == t for t, i in vocab.items())
    types, tt = field(r, "tokenizer.ggml.token_type")
    assert types == [ARR, I32]
    assert tt[50256] == 3 and set(tt[:50256]) == {1}
    lines = (MODEL / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#")
    types, merges = field(r, "tokenizer.ggml.merges")
    assert types == [ARR, S]
    assert merges == [line for line in lines[1:] if line]


@pytest.mark.parametrize("ftype", list(TYPES))
def test_tensor_table(converted, ftype):
    r = GGUFReader(converted[ftype])
    names = [t.name for t in r.tensors]
    assert names == expected_order()
    for t in r.tensors:
        assert t.tensor_type == expected_type(ftype, t.name), t.name
        assert tuple(int(d) for d in reversed(t.shape)) == expected_shape(t.name), t.name


@pytest.mark.parametrize("ftype", list(TYPES))
def test_dequantization_matches_ggpt_dump(converted, ftype, tmp_path):
    run("dump", converted[ftype], tmp_path)
    r = GGUFReader(converted[ftype])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{t.name}.npy" for t in r.tensors)
    for t in r.tensors:
        ours = np.load(tmp_path / f"{t.name}.npy")
        theirs = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(expected_shape(t.name))
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, t.name
        assert np.array_equal(ours, theirs), f"{ftype} {t.name}: max diff {np.max(np.abs(ours - theirs))}"


def read_safetensors(path):
    """A minimal safetensors parser (8-byte header length, JSON, data) for F16/F32 tensors."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        dt = {"F16": "<f2", "F32": "<f4"}[info["dtype"]]
        out[name.removeprefix("transformer.")] = np.frombuffer(raw[8 + n + s : 8 + n + e], dtype=dt).reshape(info["shape"])
    return out


def test_f16_file_equals_the_fp16_source(converted):
    src = {}
    for p in sorted(MODEL.glob("*.safetensors")):
        src.update(read_safetensors(p))
    r = GGUFReader(converted["F16"])
    got = {t.name: np.asarray(t.data).reshape(expected_shape(t.name)) for t in r.tensors}
    hf = {"token_embd.weight": ("wte.weight", False), "position_embd.weight": ("wpe.weight", False),
          "output_norm.weight": ("ln_f.weight", False), "output_norm.bias": ("ln_f.bias", False)}
    for i in range(N_LAYER):
        for g, h, tr in [("attn_norm", "ln_1", False), ("attn_qkv", "attn.c_attn", True), ("attn_output", "attn.c_proj", True),
                         ("ffn_norm", "ln_2", False), ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True)]:
            hf[f"blk.{i}.{g}.weight"] = (f"h.{i}.{h}.weight", tr)
            hf[f"blk.{i}.{g}.bias"] = (f"h.{i}.{h}.bias", False)
    assert set(hf) == set(got)
    for g, (h, transposed) in hf.items():
        want = src[h].T if transposed else src[h]
        assert got[g].shape == want.shape, g
        # F32 tensors hold the fp16 values widened, F16 ones the same bits.
        assert np.array_equal(got[g].astype(np.float32), want.astype(np.float32)), g

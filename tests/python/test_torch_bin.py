"""Every GPT-2 shape through the `pytorch_model.bin` reader.

For GPT-2 (124M-shaped), distilgpt2 and GPT-2 XL (n_embd 1600, 25 heads) — with fewer layers
to keep CI fast — `ggpt synth` writes a random safetensors checkpoint, torch_bin_writer.py
(Python's pickle + zipfile, no PyTorch, no ggpt code) writes the same tensors as a torch.save
zip with a tied `lm_head.weight`, and:
- converting the .bin gives the same bytes as converting the safetensors, for each type;
- the result loads and generates with `ggpt run`.

Requirements: the binary from `cargo build --release` ($GGPT_BIN), Python 3 only.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GGPT = Path(os.environ.get("GGPT_BIN", ROOT / "target" / "release" / "ggpt"))
WRITER = Path(__file__).with_name("torch_bin_writer.py")
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"


def run(*args):
    assert GGPT.is_file(), f"ggpt binary not found at {GGPT}: run `cargo build --release` or set GGPT_BIN"
    r = subprocess.run([str(GGPT), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"ggpt {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.parametrize(
    "shape,n_layer,dtype,types,n_embd",
    [
        ("gpt2", 2, "f32", "all", 768),
        ("distilgpt2", 6, "f16", "q8_0,q4_k_m", 768),
        ("gpt2-xl", 1, "bf16", "f16,q8_0,q4_k_m", 1600),
    ],
)
def test_shape_converts_from_pytorch_bin_like_from_safetensors(tmp_path, shape, n_layer, dtype, types, n_embd):
    st, binary = tmp_path / "st", tmp_path / "bin"
    run("synth", "--shape", shape, "--n-layer", n_layer, "--dtype", dtype, "--vocab-from", TOKENIZER, "-o", st)
    subprocess.run([sys.executable, str(WRITER), str(st), str(binary), "--tie-head"], check=True)
    assert (binary / "pytorch_model.bin").is_file() and not (binary / "model.safetensors").exists()
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    o1.mkdir()
    o2.mkdir()
    run("convert", st, "-t", types, "-o", o1, "--name", "m")
    run("convert", binary, "-t", types, "-o", o2, "--name", "m")
    files = sorted(p.name for p in o1.iterdir())
    assert files == sorted(p.name for p in o2.iterdir())
    assert len(files) == (4 if types == "all" else len(types.split(",")))
    for name in files:
        a, b = (o1 / name).read_bytes(), (o2 / name).read_bytes()
        assert a == b, f"{shape}: {name} from pytorch_model.bin differs from the safetensors conversion"
    for name in files:
        r = run("run", "-m", o2 / name, "-p", "Hello, my name is", "-n", "4", "--temp", "0")
        assert r.stdout.startswith("Hello, my name is") and len(r.stdout) > len("Hello, my name is")
    info = run("inspect", o2 / files[0]).stdout.splitlines()
    assert any("gpt2.embedding_length" in l and l.split()[-1] == str(n_embd) for l in info), info[:12]
    assert any("gpt2.block_count" in l and l.split()[-1] == str(n_layer) for l in info), info[:12]

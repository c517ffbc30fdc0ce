"""ggpt: GPT-2 GGUF models from Python.

The same idioms as Hugging Face transformers (``pipeline``, ``set_seed``,
``num_return_sequences``), numpy arrays out, and ggpt's SIMD kernels underneath. Every call
runs the ``ggpt`` Rust library, the code the ``ggpt`` command line runs.

>>> from ggpt import pipeline, set_seed
>>> generator = pipeline("text-generation", model="gpt2-medium-Q4_K_M.gguf")
>>> set_seed(42)
>>> generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)

See docs/python.md for the whole API.
"""

import json

from ._ggpt import GgufError, Model, TextStream, __version__
from ._ggpt import compare as _compare
from ._ggpt import convert, quantize
from ._ggpt import set_seed as _set_seed
from .pipeline import FeatureExtractionPipeline, TextGenerationPipeline, pipeline

__all__ = [
    "FeatureExtractionPipeline",
    "GgufError",
    "Model",
    "TextGenerationPipeline",
    "TextStream",
    "__version__",
    "compare",
    "convert",
    "pipeline",
    "quantize",
    "set_seed",
]


def set_seed(seed: int) -> None:
    """Seed ggpt's random generator, as transformers' ``set_seed`` does for torch.

    Every ``Model.generate``/``stream`` call (and every pipeline call) without an explicit
    ``seed=`` draws its seed from this generator, so after ``set_seed(n)`` the same sequence of
    calls gives the same texts. Until it is called, the generator starts from the clock.
    Only ggpt's generator is seeded (not ``random`` or numpy).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"set_seed() takes an int, got {type(seed).__name__}")
    _set_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


def compare(hf_dir, text=None, out_dir=None, n_ctx=512, chunks=100, bench_prompt=256, bench_gen=64):
    """Convert ``hf_dir`` to F16, Q8_0, Q6_K, Q5_K_M, Q5_K_S and Q4_K_M and measure each format.

    The measurements of ``ggpt compare`` (size, bits per weight, estimated RAM/VRAM, load time,
    prefill/decode speed, perplexity with its error, and against F16: KL divergence, top-1
    agreement, RMS Δp), returned as the dict ``ggpt compare`` writes to ``report.json``
    (``{"setup": {...}, "formats": [...]}``). GGUF files already in ``out_dir`` are reused.

    ``text``: path of the evaluation text (default: the bundled model's ``val.txt`` when it is
    given, else required). ``out_dir``: where the GGUF files go (default
    ``out/compare/<model name>``). Peak RSS needs a separate process per format and is not
    measured here (``peak_rss_bytes`` is 0); ``ggpt compare`` measures it.
    """
    doc = _compare(
        hf_dir,
        text=text,
        out_dir=out_dir,
        n_ctx=n_ctx,
        chunks=chunks,
        bench_prompt=bench_prompt,
        bench_gen=bench_gen,
    )
    return json.loads(doc)

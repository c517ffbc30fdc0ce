"""Type stubs of ggpt's Rust extension module (re-exported by ``ggpt``)."""

from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, PathLike[str]]
_Input = Union[str, Sequence[int], npt.NDArray[np.integer[Any]]]

class GgufError(ValueError):
    """A GGUF file that cannot be used: not GGUF, truncated, malformed, not GPT-2, a bad
    tokenizer, or NaN/infinite weights. The message names the file."""

class TextStream(Iterator[str]):
    """Iterator over the text pieces of one generation, from ``Model.stream``. Pieces never
    split a UTF-8 character; joined, they equal ``Model.generate``'s text for the same
    arguments. Dropping or closing the iterator stops the generation."""

    def __iter__(self) -> "TextStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stop generating; the iterator then ends."""

class Model:
    """A GPT-2 GGUF file, mapped once and validated (metadata, every tensor's shape and type,
    the tokenizer, the scales of every quantized block).

    Thread-safe: any number of Python threads may call one Model at once; each call runs its
    own session (KV cache and buffers), with the GIL released. Ctrl-C interrupts a long call
    with ``KeyboardInterrupt``.

    ``n_ctx``: the longest context calls may use (default and maximum: the model's, 1024 for
    GPT-2). ``n_threads``: threads each call computes on (default: one per core, shared by
    all Models).

    Raises ``FileNotFoundError`` for a missing file, ``GgufError`` for a file that cannot be
    used, ``ValueError`` for a bad ``n_ctx``/``n_threads``.
    """

    def __init__(self, path: _Path, n_ctx: Optional[int] = None, n_threads: Optional[int] = None) -> None: ...
    def generate(
        self,
        prompt: _Input,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        num_return_sequences: int = 1,
        seed: Optional[int] = None,
        stop: Optional[List[str]] = None,
        ignore_eos: bool = False,
    ) -> List[str]:
        """Generate ``num_return_sequences`` continuations of ``prompt`` (text, or token ids);
        returns the generated text of each, without the prompt.

        The sampling chain and its defaults are ``ggpt run``'s (llama.cpp's): repetition
        penalty, top-k, top-p, min-p, temperature; ``temperature=0`` is greedy. Sequence i is
        sampled with seed ``seed + i``; ``seed=None`` draws one from the generator that
        ``ggpt.set_seed`` seeds. Several sequences share the prompt's KV cache and decode as
        one batch. A sequence ends at ``<|endoftext|>`` (unless ``ignore_eos``), at the first
        of the ``stop`` strings (cut off before it), or after ``max_new_tokens``. An empty
        prompt starts from ``<|endoftext|>``.

        Raises ``ValueError`` for out-of-range arguments, token ids outside the vocabulary, or
        a prompt plus ``max_new_tokens`` longer than the context.
        """
    def stream(
        self,
        prompt: _Input,
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: Optional[int] = None,
        stop: Optional[List[str]] = None,
        ignore_eos: bool = False,
    ) -> TextStream:
        """``generate`` with one sequence, yielding the text as it is produced (generated on a
        background thread, a few pieces ahead of the reader). Arguments are checked here,
        before the first piece."""
    def tokenize(self, text: str) -> List[int]:
        """GPT-2 byte-level BPE token ids of ``text``; ``<|endoftext|>`` is the special token."""
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids (bytes that are not valid UTF-8 become U+FFFD)."""
    def logits(self, ids: _Input) -> npt.NDArray[np.float32]:
        """Raw next-token logits at every position, shape ``(T, n_vocab)``, float32: row t
        predicts token t+1. ``ids`` may also be text."""
    def features(self, text: _Input) -> npt.NDArray[np.float32]:
        """The last hidden state (after the final LayerNorm) at every position, shape
        ``(T, n_embd)``, float32: transformers' ``GPT2Model(...).last_hidden_state[0]``."""
    def perplexity(
        self, text: str, n_ctx: int = 512, max_chunks: Optional[int] = None, score_all: bool = False
    ) -> Dict[str, Any]:
        """Perplexity of ``text`` by llama-perplexity's method, as ``ggpt perplexity``: the
        tokens cut into windows of ``n_ctx``, each evaluated from an empty cache, the second
        half of each window scored (every prediction with ``score_all``).

        Returns ``ppl``, ``ppl_err`` (standard error), ``tokens_scored``, ``mean_nll``,
        ``windows``, ``method`` (a description), ``tokens_per_second``, ``seconds``.
        Raises ``ValueError`` if ``n_ctx`` is out of range or the text is shorter than one
        window.
        """
    def kl_divergence(
        self,
        base: "Model",
        text: str,
        n_ctx: int = 512,
        max_chunks: Optional[int] = None,
        score_all: bool = False,
    ) -> Dict[str, Any]:
        """KL divergence of this model's next-token distributions from ``base``'s (usually
        the F16 file) on the windows ``perplexity`` uses, as ``ggpt perplexity --kl-base``.

        Returns ``mean_kld``, ``median_kld``, ``p99_kld``, ``max_kld``, ``same_top`` (top-1
        agreement, a fraction) and ``same_top_err``, ``mean_delta_p``, ``rms_delta_p``,
        ``ppl``, ``base_ppl``, ``ppl_ratio``, ``tokens_scored``, ``method``.
        """
    def memory(
        self, n_ctx: Optional[int] = None, n_batch: Optional[int] = None, n_seq: int = 1, kv: str = "f16"
    ) -> Dict[str, Any]:
        """Predicted memory, term by term, as ``ggpt mem --json``: ``file_bytes``,
        ``tensor_bytes``, ``kv_bytes``, ``scratch_bytes``, ``logits_bytes``, ``runtime_bytes``,
        ``ram_total_bytes``, ``gpu_compute_bytes``, ``vram_total_bytes`` (full GPU offload),
        and the run's ``format``, ``n_ctx``, ``n_batch``, ``n_seq``, ``kv_type``. ``n_batch``
        is the prompt tokens per call into the model (default: the whole context at once)."""
    @property
    def format(self) -> str:
        """The quantization mix as llama.cpp names it: "F16", "Q8_0", "Q6_K", "Q4_K_M", ..."""
    @property
    def path(self) -> PathLike[str]:
        """Path of the GGUF file (a ``pathlib.Path``)."""
    @property
    def file_size(self) -> int:
        """Size of the file in bytes."""
    @property
    def bpw(self) -> float:
        """Bits per weight over the tensor data, as llama.cpp reports model size."""
    @property
    def n_params(self) -> int:
        """Number of weights in the file."""
    @property
    def n_ctx(self) -> int:
        """Longest context calls on this Model may use."""
    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained for."""
    @property
    def n_embd(self) -> int:
        """Width of the hidden state."""
    @property
    def n_layer(self) -> int:
        """Number of transformer blocks."""
    @property
    def n_head(self) -> int:
        """Attention heads per block."""
    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
    @property
    def n_threads(self) -> int:
        """Threads each call computes on."""
    @property
    def eos_token_id(self) -> Optional[int]:
        """Id of ``<|endoftext|>``, or None."""

def set_seed(seed: int) -> None:
    """Seed the generator that calls without ``seed=`` draw their seed from."""

def convert(
    hf_dir: _Path,
    out_dir: Optional[_Path] = None,
    types: Sequence[str] = ("f16", "q8_0", "q6_k", "q4_k_m"),
    progress: bool = True,
    name: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Convert a Hugging Face GPT-2 checkpoint (config.json, safetensors, tokenizer files) to
    GGUF, every type in one pass, as ``ggpt convert``: byte-identical to llama.cpp's
    quantizer. ``types``: "f16", "q8_0", "q6_k", "q4_k_m" or "all". ``out_dir``: a directory
    (files named ``<name>-<TYPE>.gguf``) or, for one type, a ``.gguf`` path; default the
    checkpoint directory. Files are written whole or not at all.

    Returns one dict per file: ``path``, ``type``, ``n_tensors``, ``file_bytes``,
    ``tensor_bytes``, ``n_params``, ``bpw``, ``seconds``, ``tensor_types`` (type → count),
    ``differs_from_llama_cpp``. Raises ``FileNotFoundError`` for a missing directory or file
    in it, ``ValueError`` for a bad checkpoint or type, ``OSError`` for an unwritable output.
    """

def quantize(src: _Path, dst: _Path, type: str, progress: bool = False) -> Dict[str, Any]:
    """Requantize an F32/F16/BF16 GPT-2 GGUF with llama-quantize's per-tensor rules, as
    ``ggpt quantize``; returns the same dict as one ``convert`` file."""

def compare(
    hf_dir: _Path,
    text: Optional[_Path] = None,
    out_dir: Optional[_Path] = None,
    n_ctx: int = 512,
    chunks: int = 100,
    bench_prompt: int = 256,
    bench_gen: int = 64,
) -> str:
    """The JSON text of ``ggpt compare``'s report (``ggpt.compare`` parses it)."""

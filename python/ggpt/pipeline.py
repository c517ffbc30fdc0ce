"""transformers-style pipelines over a GGUF model: ``pipeline("text-generation", model=...)``
and ``pipeline("feature-extraction", model=...)``.

The arguments and return shapes are transformers'. The defaults are the ones transformers uses
for GPT-2 checkpoints (``gpt2``, ``gpt2-medium``, ...): their ``config.json`` carries
``task_specific_params = {"text-generation": {"do_sample": true, "max_length": 50}}``, which
the transformers pipeline applies, on top of ``GenerationConfig``'s ``top_k=50``,
``top_p=1.0``, ``temperature=1.0``. A GGUF file does not carry ``task_specific_params``, so
ggpt uses those values for every model. ``model.generate`` (transformers' own, outside a
pipeline) would be greedy for GPT-2; ``do_sample=False`` gives that here.

What differs from transformers: the random numbers (same seed, different texts than torch),
and with ``temperature != 1`` together with ``top_p < 1`` the nucleus is chosen at
temperature 1 as in llama.cpp (transformers applies the temperature first).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ._ggpt import Model

__all__ = ["pipeline", "TextGenerationPipeline", "FeatureExtractionPipeline"]

#: Defaults of transformers' text-generation pipeline for GPT-2 checkpoints.
GPT2_PIPELINE_DEFAULTS = {
    "do_sample": True,
    "max_length": 50,
    "top_k": 50,
    "top_p": 1.0,
    "temperature": 1.0,
    "repetition_penalty": 1.0,
}

_GENERATE_KEYS = {
    "max_length",
    "max_new_tokens",
    "num_return_sequences",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "return_full_text",
    "return_text",
    "seed",
    "stop",
}


def _load(model: Union[str, "os.PathLike[str]", Model, None], n_ctx, n_threads) -> Model:
    if model is None:
        raise ValueError(
            "ggpt has no default model: pass model= a GGUF file path or a ggpt.Model"
        )
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return Model(model, n_ctx=n_ctx, n_threads=n_threads)
    raise TypeError(f"model must be a path or a ggpt.Model, got {type(model).__name__}")


class TextGenerationPipeline:
    """Text generation with transformers' ``TextGenerationPipeline`` arguments and output.

    Call it with a prompt (or a list of prompts) and generation arguments; it returns
    ``[{"generated_text": ...}, ...]`` per prompt (a list of such lists for a list of
    prompts). Arguments given to ``pipeline(...)`` become the defaults of every call.
    """

    task = "text-generation"

    def __init__(self, model: Model, **defaults: Any) -> None:
        _check_keys(defaults)
        self.model = model
        self._defaults = {**GPT2_PIPELINE_DEFAULTS, **defaults}

    def __call__(self, text_inputs: Union[str, Sequence[str]], **kwargs: Any):
        _check_keys(kwargs)
        args = {**self._defaults, **kwargs}
        if isinstance(text_inputs, str):
            return self._one(text_inputs, args)
        if isinstance(text_inputs, (list, tuple)):
            return [self._one(t, args) for t in text_inputs]
        raise TypeError(f"text_inputs must be a str or a list of str, got {type(text_inputs).__name__}")

    def _one(self, prompt: str, args: Dict[str, Any]) -> List[Dict[str, str]]:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        n_prompt = max(len(self.model.tokenize(prompt)), 1)
        max_new = args.get("max_new_tokens")
        if max_new is None:
            max_length = args["max_length"]
            max_new = max_length - n_prompt
            if max_new <= 0:
                raise ValueError(
                    f"Input length of input_ids is {n_prompt}, but `max_length` is set to "
                    f"{max_length}: nothing left to generate. Increase `max_length` or set "
                    "`max_new_tokens`."
                )
        n_seq = args.get("num_return_sequences", 1)
        do_sample = args["do_sample"]
        if do_sample:
            temperature = args["temperature"]
            if not temperature > 0:
                raise ValueError(
                    f"`temperature` (={temperature}) has to be a strictly positive float when "
                    "sampling; use do_sample=False for greedy decoding"
                )
        else:
            if n_seq != 1:
                raise ValueError(
                    "Greedy decoding (do_sample=False) gives the same sequence every time: "
                    f"num_return_sequences must be 1, got {n_seq}"
                )
            temperature = 0.0
        top_k = args["top_k"]
        texts = self.model.generate(
            prompt,
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=0 if top_k is None else top_k,
            top_p=1.0 if args["top_p"] is None else args["top_p"],
            min_p=args.get("min_p") or 0.0,
            repeat_penalty=args["repetition_penalty"],
            num_return_sequences=n_seq,
            seed=args.get("seed"),
            stop=args.get("stop"),
        )
        full = args.get("return_full_text", True)
        if args.get("return_text", True) is False:
            raise ValueError("return_text=False (token ids out) is not supported by ggpt")
        return [{"generated_text": (prompt + t) if full else t} for t in texts]


class FeatureExtractionPipeline:
    """The last hidden state of every token, as transformers' ``FeatureExtractionPipeline``.

    For one text it returns a nested list of shape ``[1][T][n_embd]`` (``return_tensors=True``:
    a float32 numpy array of shape ``(1, T, n_embd)``); for a list of texts, a list of those.
    """

    task = "feature-extraction"

    def __init__(self, model: Model, return_tensors: bool = False) -> None:
        self.model = model
        self.return_tensors = return_tensors

    def __call__(self, inputs: Union[str, Sequence[str]], return_tensors: Optional[bool] = None):
        rt = self.return_tensors if return_tensors is None else return_tensors
        if isinstance(inputs, str):
            return self._one(inputs, rt)
        if isinstance(inputs, (list, tuple)):
            return [self._one(t, rt) for t in inputs]
        raise TypeError(f"inputs must be a str or a list of str, got {type(inputs).__name__}")

    def _one(self, text: str, return_tensors: bool):
        if not isinstance(text, str):
            raise TypeError(f"an input must be a str, got {type(text).__name__}")
        hidden = self.model.features(text)[np.newaxis]
        return hidden if return_tensors else hidden.tolist()


def _check_keys(kwargs: Dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _GENERATE_KEYS)
    if unknown:
        raise TypeError(
            f"unsupported text-generation argument(s) {unknown}; ggpt takes "
            f"{sorted(_GENERATE_KEYS)}"
        )


def pipeline(
    task: str,
    model: Union[str, "os.PathLike[str]", Model, None] = None,
    *,
    n_ctx: Optional[int] = None,
    n_threads: Optional[int] = None,
    **kwargs: Any,
):
    """A transformers-style pipeline over a GGUF model.

    ``task``: ``"text-generation"`` or ``"feature-extraction"``. ``model``: a GGUF file path or a
    ``ggpt.Model`` (shared, not copied). ``n_ctx``/``n_threads`` are passed to ``Model`` when a
    path is given. Other keyword arguments become the defaults of every call (for
    text-generation: ``max_length``, ``max_new_tokens``, ``num_return_sequences``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
    ``return_full_text``, ``seed``, ``stop``; for feature-extraction: ``return_tensors``).

    >>> generator = pipeline("text-generation", model="gpt2-medium-Q4_K_M.gguf")
    >>> generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)
    """
    if task == "text-generation":
        return TextGenerationPipeline(_load(model, n_ctx, n_threads), **kwargs)
    if task == "feature-extraction":
        return FeatureExtractionPipeline(_load(model, n_ctx, n_threads), **kwargs)
    raise ValueError(
        f"unknown task {task!r}: ggpt supports 'text-generation' and 'feature-extraction'"
    )

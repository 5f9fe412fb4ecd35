"""Model adapters: pre-processing, one ONNX Runtime call per (sub-)batch, post-processing.

``run`` is blocking and CPU/GPU bound; the worker calls it off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel
from tokenizers import Encoding, Tokenizer

from schemas.contracts import ModelConfig, TensorInput, TextEmbeddingInput
from workers.errors import InferenceError, ModelLoadError
from workers.repository import MODEL_FILE, ModelRepository
from workers.runtime import open_session

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_TOKENS = 256

_Input = TypeVar("_Input", bound=BaseModel)


class LoadedModel(Protocol):
    config: ModelConfig
    provider: str

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        """One result per input, in order; raises InferenceError if the batch fails."""
        ...


def load_model(
    repo: ModelRepository, config: ModelConfig, providers: list[str], threads: int
) -> LoadedModel:
    """Open one model version with its adapter and run it once, so the first batch is not slow."""
    directory = repo.version_dir(config.name, config.version)
    session, provider = open_session(directory / MODEL_FILE, providers, threads)
    model: TextEmbeddingModel | IdentityModel
    if config.adapter == "text-embedding":
        model = TextEmbeddingModel(config, session, provider, _load_tokenizer(directory))
        warmup: list[BaseModel] = [TextEmbeddingInput(text="warm up")]
    elif config.adapter == "identity":
        model = IdentityModel(config, session, provider)
        warmup = [TensorInput(tensor=[0.0])]
    else:  # the config schema allows no other value; guard against a widened Literal
        raise ModelLoadError(f"{config.name}/{config.version}: unknown adapter {config.adapter!r}")
    try:
        model.run(warmup)
    except InferenceError as exc:
        raise ModelLoadError(f"{config.name}/{config.version}: warm-up run failed: {exc}") from exc
    return model


class TextEmbeddingModel:
    """Sentence embeddings from a graph that takes token ids and returns pooled, normalised
    vectors (output ``[batch, dim]``)."""

    def __init__(
        self,
        config: ModelConfig,
        session: ort.InferenceSession,
        provider: str,
        tokenizer: Tokenizer,
    ) -> None:
        self.config = config
        self.provider = provider
        self._session = session
        self._input_names = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._input_names
        unexpected = self._input_names - {"input_ids", "attention_mask", "token_type_ids"}
        outputs = session.get_outputs()
        if missing or unexpected or len(outputs) != 1 or len(outputs[0].shape) != 2:
            raise ModelLoadError(
                f"{config.name}/{config.version}: a text-embedding graph takes input_ids, "
                "attention_mask (and optionally token_type_ids) and returns one [batch, dim] "
                f"output; this one takes {sorted(self._input_names)} and returns "
                f"{[(o.name, o.shape) for o in outputs]}"
            )
        self._output_name = outputs[0].name
        max_tokens = config.options.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
            raise ModelLoadError(
                f"{config.name}/{config.version}: options.max_tokens must be an integer >= 2, "
                f"not {max_tokens!r}"
            )
        # tokenizer.json files often carry fixed-length padding; padding is done here per
        # sub-batch instead, to the longest member
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer = tokenizer
        self._pad_id = _pad_id(tokenizer)

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        texts = [_expect(item, TextEmbeddingInput).text for item in inputs]
        if not texts:
            return []
        try:
            encodings = self._tokenizer.encode_batch(texts)
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise InferenceError(f"tokenization failed: {exc}") from exc
        lengths = [len(e.ids) for e in encodings]
        results: list[dict[str, Any]] = [{} for _ in texts]
        for group in length_groups(lengths):
            vectors = self._embed([encodings[i] for i in group])
            for row, index in enumerate(group):
                results[index] = {
                    "embedding": vectors[row].tolist(),
                    "dimensions": int(vectors.shape[1]),
                    "tokens": lengths[index],
                }
        return results

    def _embed(self, encodings: Sequence[Encoding]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)  # single-segment inputs
        output = _run(self._session, self._output_name, feeds)
        if output.ndim != 2 or output.shape[0] != len(encodings):
            raise InferenceError(f"graph returned shape {output.shape} for {len(encodings)} inputs")
        return output


class IdentityModel:
    """Echoes float32 tensors through a real ONNX ``Identity`` graph: the pipeline's own cost."""

    def __init__(self, config: ModelConfig, session: ort.InferenceSession, provider: str) -> None:
        self.config = config
        self.provider = provider
        self._session = session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 2:
            raise ModelLoadError(
                f"{config.name}/{config.version}: an identity graph takes one [batch, n] input "
                "and returns one output"
            )
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name

    def run(self, inputs: list[BaseModel]) -> list[dict[str, Any]]:
        tensors = [_expect(item, TensorInput).tensor for item in inputs]
        if not tensors:
            return []
        lengths = [len(t) for t in tensors]
        batch = np.zeros((len(tensors), max(lengths)), dtype=np.float32)
        with np.errstate(over="ignore"):  # checked just below, with a clearer message
            for row, values in enumerate(tensors):
                batch[row, : lengths[row]] = values
        if not np.isfinite(batch).all():
            raise InferenceError("tensor values must fit in float32 (|x| < 3.4e38)")
        output = _run(self._session, self._output_name, {self._input_name: batch})
        return [{"tensor": output[row, :n].tolist()} for row, n in enumerate(lengths)]


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Split a batch's indices into sub-batches of similar length, shortest first.

    Everything in a sub-batch is padded to its longest member, and attention costs grow with
    the square of that; one 256-token text would otherwise make 31 short ones cost as much as
    itself. A sub-batch grows while its longest member is at most twice its shortest, or at
    most 32 tokens longer (below that, the fixed cost of another graph run outweighs padding).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    start = 0
    for index in order:
        if groups and (lengths[index] <= 2 * start or lengths[index] - start <= 32):
            groups[-1].append(index)
        else:
            groups.append([index])
            start = lengths[index]
    return groups


def _load_tokenizer(directory: Path) -> Tokenizer:
    path = directory / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exceptions
        raise ModelLoadError(f"cannot load tokenizer {path}: {exc}") from exc


def _pad_id(tokenizer: Tokenizer) -> int:
    pad = tokenizer.token_to_id("[PAD]")
    return 0 if pad is None else pad  # the mask hides padding; the id only has to be valid


def _expect(item: BaseModel, kind: type[_Input]) -> _Input:
    if not isinstance(item, kind):
        raise InferenceError(f"expected {kind.__name__}, got {type(item).__name__}")
    return item


def _run(session: ort.InferenceSession, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    try:
        result = session.run([output], feeds)[0]
    except Exception as exc:  # ORT's pybind exception types are not a public API
        # a rejected argument will be rejected again; anything else may be transient
        retryable = type(exc).__name__ not in {"InvalidArgument", "InvalidGraph"}
        raise InferenceError(f"ONNX Runtime failed: {exc}", retryable=retryable) from exc
    return np.asarray(result)

"""In-process baselines: the same ONNX model run by ONNX Runtime alone, and by the adapter.

They run in the benchmark process while the inferq roles are idle (or not started), so that
they have the machine to themselves.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from schemas.contracts import ModelConfig, TensorInput, TextEmbeddingInput
from workers.adapters import LoadedModel, load_model
from workers.repository import ModelRepository
from workers.runtime import choose_providers

_SUBJECTS = [
    "the engineer",
    "a small robot",
    "my neighbour",
    "the old train",
    "our team",
    "the quiet student",
    "a busy market",
    "the river",
    "this new phone",
    "the chef",
]
_VERBS = [
    "carefully repaired",
    "quickly painted",
    "slowly crossed",
    "happily shared",
    "finally opened",
    "never forgot",
    "proudly showed",
    "often visited",
]
_OBJECTS = [
    "the wooden bridge",
    "a bright red door",
    "the long report",
    "an empty garden",
    "the final chapter",
    "a tiny blue box",
    "the city library",
    "our shared kitchen",
]
_TAILS = [
    "before lunch",
    "after the storm",
    "on a cold morning",
    "near the station",
    "with great care",
    "during the summer",
    "late last night",
    "without any help",
]
_SHORT = [
    "hello world",
    "good morning",
    "fast answers please",
    "how are you today",
    "tiny text",
    "embed me",
    "what a day",
    "quick check",
]


def sentences(n: int, seed: int = 7) -> list[str]:
    """``n`` plain English sentences of ~15 tokens each (12-17 with [CLS]/[SEP])."""
    rnd = random.Random(seed)
    return [
        f"{rnd.choice(_SUBJECTS).capitalize()} {rnd.choice(_VERBS)} {rnd.choice(_OBJECTS)} "
        f"{rnd.choice(_TAILS)}."
        for _ in range(n)
    ]


def short_texts(n: int, seed: int = 11) -> list[str]:
    rnd = random.Random(seed)
    return [f"{rnd.choice(_SHORT)} {i}" for i in range(n)]


def token_lengths(tokenizer_path: Path, texts: list[str]) -> list[int]:
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(max_length=256)
    return [len(e.ids) for e in tok.encode_batch(texts)]


@dataclass
class Throughput:
    items: int
    seconds: float
    batch_size: int
    threads: int
    provider: str

    @property
    def per_s(self) -> float:
        return self.items / self.seconds


def raw_ort_throughput(
    model_dir: Path,
    texts: list[str],
    batch_size: int,
    threads: int,
    providers: list[str],
    max_tokens: int = 256,
) -> Throughput:
    """``session.run`` alone over pre-tokenized, pre-padded batches (padding to the longest
    member of each batch, as the adapter does)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), sess_options=options, providers=providers
    )
    names = {i.name for i in session.get_inputs()}
    output = session.get_outputs()[0].name
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    pad = tok.token_to_id("[PAD]") or 0
    feeds: list[dict[str, np.ndarray]] = []
    for start in range(0, len(texts), batch_size):
        encodings = tok.encode_batch(texts[start : start + batch_size])
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), pad, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        feeds.append(feed)
    for feed in feeds[:3]:  # warm-up: allocator arenas, thread pool
        session.run([output], feed)
    started = time.perf_counter()
    for feed in feeds:
        session.run([output], feed)
    seconds = time.perf_counter() - started
    provider = session.get_providers()[0]
    del session
    gc.collect()
    return Throughput(len(texts), seconds, batch_size, threads, provider)


def open_adapter(models: Path, config: ModelConfig, threads: int) -> LoadedModel:
    providers = choose_providers(None)
    return load_model(ModelRepository(models), config, providers, threads)


def adapter_throughput(
    model: LoadedModel, texts: list[str], batch_size: int, threads: int
) -> Throughput:
    """``adapter.run`` (tokenizing, padding, session.run, result dicts) in batches."""
    inputs = [TextEmbeddingInput(text=t) for t in texts]
    batches = [list(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    for batch in batches[:3]:
        model.run(list(batch))
    started = time.perf_counter()
    for batch in batches:
        model.run(list(batch))
    seconds = time.perf_counter() - started
    return Throughput(len(texts), seconds, batch_size, threads, model.provider)


def adapter_latencies(model: LoadedModel, texts: list[str], warmup: int = 20) -> list[float]:
    """Seconds per ``adapter.run([one input])``, one sample per text."""
    inputs = [TextEmbeddingInput(text=t) for t in texts]
    for item in inputs[:warmup]:
        model.run([item])
    samples = []
    for item in inputs:
        started = time.perf_counter()
        model.run([item])
        samples.append(time.perf_counter() - started)
    return samples


def identity_throughput(model: LoadedModel, n: int, batch_size: int) -> Throughput:
    """The identity adapter alone: what the model costs inside an identity job."""
    item = TensorInput(tensor=[1.0, 2.0, 3.0, 4.0])
    batch: list[Any] = [item] * batch_size
    model.run(batch)
    runs = max(1, n // batch_size)
    started = time.perf_counter()
    for _ in range(runs):
        model.run(batch)
    seconds = time.perf_counter() - started
    return Throughput(runs * batch_size, seconds, batch_size, 0, model.provider)


def percentiles(samples: list[float], qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}

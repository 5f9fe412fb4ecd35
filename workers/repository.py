"""The model repository on disk: ``<root>/<name>/<version>/{config.json, model.onnx, ...}``."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from schemas.contracts import ModelConfig
from schemas.jobs import MODEL_NAME_PATTERN
from workers.errors import ModelRepositoryError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"

_NAME_RE = re.compile(MODEL_NAME_PATTERN)
_VERSION_RE = re.compile(r"^[A-Za-z0-9._\-]{1,32}$")


class ModelRepository:
    """Reads model configs from a folder tree; holds no state beyond the root path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def configs(self) -> list[ModelConfig]:
        """Every complete version (config.json and model.onnx both present), sorted by key.

        A missing root is an empty repository: a fresh data dir has no models yet, and the
        caller decides whether that is an error. Hidden folders (export temp dirs) are skipped.
        """
        if not self.root.exists():
            return []
        if not self.root.is_dir():
            raise ModelRepositoryError(f"model repository {self.root} is not a directory")
        found: list[ModelConfig] = []
        for name_dir in _subdirs(self.root):
            for version_dir in _subdirs(name_dir):
                config_path = version_dir / CONFIG_FILE
                if config_path.is_file() and (version_dir / MODEL_FILE).is_file():
                    found.append(self._read_config(config_path))
        return sorted(found, key=lambda c: c.key)

    def version_dir(self, name: str, version: str) -> Path:
        """The folder of one model version; raises if the names are unsafe or it is absent."""
        # versions like ".." pass the version pattern but would escape the root
        if not _NAME_RE.match(name) or not _VERSION_RE.match(version) or version in {".", ".."}:
            raise ModelRepositoryError(f"invalid model name or version: {name!r} {version!r}")
        path = self.root / name / version
        if not path.is_dir():
            raise ModelRepositoryError(
                f"model {name} version {version} not found under {self.root}"
            )
        return path

    def _read_config(self, path: Path) -> ModelConfig:
        try:
            config = ModelConfig.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise ModelRepositoryError(f"malformed model config {path}: {exc}") from exc
        except OSError as exc:
            raise ModelRepositoryError(f"cannot read model config {path}: {exc}") from exc
        # the folder is what routing and loading use, so the two must agree
        expected = (path.parent.parent.name, path.parent.name)
        if config.key != expected:
            raise ModelRepositoryError(
                f"model config {path} says {config.name}/{config.version}, "
                f"but lives in {expected[0]}/{expected[1]}"
            )
        return config


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ModelRepositoryError(f"cannot list {path}: {exc}") from exc

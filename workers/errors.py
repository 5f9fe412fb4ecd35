"""Errors raised by the worker side: model repository, runtimes, adapters, export."""

from __future__ import annotations

from schemas.errors import ErrorCode


class WorkerError(Exception):
    """Base of every error the workers package raises on purpose."""


class ModelRepositoryError(WorkerError):
    """The model repository is unreadable or holds a malformed entry."""


class ProviderError(WorkerError):
    """An execution-provider preference names a provider that cannot be used here."""


class ModelLoadError(WorkerError):
    """A model version could not be opened (bad graph, missing tokenizer, wrong contract)."""


class ExportError(WorkerError):
    """Building a model for the repository failed."""


class ExportDependencyError(ExportError):
    """The optional export dependencies (torch, onnx, the weights package) are missing."""


class InferenceError(WorkerError):
    """A whole batch failed to run; it reaches the client as ``inference_failed``.

    ``retryable`` says whether running the same inputs again may succeed (a runtime hiccup)
    or is pointless (the inputs themselves cannot be run).
    """

    code = ErrorCode.INFERENCE_FAILED

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

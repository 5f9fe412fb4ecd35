"""Running a batch and reading its results as outcomes; no state, no I/O but the model."""

from __future__ import annotations

from typing import Any

from dlq.router import DeadLetter
from jobstore.records import Outcome
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus
from workers.adapters import LoadedModel
from workers.items import WorkItem


def run_isolating(model: LoadedModel, items: list[WorkItem]) -> list[dict[str, Any] | Exception]:
    """Run a batch; when it fails, split it so one bad item does not fail its neighbours."""
    try:
        results: list[dict[str, Any] | Exception] = list(model.run([i.payload for i in items]))
        if len(results) != len(items):
            raise _ContractBroken(f"model returned {len(results)} results for {len(items)} inputs")
        return results
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        mid = len(items) // 2
        return run_isolating(model, items[:mid]) + run_isolating(model, items[mid:])


# the class names below appear in stored error messages ("_HandlerFailed: ..."): keep them
class _ContractBroken(RuntimeError):
    """The model answered, but not one result per input."""


class _HandlerFailed(RuntimeError):
    retryable = True


def as_retryable(exc: BaseException) -> Exception:
    wrapped = _HandlerFailed(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def outcome_of(item: WorkItem, result: dict[str, Any] | Exception) -> Outcome:
    if isinstance(result, Exception):
        return Outcome(
            job_id=item.record.id,
            attempt=item.record.attempts,
            status=JobStatus.FAILED,
            error_code=ErrorCode.INFERENCE_FAILED.value,
            error_message=_failure_message(item, result),
            retryable=bool(getattr(result, "retryable", False)),
        )
    return Outcome(
        job_id=item.record.id,
        attempt=item.record.attempts,
        status=JobStatus.SUCCEEDED,
        result=result,
    )


def _failure_message(item: WorkItem, error: Exception) -> str:
    message = f"{type(error).__name__}: {error}"[:1000]
    if item.record.attempts > 1:
        message += f" (gave up after {item.record.attempts} attempts)"
    return message


def inference_letter(item: WorkItem, outcome: Outcome) -> DeadLetter:
    return DeadLetter(
        delivery=item.delivery,
        code=outcome.error_code or ErrorCode.INFERENCE_FAILED.value,
        message=outcome.error_message or "",
        job_id=item.record.id,
        model=item.record.model,
        version=item.record.version,
        exception=(outcome.error_message or "").split(":", 1)[0] or None,
        attempts=item.record.attempts,
    )

"""What the job store and the bus can hold: checks shared by the API and the workers.

A value is refused here, before any row exists, when a later step could not store, publish
or serialise it: PostgreSQL text and jsonb cannot hold NUL (U+0000); a lone surrogate
(U+D800..U+DFFF) has no UTF-8 form; NaN and Infinity are not JSON; pydantic stops
serialising a few hundred levels deep. Accepting such a value would leave a row that no
publish, read or listing can get past, on SQLite and PostgreSQL alike, so the rules are the
same on both.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, StringConstraints
from pydantic_core import ErrorDetails, PydanticCustomError

METADATA_MAX_DEPTH = 16
METADATA_MAX_BYTES = 16_384
INPUT_MAX_DEPTH = 32

# NUL and lone surrogates: what neither PostgreSQL nor a UTF-8 encoder can take.
_BAD_CHAR = re.compile(r"[\x00\ud800-\udfff]")
NO_NUL_PATTERN = r"^[^\x00]*$"


class Unstorable(ValueError):
    """A value the store or the bus cannot hold; ``path`` is the dotted field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def text_problem(value: str) -> str | None:
    bad = _BAD_CHAR.search(value)
    if bad is None:
        return None
    if bad.group() == "\x00":
        return "must not contain a NUL character (U+0000)"
    return f"must be valid Unicode (lone surrogate U+{ord(bad.group()):04X})"


def check_text(value: str, path: str) -> None:
    problem = text_problem(value)
    if problem is not None:
        raise Unstorable(path, problem)


def check_json(value: Any, path: str, *, max_depth: int, max_bytes: int | None = None) -> None:
    """Raise Unstorable unless ``value`` is JSON every store and bus can hold.

    Iterative, so a value nested far past ``max_depth`` costs no recursion.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, where)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise Unstorable(where, "must be a finite number (NaN and Infinity are not JSON)")
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise Unstorable(path, f"is nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise Unstorable(where, "object keys must be strings")
                    problem = text_problem(key)
                    if problem is not None:  # the key itself is never echoed back
                        raise Unstorable(where, f"has a key that {problem}")
                    stack.append((child, f"{where}.{key}", depth + 1))
            else:
                stack.extend((child, f"{where}.{i}", depth + 1) for i, child in enumerate(item))
        elif not (item is None or isinstance(item, bool | int)):
            raise Unstorable(where, f"is not a JSON value ({type(item).__name__})")
    if max_bytes is not None:
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
        if size > max_bytes:
            raise Unstorable(path, f"is {size} bytes as JSON; at most {max_bytes} are kept")


def pydantic_error(exc: Unstorable) -> PydanticCustomError:
    """For a field validator: the message, and the exact path in ``ctx["path"]``."""
    return PydanticCustomError(
        "unstorable", "{message}", {"message": exc.message, "path": exc.path}
    )


def error_field(err: ErrorDetails, default: str) -> str:
    """The dotted field of a validation error: an Unstorable's own path when it has one."""
    ctx = err.get("ctx") or {}
    path = ctx.get("path")
    return path if isinstance(path, str) and path else default


def printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so it can be sent back in a JSON answer."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def not_bool(value: Any) -> Any:
    """For a BeforeValidator: JSON ``true`` is not the number 1 (pydantic's lax mode says it is)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
    return value


def _safe_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("unstorable", "{message}", {"message": problem})
    return value


_DATE_START = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _rfc3339(value: Any) -> Any:
    """Only a date-time string, as documented: pydantic would read ``0.5`` as a timestamp."""
    if isinstance(value, datetime) or (isinstance(value, str) and _DATE_START.match(value)):
        return value
    raise PydanticCustomError("datetime_type", "expected an RFC 3339 date-time")


def _utc(value: datetime) -> datetime:
    """Aware and in UTC (naive means UTC). A valid date that its offset shifts out of the
    calendar (0001-01-01T00:00+01:00) becomes its first or last instant: as a bound on
    stored timestamps it means the same."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        edge = datetime.min if value.year == datetime.min.year else datetime.max
        return edge.replace(tzinfo=UTC)


# A query or path value matched against stored text: no NUL, valid Unicode, bounded.
SafeText = Annotated[
    str, StringConstraints(max_length=256, pattern=NO_NUL_PATTERN), AfterValidator(_safe_text)
]
# A URL matched against stored ones (a webhook endpoint): the same, up to 4096 characters.
SafeUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=4096, pattern=NO_NUL_PATTERN),
    AfterValidator(_safe_text),
]
# A date compared with stored timestamps: representable in UTC.
UtcDateTime = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_utc)]

"""Client-facing errors: a stable code, a status, the offending field; and their handlers."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import Counter
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from jobstore.errors import StoreUnavailable
from producers.responses import FastJSONResponse
from schemas.errors import ApiError, ErrorCode, ErrorDetail, ErrorResponse
from schemas.storable import error_field, printable

log = logging.getLogger(__name__)

# What a database that is down, restarting or out of connections raises: the job store
# wraps its own as StoreUnavailable, its neighbours (outbox, dead letters) raise SQLAlchemy's.
STORE_DOWN: tuple[type[Exception], ...] = (
    StoreUnavailable,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection came free in time
)
STORE_LOG_EVERY_S = 10.0


def store_down(exc: BaseException) -> bool:
    """True for an error that means "the database is unavailable, retry later"."""
    if isinstance(exc, STORE_DOWN):
        return True
    # any driver error that cost the connection (the server went away mid-statement)
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


__all__ = ["ApiError", "error_response", "install_handlers", "store_down"]


def error_response(
    status: int, errors: list[ErrorDetail], headers: dict[str, str] | None = None
) -> FastJSONResponse:
    body = ErrorResponse(error=errors[0], errors=errors if len(errors) > 1 else None)
    return FastJSONResponse(
        body.model_dump(mode="json", exclude_none=True), status, headers=headers
    )


_PYDANTIC_CODES = {
    "missing": ErrorCode.FIELD_MISSING,
    "extra_forbidden": ErrorCode.FIELD_UNKNOWN,
    "json_invalid": ErrorCode.MALFORMED_JSON,
}


NOT_JSON = ErrorDetail(
    code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    message="the body must be JSON, sent with Content-Type: application/json",
    field="Content-Type",
)


def _from_validation(exc: RequestValidationError) -> tuple[int, list[ErrorDetail]]:
    if _not_json(exc):
        return 415, [NOT_JSON]
    return validation_details(exc.errors(), request=True)


def validation_details(
    errors: Sequence[Any], *, request: bool = False
) -> tuple[int, list[ErrorDetail]]:
    """(status, details) of pydantic's errors: 422, or 400 for JSON that does not parse.
    ``request``: the locations start with where in the request (body, query, ...)."""
    details = []
    status = 422
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc and request else "body"
        path = loc[1:] if request and where in ("body", "query", "path", "header") else loc
        code = _PYDANTIC_CODES.get(err.get("type", ""), ErrorCode.FIELD_INVALID)
        if code is ErrorCode.MALFORMED_JSON:
            status = 400
            path = []  # the loc is a character offset, not a field
        field = ".".join(path) if path else ("body" if where == "body" else where)
        # an unknown key may hold a lone surrogate, which no JSON answer can carry
        field = printable(error_field(err, field))
        details.append(ErrorDetail(code=code, message=f"{field}: {err.get('msg')}", field=field))
    return status, details


def _not_json(exc: RequestValidationError) -> bool:
    """A body FastAPI did not parse as JSON: sent as a form (curl -d without -H), as text,
    or with no Content-Type. FastAPI hands such a body on as bytes, which no model takes."""
    return isinstance(exc.body, bytes | bytearray) and any(
        tuple(err.get("loc", ()))[:1] == ("body",) for err in exc.errors()
    )


def store_unavailable_response(retry_after_s: int) -> FastJSONResponse:
    detail = ErrorDetail(
        code=ErrorCode.STORE_UNAVAILABLE,
        message="the job store is unavailable; retry later",
    )
    return error_response(503, [detail], {"Retry-After": str(retry_after_s)})


class _RateLimitedLog:
    """One warning per interval with the count since the last one: an outage under load
    would otherwise log every request."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self._suppressed = 0

    def warn(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        log.warning("%s: %s%s", message, exc, more)
        self._last, self._suppressed = now, 0


def _allowed(request: Request) -> list[str]:
    """Every method this path answers, an included router's routes too. As in OpenAPI,
    concrete paths come before templated ones: ``/v1/dlq/redrive`` is the redrive, not the
    dead letter ``redrive`` of ``/v1/dlq/{entry_id}``."""
    by_params: dict[int, set[str]] = {}
    for route in _flat_routes(request.app.router.routes):
        match, child = route.matches({**request.scope, "method": "\x00", "path_params": {}})
        if match is not Match.NONE:
            methods = by_params.setdefault(len(child.get("path_params", {})), set())
            methods.update(getattr(route, "methods", None) or ())
    return sorted(by_params[min(by_params)]) if by_params else []


def _flat_routes(routes: Sequence[BaseRoute]) -> Iterable[Any]:
    """The routes themselves: newer FastAPI keeps an included router as one route in front
    of its own (``iter_route_contexts`` sees through it), older FastAPI copies them in."""
    expand = getattr(fastapi.routing, "iter_route_contexts", None)
    return expand(routes) if expand is not None else routes


def install_handlers(
    app: FastAPI, *, store_retry_after_s: int = 2, rejected: Counter | None = None
) -> None:
    """Handlers for every error a route can raise: nothing reaches the client as a dropped
    connection or a bare 500 when a dependency is down."""
    store_log = _RateLimitedLog(STORE_LOG_EVERY_S)

    async def api_error(_: Request, exc: Exception) -> FastJSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, [exc.detail], exc.headers)

    async def validation(_: Request, exc: Exception) -> FastJSONResponse:
        assert isinstance(exc, RequestValidationError)
        status, details = _from_validation(exc)
        return error_response(status, details)

    async def http_error(request: Request, exc: Exception) -> FastJSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {
            400: ErrorCode.MALFORMED_JSON,  # FastAPI's "There was an error parsing the body"
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
        }.get(exc.status_code, ErrorCode.FIELD_INVALID)
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:  # Starlette names only the first route's methods
            headers["Allow"] = ", ".join(_allowed(request))
        return error_response(
            exc.status_code,
            [
                ErrorDetail(
                    code=code,
                    message=str(exc.detail),
                    field="body" if code is ErrorCode.MALFORMED_JSON else None,
                )
            ],
            headers or None,
        )

    async def unexpected(_: Request, exc: Exception) -> FastJSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            500, [ErrorDetail(code=ErrorCode.INTERNAL_ERROR, message="internal error")]
        )

    async def store_error(request: Request, exc: Exception) -> FastJSONResponse:
        if not store_down(exc):  # a DBAPIError that is a bug, not an outage
            return await unexpected(request, exc)
        store_log.warn("job store unavailable, answering 503", exc)
        if rejected is not None and request.method == "POST" and request.url.path == "/v1/jobs":
            rejected.labels(ErrorCode.STORE_UNAVAILABLE.value).inc()
        return store_unavailable_response(store_retry_after_s)

    app.add_exception_handler(ApiError, api_error)
    # registered on the base classes: Starlette picks a handler by the exception's MRO
    for kind in (*STORE_DOWN, sa_exc.DBAPIError):
        app.add_exception_handler(kind, store_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)

"""Client-facing errors: a stable code, a status, the offending field; and their handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from schemas.errors import ErrorCode, ErrorDetail, ErrorResponse
from schemas.storable import error_field, printable

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(code=code, message=message, field=field, details=details)
        self.headers = headers


def error_response(
    status: int, errors: list[ErrorDetail], headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=errors[0], errors=errors if len(errors) > 1 else None)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status, headers=headers)


_PYDANTIC_CODES = {
    "missing": ErrorCode.FIELD_MISSING,
    "extra_forbidden": ErrorCode.FIELD_UNKNOWN,
    "json_invalid": ErrorCode.MALFORMED_JSON,
}


def _from_validation(exc: RequestValidationError) -> tuple[int, list[ErrorDetail]]:
    details = []
    status = 422
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc else "body"
        path = loc[1:] if where in ("body", "query", "path", "header") else loc
        code = _PYDANTIC_CODES.get(err.get("type", ""), ErrorCode.FIELD_INVALID)
        if code is ErrorCode.MALFORMED_JSON:
            status = 400
            path = []  # the loc is a character offset, not a field
        field = ".".join(path) if path else ("body" if where == "body" else where)
        # an unknown key may hold a lone surrogate, which no JSON answer can carry
        field = printable(error_field(err, field))
        details.append(ErrorDetail(code=code, message=f"{field}: {err.get('msg')}", field=field))
    return status, details


def _allowed(request: Request) -> list[str]:
    """Every method some route of the app answers on this path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "\x00"})
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, [exc.detail], exc.headers)

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        status, details = _from_validation(exc)
        return error_response(status, details)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
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

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            500, [ErrorDetail(code=ErrorCode.INTERNAL_ERROR, message="internal error")]
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)

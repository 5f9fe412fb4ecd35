"""Request limits: a pure ASGI middleware that refuses bodies over a size limit with 413,
and the shape a job id in a path must have.

The middleware buffers the body (bounded by the limit) before the app sees it, so an
oversized or lying chunked upload never reaches JSON parsing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.dependencies.models import Dependant
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.errors import ApiError
from schemas.errors import ErrorCode
from schemas.jobs import JOB_ID_PATTERN
from schemas.storable import printable

# Every id the API or the bus gives a job matches the pattern; anything else (a NUL, which
# PostgreSQL cannot even compare) is refused with 422 before the store sees it.
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="A job id.")]


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def no_unknown_query(request: Request) -> None:
    """422 ``field_unknown`` for a query parameter the route does not declare, on routes
    that take any: a misspelt filter (``?stauts=queued``) must not silently list everything."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if known and unknown:
        name = printable(unknown[0])
        raise ApiError(
            422,
            ErrorCode.FIELD_UNKNOWN,
            f"unknown query parameter {name!r}; known: {', '.join(sorted(known))}",
            field=name,
        )


class BodySizeLimit:
    """``max_bytes`` for every body, except the paths ``per_path`` gives their own limit
    (the bulk submit carries up to 1,000 requests)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared), limit)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, size, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int, limit: int) -> None:
        payload: dict[str, Any] = {
            "error": {
                "code": ErrorCode.BODY_TOO_LARGE.value,
                "message": f"request body exceeds {limit} bytes",
                "field": "body",
                "details": {"max_bytes": limit, "received_at_least": size},
            }
        }
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

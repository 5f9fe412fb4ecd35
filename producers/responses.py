"""JSON bodies the API renders itself (errors, readiness, the AsyncAPI document) with
orjson, byte for byte what Starlette's JSONResponse would send.

The routes with a response model need nothing: FastAPI writes those with pydantic-core's
own serializer, straight to bytes (FastAPI's ORJSONResponse, now deprecated, would be the
slower path for them). The two encoders differ in a few corners, and there the stdlib one
keeps the answer: floats (orjson writes 1e-05 as 0.00001; NaN as null where Starlette
refuses it), integers beyond 64 bits, keys that are not strings.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_float(v) for v in value)
    return False


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        if not _has_float(content):
            try:
                return orjson.dumps(content)
            except TypeError:  # a big integer, a non-string key, a lone surrogate
                pass
        return super().render(content)

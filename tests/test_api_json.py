"""The API's JSON bodies are byte for byte what they were before orjson rendered them
(issue 10): the bodies the API builds itself (errors, readiness, AsyncAPI) go through
orjson, and must read exactly as Starlette's stdlib rendering would."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.responses import JSONResponse

from producers.responses import FastJSONResponse
from tests.test_api import Api
from tests.test_api import api as api

ODD = 'mödel \u0001\u001f\u007f\u2028\u2029 "quoted" back\\slash </script> 😀'


def _stdlib(body: bytes) -> bytes:
    return bytes(JSONResponse(json.loads(body)).body)


async def test_error_bodies_read_as_the_stdlib_would_write_them(api: Api) -> None:
    answers = [
        await api.submit({"model": ODD, "input": {"text": "x"}}),
        await api.submit({"model": "minilm", "input": {"text": ODD, ODD: 1}}),
        await api.submit({"model": "minilm", "input": {"text": "x"}, "priority": 10**30}),
        await api.client.post(
            "/v1/jobs",
            content=b'{"model": "minilm", "input": ',
            headers={"content-type": "application/json"},
        ),
        await api.client.get(f"/v1/jobs/{'x' * 20}"),
        await api.client.get("/v1/jobs", params={"status": ODD}),
    ]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.content == _stdlib(r.content), r.content


async def test_readiness_and_asyncapi_bodies_unchanged(api: Api) -> None:
    for path in ("/readyz", "/asyncapi.json"):
        r = await api.client.get(path)
        assert r.content == _stdlib(r.content), r.content


@pytest.mark.parametrize(
    "content",
    [
        {"a": 1e-05, "b": [0.1, 1e16, -0.0]},  # orjson writes 1e-05 as 0.00001
        {"big": 2**70, "small": -(2**63)},  # beyond 64 bits: orjson refuses
        {1: "int key", "k": None},  # orjson refuses non-string keys
        {"text": ODD, "nested": [{"x": True}, [], {}]},
    ],
)
def test_fast_response_renders_what_starlette_renders(content: object) -> None:
    assert FastJSONResponse(content).body == JSONResponse(content).body


def test_fast_response_refuses_what_starlette_refuses() -> None:
    for bad in ({"x": math.nan}, {"x": math.inf}):
        with pytest.raises(ValueError):
            JSONResponse(bad)
        with pytest.raises(ValueError):
            FastJSONResponse(bad)
    with pytest.raises(UnicodeEncodeError):
        JSONResponse({"x": "\ud800"})
    with pytest.raises(UnicodeEncodeError):
        FastJSONResponse({"x": "\ud800"})

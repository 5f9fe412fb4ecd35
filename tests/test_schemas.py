"""The wire contracts: exported JSON Schemas stay in sync; envelopes decode in both modes."""

from __future__ import annotations

import json

import pytest

from schemas.envelope import EnvelopeError, decode_message, new_envelope
from schemas.errors import ErrorCode
from schemas.export import JSON_DIR, render
from schemas.jobs import JobRequest


def test_exported_json_schemas_match_the_models() -> None:
    rendered = render()
    on_disk = {p.name: p.read_text() for p in JSON_DIR.glob("*.json")}
    assert set(on_disk) == set(rendered), "run `make schemas`"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name} drifted from the models: run `make schemas`"


def test_binary_and_structured_modes_decode_to_the_same_envelope() -> None:
    env = new_envelope("job-1", JobRequest(model="minilm", input={"text": "hi"}), "urn:t")
    headers, value = env.to_binary()
    from_binary = decode_message(dict(headers), value)
    from_structured = decode_message(
        {"content-type": b"application/cloudevents+json"}, env.to_structured()
    )
    assert from_binary.id == from_structured.id == "job-1"
    assert from_binary.data == from_structured.data == env.data
    assert from_binary.source == "urn:t"


def test_extension_attributes_pass_through() -> None:
    doc = {
        "specversion": "1.0",
        "id": "x1",
        "source": "s",
        "type": "inferq.job.requested",
        "traceparent": "00-abc",
        "data": {"model": "m", "input": {}},
    }
    env = decode_message({}, json.dumps(doc).encode())
    assert env.model_extra == {"traceparent": "00-abc"}


@pytest.mark.parametrize(
    ("headers", "value", "code", "field"),
    [
        ({}, b"{", ErrorCode.MALFORMED_MESSAGE, None),
        ({}, None, ErrorCode.MALFORMED_MESSAGE, None),
        ({}, b'"a string"', ErrorCode.INVALID_ENVELOPE, None),
        (
            {},
            json.dumps(
                {"id": "a", "source": "s", "type": "inferq.job.requested", "data": {}}
            ).encode(),
            ErrorCode.INVALID_ENVELOPE,
            "specversion",
        ),
        (
            {},
            json.dumps({"specversion": "1.0", "id": "a", "source": "s", "data": {}}).encode(),
            ErrorCode.INVALID_ENVELOPE,
            "type",
        ),
        (
            {},
            json.dumps(
                {
                    "specversion": "2.0",
                    "id": "a",
                    "source": "s",
                    "type": "inferq.job.requested",
                    "data": {"model": "m", "input": {}},
                }
            ).encode(),
            ErrorCode.INVALID_ENVELOPE,
            "specversion",
        ),
        (
            {"ce_specversion": b"1.0", "ce_source": b"s", "ce_type": b"inferq.job.requested"},
            b"{}",
            ErrorCode.INVALID_ENVELOPE,
            "ce_id",
        ),
        (
            {
                "ce_specversion": b"1.0",
                "ce_id": b"a",
                "ce_source": b"s",
                "ce_type": b"inferq.job.requested",
            },
            b'{"model": "m"}',
            ErrorCode.INVALID_INPUT,
            "input",
        ),
        (
            {
                "ce_specversion": b"1.0",
                "ce_id": b"\xff",
                "ce_source": b"s",
                "ce_type": b"inferq.job.requested",
            },
            b"{}",
            ErrorCode.MALFORMED_MESSAGE,
            None,
        ),
    ],
)
def test_bad_messages_raise_with_code_and_field(
    headers: dict[str, bytes], value: bytes | None, code: ErrorCode, field: str | None
) -> None:
    with pytest.raises(EnvelopeError) as info:
        decode_message(headers, value)
    assert info.value.code == code
    assert info.value.field == field
    assert info.value.message

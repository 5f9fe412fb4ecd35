"""How the transport-neutral (value, key, headers) of a message maps onto an SQS message.

SQS bodies are text (a subset of Unicode, at least one character) and a message carries at
most 10 attributes, each with a non-empty value and a restricted name. The mapping is exact
both ways:

- a body that is non-empty UTF-8 without characters SQS refuses travels as it is; anything
  else travels base64-encoded, marked by the ``inferq-body-encoding`` attribute;
- the key travels as the Binary attribute ``inferq-key``;
- each header becomes a String attribute (Binary if it is not UTF-8); headers that cannot be
  attributes (empty value, a name SQS refuses, or past the 10-attribute limit) are packed
  together, base64-valued, into the JSON String attribute ``inferq-headers``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from transports.base import Headers

MAX_ATTRIBUTES = 10
KEY_ATTRIBUTE = "inferq-key"
PACKED_ATTRIBUTE = "inferq-headers"
ENCODING_ATTRIBUTE = "inferq-body-encoding"
_RESERVED = {KEY_ATTRIBUTE, PACKED_ATTRIBUTE, ENCODING_ATTRIBUTE}
_NAME = re.compile(
    r"^(?!aws\.|amazon\.)(?!.*\.\.)[A-Za-z0-9_\-](?:[A-Za-z0-9_\-.]{0,254}[A-Za-z0-9_\-])?$", re.I
)
# characters SQS accepts in a body or a String value (XML 1.0 characters)
_TEXT = re.compile(r"^[\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]+$")


def _as_text(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if _TEXT.match(text) else None


def encode(
    value: bytes, key: bytes | None, headers: Headers
) -> tuple[str, dict[str, dict[str, Any]]]:
    """(MessageBody, MessageAttributes) for one message."""
    attributes: dict[str, dict[str, Any]] = {}
    body = _as_text(value)
    if body is None:
        body = base64.b64encode(value).decode() or "="
        attributes[ENCODING_ATTRIBUTE] = {"DataType": "String", "StringValue": "base64"}
    if key:
        attributes[KEY_ATTRIBUTE] = {"DataType": "Binary", "BinaryValue": key}
    packed: dict[str, str] = {}
    for name, raw in headers:
        room = len(attributes) < MAX_ATTRIBUTES - 1  # one slot stays for the packed ones
        if not raw or name in _RESERVED or not _NAME.match(name) or not room:
            packed[name] = base64.b64encode(raw).decode()
            continue
        text = _as_text(raw)
        if text is not None:
            attributes[name] = {"DataType": "String", "StringValue": text}
        else:
            attributes[name] = {"DataType": "Binary", "BinaryValue": raw}
    if packed:
        attributes[PACKED_ATTRIBUTE] = {"DataType": "String", "StringValue": json.dumps(packed)}
    return body, attributes


def decode(
    body: str, attributes: Mapping[str, Mapping[str, Any]]
) -> tuple[bytes, bytes | None, dict[str, bytes]]:
    """(value, key, headers) of a received message; plain messages from any sender decode too."""
    headers: dict[str, bytes] = {}
    key: bytes | None = None
    encoding: str | None = None
    for name, attr in attributes.items():
        raw = _attribute_bytes(attr)
        if name == KEY_ATTRIBUTE:
            key = raw
        elif name == ENCODING_ATTRIBUTE:
            encoding = raw.decode("utf-8", "replace")
        elif name == PACKED_ATTRIBUTE:
            try:
                packed = json.loads(raw)
                headers.update({k: base64.b64decode(v) for k, v in packed.items()})
            except (ValueError, AttributeError, TypeError):
                headers[name] = raw  # not ours after all: keep it as it came
        else:
            headers[name] = raw
    if encoding == "base64":
        value = base64.b64decode(body) if body != "=" else b""
    else:
        value = body.encode("utf-8")
    return value, key, headers


def _attribute_bytes(attr: Mapping[str, Any]) -> bytes:
    if "BinaryValue" in attr:
        raw = attr["BinaryValue"]
        return bytes(raw)
    return str(attr.get("StringValue", "")).encode("utf-8")

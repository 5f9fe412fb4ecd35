"""Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

The signed content is ``{id}.{timestamp}.{body}``; each active secret (``whsec_`` + base64 of
the key) adds one ``v1,<base64 HMAC-SHA256>`` to the space-separated signature header, so a
receiver holding either the old or the new secret verifies during a rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SECRET_PREFIX = "whsec_"
_KEY_BYTES = 32


class SecretError(ValueError):
    """A webhook secret that is not ``whsec_`` followed by base64."""


class SignatureError(ValueError):
    """A delivery whose signature, id or timestamp does not verify."""


@dataclass(frozen=True)
class WebhookSigner:
    keys: tuple[bytes, ...]

    @classmethod
    def from_secrets(cls, values: Sequence[str]) -> WebhookSigner:
        keys = tuple(decode_secret(v) for v in values)
        if not keys:
            raise SecretError("at least one webhook secret is needed")
        return cls(keys)

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        content = f"{msg_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
            for key in self.keys
        )

    def verify(
        self,
        body: bytes,
        headers: dict[str, str],
        *,
        tolerance_s: float = 300.0,
        now: float | None = None,
    ) -> None:
        """The receiving side: raise SignatureError unless one ``v1`` signature matches one of
        the keys and the timestamp is within ``tolerance_s`` (replay protection)."""
        try:
            msg_id = headers["webhook-id"]
            timestamp = int(headers["webhook-timestamp"])
            offered = headers["webhook-signature"].split()
        except (KeyError, ValueError) as exc:
            raise SignatureError(f"missing or malformed webhook header: {exc}") from exc
        current = time.time() if now is None else now
        if abs(current - timestamp) > tolerance_s:
            raise SignatureError("webhook-timestamp is outside the tolerance")
        expected = self.signature(msg_id, timestamp, body).split()
        if not any(hmac.compare_digest(o, e) for o in offered for e in expected):
            raise SignatureError("no signature matches")

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(msg_id, timestamp, body),
        }


def decode_secret(value: str) -> bytes:
    raw = value.strip()
    raw = raw.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecretError("a webhook secret is 'whsec_' followed by base64") from exc
    if len(key) < 16:
        raise SecretError("a webhook secret needs at least 16 bytes of key")
    return key


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()


def parse_secrets(value: str) -> list[str]:
    """``INFERQ_WEBHOOK_SECRET``: one secret, or several comma-separated during a rotation."""
    found = [part.strip() for part in value.split(",") if part.strip()]
    for item in found:
        decode_secret(item)
    return found


def load_or_create_secret(path: Path) -> str:
    """The secret kept in ``path``, generated there (mode 0600) the first time."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = generate_secret()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    try:
        os.link(tmp, path)  # first writer wins; a concurrent starter reads the winner's
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()

"""The package's webhook receiver, verifying with the Standard Webhooks library instead of our
own signer: a test must not trust inferq to check inferq's signatures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook

from webhooks.receiver import Received, closed_port
from webhooks.receiver import Receiver as _Receiver

__all__ = ["Received", "Receiver", "closed_port", "receiver"]


@dataclass
class Receiver(_Receiver):
    def __post_init__(self) -> None:
        if self.verifier is None:
            self.verifier = Webhook(self.secret).verify


@contextmanager
def receiver(secret: str, mode: str = "ok") -> Iterator[Receiver]:
    r = Receiver(secret, mode=mode)
    r.start()
    try:
        yield r
    finally:
        r.stop()

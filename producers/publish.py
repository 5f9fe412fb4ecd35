"""Publishing a job: retried with backoff and jitter, bounded in time, acknowledged by the
broker before the API answers 202."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from schemas.envelope import JobEnvelope
from transports.base import Publisher, TransportError
from transports.transport import Encoded, encode_event

log = logging.getLogger(__name__)


class PublishUnavailable(Exception):
    """The broker did not acknowledge the job within the retry budget."""


class JobPublisher:
    # Called once for each retry as it starts (the API's is a counter's ``inc``): counted
    # here, where it happens, so concurrent publishes never count each other's retries.
    on_retry: Callable[[], object] | None = None

    def __init__(
        self,
        publisher: Publisher,
        topic: str,
        *,
        attempts: int = 4,
        timeout_s: float = 10.0,
        encode: Callable[[JobEnvelope], Encoded] | None = None,
    ) -> None:
        self.publisher = publisher
        # the transport's CloudEvents mode (binary headers, or the event as the body)
        self.encode = encode or _binary
        self.topic = topic
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.retries = 0

    async def publish(self, envelope: JobEnvelope) -> None:
        value, headers = self.encode(envelope)
        per_try = max(self.timeout_s / self.attempts, 0.5)
        key = envelope.id.encode()

        async def once() -> None:
            await asyncio.wait_for(
                self.publisher.publish(self.topic, value, key=key, headers=headers), per_try
            )

        started = time.monotonic()
        try:  # the first try without the retry machinery: it is what nearly every call needs
            await once()
            return
        except (TransportError, TimeoutError) as exc:
            if self.attempts <= 1:
                raise self._unavailable(envelope, exc) from exc
        backoff = wait_exponential_jitter(multiplier=0.05, max=1.0)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts - 1)
            | stop_after_delay(max(self.timeout_s - (time.monotonic() - started), 0.0)),
            wait=backoff,
            retry=retry_if_exception_type((TransportError, TimeoutError)),
            reraise=True,
        )
        try:
            # the backoff after that first failure, as tenacity would have waited it
            await asyncio.sleep(backoff(RetryCallState(retrying, None, (), {})))
            async for attempt in retrying:
                with attempt:
                    self.retries += 1
                    if self.on_retry is not None:
                        self.on_retry()
                    await once()
        except (TransportError, TimeoutError) as exc:
            raise self._unavailable(envelope, exc) from exc

    @staticmethod
    def _unavailable(envelope: JobEnvelope, exc: Exception) -> PublishUnavailable:
        log.error("publish of job %s failed: %r", envelope.id, exc)
        return PublishUnavailable(str(exc) or type(exc).__name__)


def _binary(envelope: JobEnvelope) -> Encoded:
    return encode_event(envelope, structured=False)

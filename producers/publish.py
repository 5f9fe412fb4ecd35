"""Publishing a job: retried with backoff and jitter, bounded in time, acknowledged by the
broker before the API answers 202."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tenacity import (
    AsyncRetrying,
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
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.timeout_s),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
            retry=retry_if_exception_type((TransportError, TimeoutError)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.retries += 1
                        if self.on_retry is not None:
                            self.on_retry()
                    await asyncio.wait_for(
                        self.publisher.publish(
                            self.topic, value, key=envelope.id.encode(), headers=headers
                        ),
                        per_try,
                    )
        except (TransportError, TimeoutError) as exc:
            log.error("publish of job %s failed: %r", envelope.id, exc)
            raise PublishUnavailable(str(exc) or type(exc).__name__) from exc


def _binary(envelope: JobEnvelope) -> Encoded:
    return encode_event(envelope, structured=False)

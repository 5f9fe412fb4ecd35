"""The API's job publisher: one try when the broker answers, then retries with backoff, all
within the attempts and the time it is given."""

from __future__ import annotations

import time

import pytest

from producers.publish import JobPublisher, PublishUnavailable
from schemas.envelope import new_envelope
from schemas.jobs import JobRequest
from transports.base import Headers, PublishError
from transports.memory import MemoryBroker, MemoryPublisher

ENVELOPE = new_envelope("j1", JobRequest(model="identity", input={"tensor": [1.0]}), "urn:t")


class Failing(MemoryPublisher):
    def __init__(self, broker: MemoryBroker, failures: int) -> None:
        super().__init__(broker)
        self.failures = failures
        self.calls = 0

    async def publish(
        self, destination: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise PublishError(f"lost try {self.calls}")
        await super().publish(destination, value, key=key, headers=headers)


async def test_a_first_try_that_works_is_the_only_one() -> None:
    broker = MemoryBroker()
    inner = Failing(broker, 0)
    publisher = JobPublisher(inner, "jobs", attempts=4)
    await publisher.publish(ENVELOPE)
    assert inner.calls == 1 and publisher.retries == 0
    assert len(broker.messages("jobs")) == 1


async def test_lost_tries_are_retried_and_counted_each_once() -> None:
    broker = MemoryBroker()
    inner = Failing(broker, 2)
    counted: list[int] = []
    publisher = JobPublisher(inner, "jobs", attempts=4)
    publisher.on_retry = lambda: counted.append(1)
    await publisher.publish(ENVELOPE)
    assert inner.calls == 3 and publisher.retries == 2 and len(counted) == 2
    assert len(broker.messages("jobs")) == 1


async def test_it_gives_up_after_its_attempts_with_publish_unavailable() -> None:
    inner = Failing(MemoryBroker(), 100)
    publisher = JobPublisher(inner, "jobs", attempts=3, timeout_s=30)
    with pytest.raises(PublishUnavailable, match="lost try 3"):
        await publisher.publish(ENVELOPE)
    assert inner.calls == 3 and publisher.retries == 2


async def test_it_gives_up_when_its_time_is_spent() -> None:
    inner = Failing(MemoryBroker(), 100)
    publisher = JobPublisher(inner, "jobs", attempts=1000, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(PublishUnavailable):
        await publisher.publish(ENVELOPE)
    assert time.monotonic() - started < 3.0  # the backoff is up to a second past the budget
    assert 1 < inner.calls < 1000

"""Transport behaviour, written once and run against every transport that implements the ports.

The in-memory twin must behave like Kafka wherever the workers rely on it: a group resumes
from its committed offset, commits cover only the contiguous acked prefix, lag counts what
the group has not committed. Messages that must keep their order share a key, so that on a
multi-partition Kafka topic they land on one partition.

SQS differs where the kit says so: no consumer groups (every consumer competes for one
queue), no order on a standard queue, and each acknowledged message is deleted on its own
rather than as a contiguous prefix. Everything else is the same test.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from tests.fixtures_servers import (
    ExternalKafka,
    unique_queue_name,
    unique_topic_name,
)
from transports.base import (
    Consumer,
    Delivery,
    DepthProbe,
    Publisher,
    PublishError,
    QueueDepth,
    TransportError,
)
from transports.kafka import (
    EmbeddedKafka,
    KafkaConfig,
    KafkaConsumer,
    KafkaDepth,
    KafkaPublisher,
    KafkaTransport,
    Outgoing,
    ensure_topics,
)
from transports.local_process import free_port
from transports.memory import MemoryTransport
from transports.sqs import SqsConfig, SqsTransport, delete_queues
from transports.transport import Transport

KEY = b"one-partition"  # messages whose order a test relies on share this key
CLIENT = "inferq-test"

RawPublish = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Bound:
    """A transport object on a fresh jobs destination, with what the suite needs beside it."""

    transport: Transport
    # a plain client of the bus, not ours: what another service would publish with
    raw_publish: RawPublish
    position: str  # what Delivery.position looks like
    cleanup: Callable[[], Awaitable[None]] | None = None


def _memory(request: pytest.FixtureRequest) -> Bound:
    transport = MemoryTransport(topic=unique_topic_name(request))
    broker = transport.broker

    async def raw(destination: str, value: bytes) -> None:
        broker.topic(destination).messages.append((None, value, {}))
        broker.topic(destination).arrived.set()

    return Bound(transport, raw, r"\d+@\d+")


def _kafka(request: pytest.FixtureRequest) -> Bound:
    config: KafkaConfig = request.getfixturevalue("kafka_config")
    transport = KafkaTransport(config, topic=unique_topic_name(request), partitions=3)

    async def raw(destination: str, value: bytes) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(destination, value)
        finally:
            await producer.stop()

    return Bound(transport, raw, r"\d+@\d+")


def _sqs(request: pytest.FixtureRequest) -> Bound:
    config: SqsConfig = request.getfixturevalue("sqs_config")
    transport = SqsTransport(config, queue=unique_queue_name(request))

    def send(destination: str, value: bytes) -> None:
        sqs = boto3.client("sqs", endpoint_url=config.endpoint_url)
        url = sqs.get_queue_url(QueueName=destination)["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody=value.decode())
        sqs.close()

    async def raw(destination: str, value: bytes) -> None:
        await asyncio.to_thread(send, destination, value)

    async def cleanup() -> None:  # moto scans whole queues: keep them few
        await delete_queues(config, [transport.jobs, transport.dead_letters])

    return Bound(transport, raw, r"[0-9a-f-]{36}", cleanup)


# Every transport the suite runs against: a new one is one line here. Each entry builds its
# transport object on fresh destinations (resolved synchronously, so that memory runs never
# start a broker); the tests see only the Transport and its capabilities.
TRANSPORTS = [
    pytest.param(_memory, id="memory"),
    pytest.param(_kafka, id="kafka", marks=pytest.mark.kafka),
    pytest.param(_sqs, id="sqs", marks=pytest.mark.sqs),
]


@dataclass
class TransportKit:
    """One transport, one fresh topic, and factories that clean up after the test."""

    bound: Bound
    _started: list[Publisher | Consumer] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.bound.transport.name

    @property
    def topic(self) -> str:
        return self.bound.transport.jobs

    @property
    def groups(self) -> bool:
        """Consumer groups with their own positions (Kafka, memory)."""
        return self.bound.transport.capabilities.consumer_groups

    @property
    def ordered(self) -> bool:
        """One key keeps its order."""
        return self.bound.transport.capabilities.ordered_partitions

    @property
    def contiguous_commits(self) -> bool:
        """False: each acked message is deleted on its own (SQS)."""
        return self.bound.transport.capabilities.contiguous_commits

    @property
    def position(self) -> str:
        return self.bound.position

    async def raw_publish(self, destination: str, value: bytes) -> None:
        await self.bound.raw_publish(destination, value)

    def order(self, items: list[bytes | None]) -> list[bytes | None]:
        """Items as the test may compare them: in order where the transport keeps it."""
        return list(items) if self.ordered else sorted(items, key=lambda v: v or b"")

    async def publisher(self) -> Publisher:
        publisher = self.bound.transport.publisher(CLIENT)
        await publisher.start()
        self._started.append(publisher)
        return publisher

    async def consumer(self, group: str, topic: str | None = None) -> Consumer:
        consumer = self.bound.transport.consumer(CLIENT, source=topic, group=group)
        await consumer.start()
        self._started.append(consumer)
        return consumer

    def depth(self, group: str, topic: str | None = None) -> DepthProbe:
        return self.bound.transport.depth(CLIENT, source=topic, group=group)

    async def close(self) -> None:
        for client in reversed(self._started):
            await client.stop()


@pytest.fixture(params=TRANSPORTS)
def bound_transport(request: pytest.FixtureRequest) -> Bound:
    build: Callable[[pytest.FixtureRequest], Bound] = request.param
    return build(request)


@pytest_asyncio.fixture
async def transport(bound_transport: Bound) -> AsyncIterator[TransportKit]:
    await bound_transport.transport.prepare()  # the jobs and dead-letter destinations
    kit = TransportKit(bound_transport)
    try:
        yield kit
    finally:
        await kit.close()
        if bound_transport.cleanup is not None:
            await bound_transport.cleanup()


def _group() -> str:
    return f"group-{uuid.uuid4().hex[:8]}"


async def drain(consumer: Consumer, count: int, within_s: float = 15.0) -> list[Delivery]:
    """Fetch until ``count`` messages arrived (or the time is up; the caller asserts)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.fetch(count - len(got), 0.25)
    return got


async def assert_nothing_more(
    transport: TransportKit, consumer: Consumer, *, holding: int = 0
) -> None:
    """``consumer`` is owed nothing more of what is on the bus now, beyond the ``holding``
    deliveries it has fetched and not acknowledged.

    Proved at a known point rather than by waiting out a quiet window. Where one key keeps
    its order, a sentinel published now on that key (the tests' messages share it) is
    fetched after anything still owed, so whatever arrives before it is what was owed. SQS
    keeps no order; there the queue's depth (visible + in flight + delayed) must come to
    exactly what ``consumer`` holds."""
    if not transport.ordered:
        depth = await eventually_depth(transport.depth(_group()), holding)
        assert depth.backlog == holding, (
            f"{depth.backlog - holding} more message(s) on the queue than the {holding} held: "
            f"{depth.partitions}"
        )
        return
    await assert_nothing_before_a_sentinel(await transport.publisher(), transport.topic, consumer)


async def assert_nothing_before_a_sentinel(
    publisher: Publisher, topic: str, consumer: Consumer, within_s: float = 30.0
) -> None:
    """Publish a sentinel on the tests' key and fetch until it arrives: nothing else may."""
    sentinel = f"sentinel-{uuid.uuid4().hex[:8]}".encode()
    await publisher.publish(topic, sentinel, key=KEY)
    got: list[Delivery] = []
    deadline = time.monotonic() + within_s
    while sentinel not in values(got):
        assert time.monotonic() < deadline, (
            f"the sentinel did not arrive within {within_s}s; fetched meanwhile: {values(got)}"
        )
        got += await consumer.fetch(100, 0.25)
    owed = [d for d in got if d.value != sentinel]
    assert owed == [], f"delivered again: {values(owed)}"


async def publish_values(publisher: Publisher, topic: str, values: list[bytes]) -> None:
    for value in values:
        await publisher.publish(topic, value, key=KEY)


def values(deliveries: list[Delivery]) -> list[bytes | None]:
    return [d.value for d in deliveries]


async def eventually_depth(probe: DepthProbe, expected: int, within_s: float = 10.0) -> QueueDepth:
    depth = await probe.depth()
    deadline = time.monotonic() + within_s
    while depth.backlog != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        depth = await probe.depth()
    return depth


# --- the shared behaviour --------------------------------------------------------------------


async def test_publish_then_fetch_returns_value_key_and_headers(transport: TransportKit) -> None:
    publisher = await transport.publisher()
    consumer = await transport.consumer(_group())
    headers = [("ce_type", b"inferq.job.requested"), ("ce_id", b"job-1")]
    await publisher.publish(transport.topic, b'{"x": 1}', key=b"job-1", headers=headers)

    [delivery] = await drain(consumer, 1)

    assert delivery.value == b'{"x": 1}'
    assert delivery.key == b"job-1"
    assert dict(delivery.headers) == dict(headers)
    assert delivery.source == transport.topic
    assert re.fullmatch(transport.position, delivery.position)
    assert delivery.receive_count == 1


async def test_message_without_key_or_headers(transport: TransportKit) -> None:
    publisher = await transport.publisher()
    consumer = await transport.consumer(_group())
    await publisher.publish(transport.topic, b"bare")

    [delivery] = await drain(consumer, 1)

    assert (delivery.value, delivery.key, dict(delivery.headers)) == (b"bare", None, {})


async def test_uncommitted_messages_go_to_the_next_consumer_of_the_group(
    transport: TransportKit,
) -> None:
    group = _group()
    publisher = await transport.publisher()
    await publish_values(publisher, transport.topic, [b"a", b"b", b"c"])
    crashed = await transport.consumer(group)
    first = await drain(crashed, 3)
    assert values(first) == [b"a", b"b", b"c"]
    for delivery in first:
        crashed.ack(delivery)  # acked but never committed: not durable
    await crashed.stop()

    successor = await transport.consumer(group)
    again = await drain(successor, 3)

    assert transport.order(values(again)) == [b"a", b"b", b"c"]


async def test_committed_messages_are_not_delivered_again(transport: TransportKit) -> None:
    group = _group()
    publisher = await transport.publisher()
    await publish_values(publisher, transport.topic, [b"a", b"b", b"c"])
    consumer = await transport.consumer(group)
    for delivery in await drain(consumer, 3):
        consumer.ack(delivery)
    await consumer.commit()
    await consumer.stop()

    successor = await transport.consumer(group)
    await assert_nothing_more(transport, successor)
    if transport.groups:
        # the commit belongs to the group: another group still reads everything
        other = await transport.consumer(_group())
        assert values(await drain(other, 3)) == [b"a", b"b", b"c"]
    # and what arrives after the commit goes to the group's next member
    await publisher.publish(transport.topic, b"d", key=KEY)
    assert values(await drain(successor, 1)) == [b"d"]


async def test_commit_with_nothing_acked_is_a_no_op(transport: TransportKit) -> None:
    group = _group()
    publisher = await transport.publisher()
    await publish_values(publisher, transport.topic, [b"a"])
    consumer = await transport.consumer(group)
    await consumer.commit()  # nothing fetched yet
    assert len(await drain(consumer, 1)) == 1
    await consumer.commit()  # fetched, not acked
    await consumer.stop()

    successor = await transport.consumer(group)
    assert values(await drain(successor, 1)) == [b"a"]


@pytest.mark.parametrize(
    ("count", "acked", "redelivered"),
    [
        (3, [1, 2], [0, 1, 2]),  # the later ones done, the first not: nothing committable
        (4, [0, 2, 3], [1, 2, 3]),  # a gap at 1: the commit stops there
        (4, [3, 0, 1], [2, 3]),
    ],
    ids=["later-two-of-three", "gap-at-second", "gap-at-third"],
)
async def test_out_of_order_acks_commit_only_the_contiguous_prefix(
    transport: TransportKit, count: int, acked: list[int], redelivered: list[int]
) -> None:
    group = _group()
    sent = [f"m{i}".encode() for i in range(count)]
    publisher = await transport.publisher()
    await publish_values(publisher, transport.topic, sent)
    consumer = await transport.consumer(group)
    got = await drain(consumer, count)
    assert transport.order(values(got)) == sent
    got.sort(key=lambda d: d.value or b"")
    for i in acked:
        consumer.ack(got[i])
    await consumer.commit()
    await consumer.stop()
    if not transport.contiguous_commits:  # every acked message was deleted on its own
        redelivered = [i for i in range(count) if i not in acked]

    successor = await transport.consumer(group)
    again = await drain(successor, len(redelivered))

    assert transport.order(values(again)) == [sent[i] for i in redelivered]
    await assert_nothing_more(transport, successor, holding=len(again))


async def test_depth_falls_from_backlog_to_zero_as_work_is_committed(
    transport: TransportKit,
) -> None:
    group = _group()
    probe = transport.depth(group)
    assert (await probe.depth()).backlog == 0

    publisher = await transport.publisher()
    await publish_values(publisher, transport.topic, [f"m{i}".encode() for i in range(6)])
    await publisher.publish(transport.topic, b"unkeyed")  # any partition
    depth = await eventually_depth(probe, 7)
    assert depth.backlog == 7  # a group that never committed owes everything
    assert depth.source == transport.topic
    assert sum(depth.partitions.values()) == depth.backlog

    consumer = await transport.consumer(group)
    got = await drain(consumer, 7)
    assert len(got) == 7
    assert (await probe.depth()).backlog == 7  # fetched is not done

    ordered = [d for d in got if d.key == KEY]
    for delivery in ordered[:2]:
        consumer.ack(delivery)
    await consumer.commit()
    assert (await eventually_depth(probe, 5)).backlog == 5

    for delivery in [*ordered[2:], *(d for d in got if d.key != KEY)]:
        consumer.ack(delivery)
    await consumer.commit()
    depth = await eventually_depth(probe, 0)
    assert depth.backlog == 0
    assert set(depth.partitions.values()) <= {0}
    if transport.groups:
        # lag is per group: a group that never read owes all of it
        assert (await transport.depth(_group()).depth()).backlog == 7


async def test_empty_fetch_returns_nothing_within_its_timeout(transport: TransportKit) -> None:
    consumer = await transport.consumer(_group())
    started = time.monotonic()
    assert await consumer.fetch(10, 0.3) == []
    elapsed = time.monotonic() - started
    assert elapsed < 2.0


async def test_fetch_waits_for_a_message_that_arrives_meanwhile(transport: TransportKit) -> None:
    consumer = await transport.consumer(_group())
    publisher = await transport.publisher()

    async def late() -> None:
        await asyncio.sleep(0.2)
        await publisher.publish(transport.topic, b"late", key=KEY)

    task = asyncio.create_task(late())
    started = time.monotonic()
    got = await consumer.fetch(10, 5.0)  # one call: it returns once something arrives
    elapsed = time.monotonic() - started
    await task
    assert values(got) == [b"late"]
    assert elapsed < 4.0


async def test_fetch_respects_max_records(transport: TransportKit) -> None:
    publisher = await transport.publisher()
    await publish_values(publisher, transport.topic, [f"m{i}".encode() for i in range(5)])
    consumer = await transport.consumer(_group())
    got: list[Delivery] = []
    deadline = time.monotonic() + 15
    while len(got) < 5 and time.monotonic() < deadline:
        batch = await consumer.fetch(2, 0.25)
        assert len(batch) <= 2
        got += batch
    assert transport.order(values(got)) == [f"m{i}".encode() for i in range(5)]


async def test_a_plain_client_of_the_bus_publishes_what_the_consumer_reads(
    transport: TransportKit,
) -> None:
    """Direct publishing: another service's own client, none of our code on its side."""
    consumer = await transport.consumer(_group())
    event = b'{"specversion": "1.0", "id": "direct-1", "type": "inferq.job.requested"}'
    await transport.raw_publish(transport.topic, event)

    [delivery] = await drain(consumer, 1)

    assert delivery.value == event
    assert (delivery.key, dict(delivery.headers), delivery.receive_count) == (None, {}, 1)


# --- Kafka only ---------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_kafka_publish_many_is_acked_and_consumable(
    kafka_config: KafkaConfig, topic: str
) -> None:
    items = [Outgoing(b"m0", b"k0", [("i", b"0")])]  # with key and headers
    items += [Outgoing(f"m{i}".encode()) for i in range(1, 200)]
    async with KafkaPublisher(kafka_config) as publisher:
        assert await publisher.publish_many(topic, items) == 200
    async with KafkaConsumer(kafka_config, topic, _group()) as consumer:
        got = await drain(consumer, 200)
        assert sorted(v or b"" for v in values(got)) == sorted(item.value or b"" for item in items)
        [m0] = [d for d in got if d.value == b"m0"]
        assert (m0.key, dict(m0.headers)) == (b"k0", {"i": b"0"})
    async with KafkaDepth(kafka_config, topic, _group()) as probe:
        depth = await probe.depth()
    assert depth.backlog == 200
    assert set(depth.partitions) == {"0", "1", "2"}


@pytest.mark.kafka
async def test_kafka_ensure_topics_is_idempotent(kafka_config: KafkaConfig, topic: str) -> None:
    await ensure_topics(kafka_config, {topic: 3})
    await ensure_topics(kafka_config, {topic: 3, f"{topic}.dlq": 1})
    depth = await KafkaDepth(kafka_config, f"{topic}.dlq", "nobody").depth()
    assert depth.partitions == {"0": 0}


@pytest.mark.kafka
async def test_kafka_depth_of_a_missing_topic_is_zero_and_creates_nothing(
    kafka_config: KafkaConfig,
) -> None:
    missing = f"test.missing.{uuid.uuid4().hex[:8]}"
    probe = KafkaDepth(kafka_config, missing, "nobody")
    assert await probe.depth() == QueueDepth(missing, 0)
    assert await probe.depth() == QueueDepth(missing, 0)


@pytest.mark.kafka
async def test_kafka_commit_on_revoke_hands_acked_work_to_the_next_member(
    kafka_broker: EmbeddedKafka | ExternalKafka, kafka_config: KafkaConfig, topic: str
) -> None:
    if isinstance(kafka_broker, EmbeddedKafka):
        # Needs Apache Kafka (INFERQ_TEST_KAFKA_BOOTSTRAP), which cannot be installed here.
        # noida-db 0.2.3 answers an OffsetCommit sent during a rebalance with IllegalGeneration
        # and the two-member group never settles: run against it, this test hangs (>200 s,
        # measured). What noida-db can show is covered elsewhere: a failed commit only means
        # redelivery (test_offsets.py, the kill -9 and broker-restart end-to-end tests).
        pytest.skip("needs Apache Kafka: noida-db wedges a group that commits mid-rebalance")
    group = _group()
    async with KafkaPublisher(kafka_config) as publisher:
        await publish_values(publisher, topic, [b"a", b"b", b"c"])
    first = KafkaConsumer(kafka_config, topic, group)
    second = KafkaConsumer(kafka_config, topic, group)
    try:
        await first.start()
        got = await drain(first, 3)
        first.ack(got[0])  # acked, not committed: the revoke must commit it
        await second.start()  # joins: the group rebalances and first gives partitions up
        await eventually_assigned(first, second)
        partition = int(got[0].position.split("@")[0])
        owner = first if any(tp.partition == partition for tp in first.assignment()) else second
        assert values(await drain(owner, 2)) == [b"b", b"c"]
    finally:
        await second.stop()
        await first.stop()


async def eventually_assigned(*consumers: KafkaConsumer, within_s: float = 15.0) -> None:
    """Until the members split all three partitions between them."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        owned = [c.assignment() for c in consumers]
        if sum(len(a) for a in owned) == 3 and all(owned):
            return
        await asyncio.sleep(0.05)  # aiokafka rebalances in the background, no fetch needed
    raise AssertionError(f"no split assignment: {[c.assignment() for c in consumers]}")


# --- broker process and restarts ------------------------------------------------------------


@pytest.mark.kafka
def test_embedded_broker_stops_and_is_killed_by_its_own_pid(tmp_path: Path) -> None:
    broker = EmbeddedKafka(tmp_path / "broker", free_port())
    with broker:
        pid = broker.pid
        assert pid is not None and _alive(pid)
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert not broker.running and not _alive(pid)
    assert "kafka" in broker.log_path.read_text()

    broker.start()  # same port and data dir
    pid = broker.pid
    assert pid is not None
    broker.kill()
    assert not _alive(pid)
    broker.stop()  # nothing left to stop: harmless


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_asyncio.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[EmbeddedKafka]:
    """A broker this test may stop and restart without disturbing the session's."""
    broker = EmbeddedKafka(tmp_path / "broker", free_port())
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)


@pytest.mark.kafka
@pytest.mark.slow
# a broker restart, 60 s for the new messages, 30 s to settle, 30 s for the sentinel
@pytest.mark.timeout(200)
async def test_kafka_clients_survive_a_broker_restart_without_redelivering_commits(
    private_broker: EmbeddedKafka,
) -> None:
    config = KafkaConfig(bootstrap=private_broker.bootstrap, client_id="inferq-restart")
    topic, group = "restart", _group()
    await ensure_topics(config, {topic: 1})
    before = [f"before-{i}".encode() for i in range(10)]
    after = [f"after-{i}".encode() for i in range(10)]
    async with KafkaPublisher(config) as publisher, KafkaConsumer(config, topic, group) as con:
        await publish_values(publisher, topic, before)
        got = await drain(con, 10)
        assert values(got) == before
        for delivery in got:
            con.ack(delivery)
        await con.commit()

        await asyncio.to_thread(private_broker.stop)
        await asyncio.to_thread(private_broker.start)

        await publish_values(publisher, topic, after)  # no retry: the producer reconnects
        seen: list[bytes | None] = []
        deadline = time.monotonic() + 60
        while not set(after) <= set(seen) and time.monotonic() < deadline:
            batch = await con.fetch(100, 0.25)
            seen += values(batch)
            for delivery in batch:
                con.ack(delivery)
            await con.commit()  # may lose to the rejoin after the restart: redelivery, not loss
        assert set(after) <= set(seen), seen
        assert not set(before) & set(seen), "committed messages came back after the restart"

        # acked work sticks eventually, whatever the rejoin did to the first commits
        await _settle(con, KafkaDepth(config, topic, group), seen)
        assert not set(before) & set(seen)

    async with (
        KafkaPublisher(config) as publisher,
        KafkaConsumer(config, topic, group) as successor,
    ):
        await assert_nothing_before_a_sentinel(publisher, topic, successor)


async def _settle(consumer: KafkaConsumer, probe: KafkaDepth, seen: list[bytes | None]) -> None:
    deadline = time.monotonic() + 30
    while (await probe.depth()).backlog and time.monotonic() < deadline:
        batch = await consumer.fetch(100, 0.25)
        seen += values(batch)
        for delivery in batch:
            consumer.ack(delivery)
        await consumer.commit()
    assert (await probe.depth()).backlog == 0


@pytest.mark.kafka
@pytest.mark.slow
async def test_kafka_publish_to_a_stopped_broker_raises_publish_error(
    private_broker: EmbeddedKafka,
) -> None:
    config = KafkaConfig(
        bootstrap=private_broker.bootstrap,
        client_id="inferq-down",
        delivery_timeout_ms=1500,
        close_timeout_ms=1000,
    )
    await ensure_topics(config, {"down": 1})
    async with KafkaPublisher(config) as publisher:
        await publisher.publish("down", b"up")
        await asyncio.to_thread(private_broker.stop)
        with pytest.raises(PublishError) as caught:
            await publisher.publish("down", b"lost")
        assert caught.value.__cause__ is not None
        await asyncio.to_thread(private_broker.start)
        await _publish_eventually(lambda: publisher.publish("down", b"back"))


@pytest.mark.kafka
@pytest.mark.slow
async def test_kafka_publisher_stop_does_not_hang_on_a_down_broker(
    private_broker: EmbeddedKafka,
) -> None:
    config = KafkaConfig(
        bootstrap=private_broker.bootstrap,
        client_id="inferq-down",
        delivery_timeout_ms=500,
        close_timeout_ms=500,
    )
    await ensure_topics(config, {"down": 1})
    publisher = KafkaPublisher(config)
    await publisher.start()
    await publisher.publish("down", b"up")
    await asyncio.to_thread(private_broker.stop)
    with pytest.raises(PublishError):
        await publisher.publish_many("down", [Outgoing(b"lost-1"), Outgoing(b"lost-2")])
    started = time.monotonic()
    await asyncio.wait_for(publisher.stop(), 10)
    assert time.monotonic() - started < 5


async def _publish_eventually(publish: Callable[[], Awaitable[None]]) -> None:
    # after an outage the producer may need one metadata refresh before the next ack
    deadline = time.monotonic() + 30
    while True:
        try:
            await publish()
            return
        except PublishError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("idempotent", [False, True], ids=["default", "idempotent"])
async def test_kafka_publisher_recovers_by_itself_after_a_broker_kill_9(
    private_broker: EmbeddedKafka, idempotent: bool
) -> None:
    """The publisher publishes again by itself after a broker kill -9 and restart, and says
    it cannot publish (check) while the broker is down. An idempotent producer meets a broker
    that forgot its sequence numbers and answers OutOfOrderSequenceNumber to every later
    batch: the publisher must replace it."""
    config = KafkaConfig(
        bootstrap=private_broker.bootstrap,
        client_id="inferq-kill9",
        delivery_timeout_ms=10_000,
        idempotent=idempotent,
    )
    await ensure_topics(config, {"kill9": 3})
    # noida-db may lose a topic created moments before a kill -9 (Apache Kafka does not):
    # a clean restart first makes the topic durable, so that the kill costs producer state only
    await asyncio.to_thread(private_broker.stop)
    await asyncio.to_thread(private_broker.start)
    async with KafkaPublisher(config) as publisher:
        for i in range(10):
            await publisher.publish("kill9", b"before-%d" % i, key=b"k%d" % i)
        await publisher.check()
        await asyncio.to_thread(private_broker.kill)
        for i in range(3):  # buffered in the producer, retried by it while the broker is down
            with pytest.raises(TimeoutError):  # given up on, as the API does after a while
                await asyncio.wait_for(
                    publisher.publish("kill9", b"during-%d" % i, key=b"d%d" % i), 1.5
                )
        with pytest.raises(TransportError):
            await publisher.check()
        await asyncio.to_thread(private_broker.start)
        await publisher.check()
        # no retry here: the publisher itself gets past the stale producer state
        started = time.monotonic()
        await publisher.publish("kill9", b"after-0", key=b"a0")
        first = time.monotonic() - started
        for i in range(1, 20):
            await publisher.publish("kill9", b"after-%d" % i, key=b"a%d" % i)
        print(f"first publish after the restart acknowledged in {first:.2f} s")
    after = {b"after-%d" % i for i in range(20)}
    seen: set[bytes | None] = set()
    async with KafkaConsumer(config, "kill9", _group()) as consumer:
        deadline = time.monotonic() + 15
        while not after <= seen and time.monotonic() < deadline:
            seen.update(values(await consumer.fetch(100, 0.25)))
    assert after <= seen, after - seen

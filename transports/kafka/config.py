"""Client settings of one Kafka cluster, shared by its publisher, consumers and probes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class KafkaConfig:
    """Client settings shared by the publisher, consumers and probes of one cluster."""

    bootstrap: str
    client_id: str = "inferq"
    # producer: a 1 ms linger batches concurrent publishes; it adds ~1 ms to a lone one
    linger_ms: int = 1
    max_batch_size: int = 64 * 1024
    # the largest record the producer sends (Kafka's own default; brokers take 1,048,588)
    max_request_size: int = 1024 * 1024
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    request_timeout_ms: int = 15_000
    # off: an idempotent producer given a producer id that a broker reused after a crash has
    # its acknowledged records dropped as duplicates (noida-db does); see publisher.py
    idempotent: bool = False
    # the most a publish waits for its ack: an aiokafka producer never expires a
    # batch by itself and would wait for a down broker forever
    delivery_timeout_ms: int = 30_000
    # how long KafkaPublisher.stop waits for buffered messages before dropping them
    close_timeout_ms: int = 5_000
    retry_backoff_ms: int = 100
    metadata_max_age_ms: int = 60_000
    # consumer: short broker-side waits so that a lone message is not held back
    fetch_max_wait_ms: int = 10
    max_partition_fetch_bytes: int = 1024 * 1024
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    isolation_level: Literal["read_uncommitted", "read_committed"] = "read_uncommitted"
    # idle without a busy loop against brokers that answer empty fetches at once: after
    # an empty window of idle_window_ms, pause the partitions for idle_pause_ms (0: off),
    # or a quarter of the time they have been idle, up to idle_pause_max_ms: the most a
    # message that ends a long idle spell waits, for an idle cost of ~1/idle_pause_max_ms
    # fetches a second
    idle_window_ms: int = 2
    idle_pause_ms: int = 5
    idle_pause_max_ms: int = 100
    # static group membership (KIP-345): a restarted worker with the same id takes its
    # partitions back at once instead of waiting for the dead member's session to expire
    group_instance_id: str | None = None
    # how long KafkaConsumer.start waits for its first partition assignment
    join_timeout_s: float = 30.0
    # how long a commit may wait (aiokafka retries a missing coordinator forever)
    commit_timeout_s: float = 15.0

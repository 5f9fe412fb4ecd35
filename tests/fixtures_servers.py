"""Session fixtures for the servers that integration tests need."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from jobstore.store import normalise_url
from tests.local_servers import LocalPostgres, LocalRedis, ServerUnavailable
from transports.base import TransportError
from transports.kafka import EmbeddedKafka, KafkaConfig, ensure_topics
from transports.local_process import free_port
from transports.sqs import LocalAws, SqsConfig, delete_queues, dlq_name, ensure_queues


def unavailable(message: str) -> None:
    """A server a test needs cannot be had: skip with the reason, but fail under CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# --- PostgreSQL ---------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(postgres_url: str, prefix: str) -> Iterator[str]:
    """A new database on the server of ``postgres_url``, its URL; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


POSTGRES_URL_ENV = "INFERQ_TEST_POSTGRES_URL"
# Trust auth on the development machines; the role name differs between them.
_POSTGRES_CANDIDATES = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)


def _postgres_error(url: str) -> str | None:
    """None when ``url`` answers SELECT 1, else why not."""
    engine = create_engine(
        normalise_url(url), poolclass=NullPool, connect_args={"connect_timeout": 5}
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect is reported below, loudly
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reachable PostgreSQL URL (psycopg driver): the configured one, the machine's own on
    5432, or else a throwaway server started for this session and stopped after it."""
    configured = os.environ.get(POSTGRES_URL_ENV)
    candidates = (configured,) if configured else _POSTGRES_CANDIDATES
    errors = []
    for url in candidates:
        error = _postgres_error(url)
        if error is None:
            yield normalise_url(url).render_as_string(hide_password=False)
            return
        errors.append(f"{url}: {error}")
    if configured:
        pytest.fail(f"{POSTGRES_URL_ENV} is unreachable: {errors[0]}", pytrace=False)
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
    except ServerUnavailable as exc:
        unavailable(f"no PostgreSQL running and none can be started here: {exc}")
    try:
        yield server.url
    finally:
        server.stop("immediate")


@pytest.fixture
def throwaway_postgres(tmp_path: Path) -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this test's own, which it may stop, kill and start again (fault
    tests); never the shared one."""
    server = LocalPostgres(tmp_path / "pg")
    try:
        server.start()
    except ServerUnavailable as exc:
        unavailable(f"cannot start a PostgreSQL of the test's own: {exc}")
    try:
        yield server
    finally:
        server.stop("immediate")


# --- Redis --------------------------------------------------------------------------------

REDIS_URL_ENV = "INFERQ_TEST_REDIS_URL"
# a database number of its own, so that flushing it touches nobody else's keys
_REDIS_DEFAULT = "redis://127.0.0.1:6379/14"


def _redis_error(url: str) -> str | None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis database for this session, flushed before and after: the configured one, the
    machine's own on 6379 (database 14), or a throwaway redis-server on a free port."""
    import redis

    url = os.environ.get(REDIS_URL_ENV) or _REDIS_DEFAULT
    server: LocalRedis | None = None
    error = _redis_error(url)
    if error is not None:
        if os.environ.get(REDIS_URL_ENV):
            pytest.fail(f"{REDIS_URL_ENV} is unreachable: {error}", pytrace=False)
        server = LocalRedis(tmp_path_factory.mktemp("redis"))
        try:
            server.start()
        except ServerUnavailable as exc:
            unavailable(f"no Redis running and none can be started here: {exc}")
        url = server.url
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        with contextlib.suppress(redis.RedisError):
            client.flushdb()
        client.close()
        if server is not None:
            server.stop()


# --- Kafka protocol (noida-db) ---------------------------------------------------------------

KAFKA_BOOTSTRAP_ENV = "INFERQ_TEST_KAFKA_BOOTSTRAP"
TOPIC_PARTITIONS = 3


@dataclass(frozen=True)
class ExternalKafka:
    """A broker the suite did not start (INFERQ_TEST_KAFKA_BOOTSTRAP); never stopped by it."""

    bootstrap: str


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedKafka | ExternalKafka]:
    """A Kafka-protocol broker for the session: noida-db on a free port, stopped by its PID.

    Fails (never skips) when noida-db cannot start; deselect with -m 'not kafka' instead.
    """
    configured = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if configured:
        yield ExternalKafka(configured)
        return
    broker = EmbeddedKafka(tmp_path_factory.mktemp("noida-db"), free_port())
    try:
        broker.start()
    except TransportError as exc:
        pytest.fail(
            f"noida-db could not start ({exc}); set {KAFKA_BOOTSTRAP_ENV} to use another "
            "broker, or deselect with -m 'not kafka'",
            pytrace=False,
        )
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_config(kafka_broker: EmbeddedKafka | ExternalKafka) -> KafkaConfig:
    return KafkaConfig(bootstrap=kafka_broker.bootstrap, client_id="inferq-test")


def unique_topic_name(request: pytest.FixtureRequest) -> str:
    """A fresh topic name that still says which test made it (Kafka allows [A-Za-z0-9._-])."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:60]
    return f"test.{stem}.{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def topic(kafka_config: KafkaConfig, request: pytest.FixtureRequest) -> str:
    """A topic of its own for each test, created with TOPIC_PARTITIONS partitions."""
    name = unique_topic_name(request)
    await ensure_topics(kafka_config, {name: TOPIC_PARTITIONS})
    return name


# --- SQS and S3 (moto_server) ---------------------------------------------------------------

AWS_ENDPOINT_ENV = "INFERQ_TEST_AWS_ENDPOINT"
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def aws_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An SQS/S3 endpoint for the session: moto_server on a free port, stopped by its PID.

    boto3 needs a region and credentials even for moto: dummy ones are set for this process
    and its children unless the environment has its own. Fails (never skips) when moto_server
    cannot start; deselect with -m 'not sqs' instead.
    """
    for name, value in _FAKE_AWS.items():
        os.environ.setdefault(name, value)
    configured = os.environ.get(AWS_ENDPOINT_ENV)
    if configured:
        yield configured
        return
    server = LocalAws(tmp_path_factory.mktemp("moto"), free_port())
    try:
        server.start()
    except TransportError as exc:
        pytest.fail(
            f"moto_server could not start ({exc}); install moto[server] or set "
            f"{AWS_ENDPOINT_ENV}, or deselect with -m 'not sqs'",
            pytrace=False,
        )
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@pytest.fixture
def sqs_config(aws_endpoint: str) -> SqsConfig:
    # short visibility timeouts and polls: redelivery tests wait seconds, not minutes
    return SqsConfig(
        endpoint_url=aws_endpoint, visibility_timeout_s=5, wait_time_s=1, max_receive_count=3
    )


def unique_queue_name(request: pytest.FixtureRequest) -> str:
    """A fresh queue name that still says which test made it (SQS allows [A-Za-z0-9_-])."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:50]
    return f"t-{stem}-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def queue(sqs_config: SqsConfig, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A queue of its own for each test, with its ``-dlq`` and a RedrivePolicy; deleted
    afterwards so that moto's queue scans stay short."""
    name = unique_queue_name(request)
    await ensure_queues(sqs_config, name)
    try:
        yield name
    finally:
        await delete_queues(sqs_config, [name, dlq_name(name)])

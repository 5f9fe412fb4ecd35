"""Session fixtures for the servers that integration tests need."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from jobstore.store import normalise_url
from transports.base import TransportError
from transports.broker import EmbeddedKafka, free_port
from transports.kafka import KafkaConfig, ensure_topics

# --- PostgreSQL ---------------------------------------------------------------------------

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
def postgres_url() -> str:
    """A reachable PostgreSQL URL (psycopg driver). Fails, never skips, when there is none."""
    configured = os.environ.get(POSTGRES_URL_ENV)
    candidates = (configured,) if configured else _POSTGRES_CANDIDATES
    errors = []
    for url in candidates:
        error = _postgres_error(url)
        if error is None:
            return normalise_url(url).render_as_string(hide_password=False)
        errors.append(f"{url}: {error}")
    pytest.fail(
        "PostgreSQL is unreachable (set "
        f"{POSTGRES_URL_ENV}, or deselect with -m 'not postgres'):\n" + "\n".join(errors),
        pytrace=False,
    )


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

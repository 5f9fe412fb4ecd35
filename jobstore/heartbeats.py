"""Worker heartbeats: which workers are alive and which models and providers they serve.

Each function runs on a connection the façade (store.py) opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from jobstore.tables import workers_table

_WORKERS = workers_table()


def beat(
    conn: Connection,
    backend: str,
    worker_id: str,
    models: Sequence[Mapping[str, str]],
    now: datetime,
) -> None:
    served = [dict(m) for m in models]
    insert = postgresql.insert if backend == "postgresql" else sqlite.insert
    stmt = insert(_WORKERS).values(worker_id=worker_id, models=served, heartbeat_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[_WORKERS.c.worker_id],
        set_={"models": stmt.excluded.models, "heartbeat_at": stmt.excluded.heartbeat_at},
    )
    conn.execute(stmt)


def live_workers(conn: Connection, since: datetime) -> dict[str, list[dict[str, str]]]:
    query = select(_WORKERS.c.worker_id, _WORKERS.c.models).where(_WORKERS.c.heartbeat_at >= since)
    return {wid: list(models or []) for wid, models in conn.execute(query)}


def providers(conn: Connection, since: datetime) -> dict[tuple[str, str], set[str]]:
    query = select(_WORKERS.c.models).where(_WORKERS.c.heartbeat_at >= since)
    served: dict[tuple[str, str], set[str]] = {}
    for models in conn.scalars(query):
        for entry in models or []:
            name, version = entry.get("name"), entry.get("version")
            provider = entry.get("provider")
            if name and version and provider:
                served.setdefault((name, version), set()).add(provider)
    return served

"""The webhook outbox: delivery rows written in the job's own transaction, and their log.

``enqueue_job_events`` runs inside the JobStore transaction that changes a job's status, so
a job's outcome and its webhook rows commit (or vanish) together. It also notes the rows' ids
on the connection (``QUEUED``), for the store to hand them to delivery once the transaction
has committed. ``WebhookOutbox`` is the other side: the delivery tasks claim rows (those
handed over, and, in the periodic sweep, every due one), record every attempt, and schedule
retries.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Column, Connection, Engine, Index, Table, Text, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, SQLModel

from jobstore.records import JobRecord, require_aware, utcnow
from jobstore.tables import UTCDateTime
from schemas.jobs import TERMINAL_WEBHOOK_EVENTS
from schemas.webhooks import (
    STATUS_EVENTS,
    DeliveryStatus,
    DisabledEndpoint,
    WebhookAttempt,
    WebhookDelivery,
    WebhookPayload,
)

_PENDING = DeliveryStatus.PENDING.value
_DELIVERING = DeliveryStatus.DELIVERING.value
_DELIVERED = DeliveryStatus.DELIVERED.value
_FAILED = DeliveryStatus.FAILED.value
_DISABLED = DeliveryStatus.DISABLED.value
_MAX_ERROR = 500
# key in ``Connection.info`` of the outbox ids written in the open transaction
QUEUED = "inferq.outbox.queued"


class WebhookDeliveryRow(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job", "job_id"),
    )

    id: str = Field(primary_key=True, max_length=64)  # the webhook-id
    job_id: str = Field(max_length=128)
    event: str = Field(max_length=32)
    url: str = Field(max_length=4096)
    payload: str = Field(sa_column=Column(Text(), nullable=False))  # the exact body sent
    status: str = Field(max_length=16)
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claim_token: str | None = Field(default=None, max_length=32)
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_status_code: int | None = Field(default=None)
    last_error: str | None = Field(default=None)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class WebhookAttemptRow(SQLModel, table=True):
    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "attempted_at"),)

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(max_length=64)
    attempted_at: datetime = Field(sa_type=UTCDateTime)
    status_code: int | None = Field(default=None)
    latency_ms: float = Field(default=0.0)
    error: str | None = Field(default=None)
    outcome: str = Field(max_length=16)


class WebhookEndpointRow(SQLModel, table=True):
    """Endpoints that answered 410 Gone: nothing more is sent to them."""

    __tablename__ = "webhook_endpoints_disabled"

    url: str = Field(primary_key=True, max_length=4096)
    disabled_at: datetime = Field(sa_type=UTCDateTime)
    reason: str = Field(default="")


def _table(model: Any) -> Table:
    return cast("Table", model.__table__)


DELIVERIES = _table(WebhookDeliveryRow)
ATTEMPTS = _table(WebhookAttemptRow)
DISABLED = _table(WebhookEndpointRow)


def webhook_id(job_id: str, event: str) -> str:
    """Stable per job and event: every attempt and every replay carries the same id."""
    digest = hashlib.sha256(f"{job_id}\x00{event}".encode()).hexdigest()[:32]
    return f"msg_{digest}"


def wanted_events(webhook: dict[str, Any] | None) -> frozenset[str]:
    if not webhook or not webhook.get("url"):
        return frozenset()
    events = webhook.get("events")
    return frozenset(TERMINAL_WEBHOOK_EVENTS if events is None else events)


def payload_for(record: JobRecord, event: str) -> str:
    when = record.started_at if event == "job.started" else record.completed_at
    payload = WebhookPayload.model_validate(
        {"type": event, "timestamp": when or record.updated_at, "data": record.to_resource()}
    )
    return payload.model_dump_json()


def enqueue_job_events(
    conn: Connection, records: Iterable[JobRecord], backend: str, now: datetime | None = None
) -> int:
    """Insert the webhook rows that these job transitions call for; inside the caller's
    transaction. The event is the record's current status; a (job, event) already in the
    outbox is left alone (a redelivered claim emits `job.started` once)."""
    now = utcnow() if now is None else now
    rows = []
    for record in records:
        event = STATUS_EVENTS.get(record.status)
        if event is None or event not in wanted_events(record.webhook):
            continue
        assert record.webhook is not None
        rows.append(
            {
                "id": webhook_id(record.id, event),
                "job_id": record.id,
                "event": event,
                "url": str(record.webhook["url"]),
                "payload": payload_for(record, event),
                "status": _PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "claim_token": None,
                "claimed_until": None,
                "last_status_code": None,
                "last_error": None,
                "created_at": now,
                "updated_at": now,
                "delivered_at": None,
            }
        )
    if not rows:
        return 0
    insert = postgresql.insert if backend == "postgresql" else sqlite.insert
    conn.execute(insert(DELIVERIES).on_conflict_do_nothing(index_elements=["id"]), rows)
    conn.info.setdefault(QUEUED, []).extend(r["id"] for r in rows)
    return len(rows)


@dataclass(frozen=True)
class Claimed:
    """A delivery handed to one task; ``token`` fences off a later re-claim."""

    id: str
    token: str


@dataclass(frozen=True)
class DeliveryRecord:
    id: str
    job_id: str
    event: str
    url: str
    payload: str
    status: DeliveryStatus
    attempts: int
    claim_token: str | None
    created_at: datetime
    endpoint_disabled: bool = False  # the URL answered 410 Gone before


@dataclass(frozen=True)
class AttemptResult:
    attempted_at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None


class WebhookOutbox:
    """The delivery side of the outbox; shares the job store's engine."""

    def __init__(self, engine: Engine, *, writer: Engine | None = None) -> None:
        self._engine = engine
        self._writer = writer or engine
        self._backend = engine.dialect.name

    def claim_due(
        self, *, limit: int, lease_s: float, now: datetime | None = None
    ) -> list[Claimed]:
        """Hand out deliveries that are due: pending past ``next_attempt_at``, or delivering
        past their lease (a task that was lost, or a worker killed mid-delivery)."""
        now = utcnow() if now is None else require_aware(now, "now")
        d = DELIVERIES.c
        due = or_(
            (d.status == _PENDING) & (d.next_attempt_at <= now),
            (d.status == _DELIVERING) & (d.claimed_until < now),
        )
        token = secrets.token_hex(8)
        with self._writer.begin() as conn:
            query = select(d.id).where(due).order_by(d.next_attempt_at).limit(limit)
            if self._backend == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list(conn.scalars(query))
            if not ids:
                return []
            claimed = conn.scalars(
                update(DELIVERIES)
                .where(d.id.in_(ids), due)
                .values(
                    status=_DELIVERING,
                    claim_token=token,
                    claimed_until=now + timedelta(seconds=lease_s),
                    updated_at=now,
                )
                .returning(d.id)
            )
            return [Claimed(i, token) for i in claimed]

    def claim_ids(
        self, ids: Sequence[str], *, lease_s: float, now: datetime | None = None
    ) -> list[Claimed]:
        """Claim these deliveries, handed over just after their commit: those still pending
        and never tried (or due), or delivering past their lease. One the sweep claimed
        first, or one waiting for a retry, is left alone: at most one claim wins."""
        if not ids:
            return []
        now = utcnow() if now is None else require_aware(now, "now")
        d = DELIVERIES.c
        # a fresh row is due at its commit time, which another machine's clock may put a
        # little ahead of ours: never tried is enough
        due = or_(
            (d.status == _PENDING) & ((d.attempts == 0) | (d.next_attempt_at <= now)),
            (d.status == _DELIVERING) & (d.claimed_until < now),
        )
        token = secrets.token_hex(8)
        with self._writer.begin() as conn:
            claimed = conn.scalars(
                update(DELIVERIES)
                .where(d.id.in_(list(dict.fromkeys(ids))), due)
                .values(
                    status=_DELIVERING,
                    claim_token=token,
                    claimed_until=now + timedelta(seconds=lease_s),
                    updated_at=now,
                )
                .returning(d.id)
            )
            return [Claimed(i, token) for i in claimed]

    def get(self, delivery_id: str) -> DeliveryRecord | None:
        d = DELIVERIES.c
        gone = select(DISABLED.c.url).where(DISABLED.c.url == d.url).exists()
        with self._engine.begin() as conn:
            row = (
                conn.execute(
                    select(DELIVERIES, gone.label("endpoint_disabled")).where(d.id == delivery_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        return DeliveryRecord(
            id=row["id"],
            job_id=row["job_id"],
            event=row["event"],
            url=row["url"],
            payload=row["payload"],
            status=DeliveryStatus(row["status"]),
            attempts=int(row["attempts"]),
            claim_token=row["claim_token"],
            created_at=row["created_at"],
            endpoint_disabled=bool(row["endpoint_disabled"]),
        )

    def created_at(self, delivery_id: str) -> datetime | None:
        d = DELIVERIES.c
        with self._engine.begin() as conn:
            value: datetime | None = conn.scalar(select(d.created_at).where(d.id == delivery_id))
        return value

    def endpoint_disabled(self, url: str) -> bool:
        with self._engine.begin() as conn:
            return conn.scalar(select(DISABLED.c.url).where(DISABLED.c.url == url)) is not None

    def record(
        self,
        claim: Claimed,
        attempt: AttemptResult,
        *,
        outcome: DeliveryStatus,
        next_attempt_at: datetime | None = None,
    ) -> bool:
        """Log the attempt and move the delivery on; False when another claim owns it now.

        A success is kept even then (the receiver has it); a failure only moves the row on
        while this claim still owns it.
        """
        d = DELIVERIES.c
        now = attempt.attempted_at
        error = None if attempt.error is None else attempt.error[:_MAX_ERROR]
        label = {
            DeliveryStatus.DELIVERED: "delivered",
            DeliveryStatus.PENDING: "retry",
            DeliveryStatus.FAILED: "failed",
            DeliveryStatus.DISABLED: "disabled",
        }.get(outcome, outcome.value)
        values: dict[str, Any] = {
            "status": outcome.value,
            "attempts": d.attempts + 1,
            "last_status_code": attempt.status_code,
            "last_error": error,
            "claim_token": None,
            "claimed_until": None,
            "next_attempt_at": next_attempt_at,
            "updated_at": now,
        }
        if outcome == DeliveryStatus.DELIVERED:
            values["delivered_at"] = now
            guard = d.status != _DELIVERED
        else:
            guard = (d.status == _DELIVERING) & (d.claim_token == claim.token)
        with self._writer.begin() as conn:
            conn.execute(
                ATTEMPTS.insert().values(
                    delivery_id=claim.id,
                    attempted_at=now,
                    status_code=attempt.status_code,
                    latency_ms=attempt.latency_ms,
                    error=error,
                    outcome=label,
                )
            )
            moved = conn.execute(
                update(DELIVERIES).where(d.id == claim.id, guard).values(**values)
            ).rowcount
            if outcome == DeliveryStatus.DISABLED and moved:
                url = conn.scalar(select(d.url).where(d.id == claim.id))
                self._disable(conn, str(url), now, error or "410 Gone")
        return bool(moved)

    def skip(self, claim: Claimed, reason: str, now: datetime | None = None) -> None:
        """The endpoint is disabled: settle the delivery without sending."""
        now = utcnow() if now is None else now
        d = DELIVERIES.c
        with self._writer.begin() as conn:
            conn.execute(
                update(DELIVERIES)
                .where(d.id == claim.id, d.claim_token == claim.token)
                .values(
                    status=_DISABLED,
                    last_error=reason,
                    claim_token=None,
                    claimed_until=None,
                    next_attempt_at=None,
                    updated_at=now,
                )
            )
            conn.execute(
                ATTEMPTS.insert().values(
                    delivery_id=claim.id,
                    attempted_at=now,
                    status_code=None,
                    latency_ms=0.0,
                    error=reason,
                    outcome="skipped",
                )
            )

    def _disable(self, conn: Connection, url: str, now: datetime, reason: str) -> None:
        insert = postgresql.insert if self._backend == "postgresql" else sqlite.insert
        conn.execute(
            insert(DISABLED)
            .values(url=url, disabled_at=now, reason=reason)
            .on_conflict_do_nothing(index_elements=["url"])
        )
        d = DELIVERIES.c
        conn.execute(
            update(DELIVERIES)
            .where(d.url == url, d.status == _PENDING)
            .values(status=_DISABLED, last_error="endpoint disabled (410 Gone)", updated_at=now)
        )

    def enable_endpoint(self, url: str) -> DisabledEndpoint | None:
        """Send to ``url`` again; what it was disabled for, or None when it was not.

        Deliveries settled as disabled stay so: replay a job to send its events again."""
        e = DISABLED.c
        with self._writer.begin() as conn:
            row = conn.execute(delete(DISABLED).where(e.url == url).returning(DISABLED)).first()
        if row is None:
            return None
        return DisabledEndpoint(url=row.url, disabled_at=row.disabled_at, reason=row.reason)

    def disabled_endpoints(self) -> list[DisabledEndpoint]:
        e = DISABLED.c
        with self._engine.begin() as conn:
            rows = conn.execute(select(DISABLED).order_by(e.disabled_at, e.url)).all()
        return [
            DisabledEndpoint(url=r.url, disabled_at=r.disabled_at, reason=r.reason) for r in rows
        ]

    def for_job(self, job_id: str) -> list[WebhookDelivery]:
        d, a = DELIVERIES.c, ATTEMPTS.c
        with self._engine.begin() as conn:
            rows = list(
                conn.execute(
                    select(DELIVERIES).where(d.job_id == job_id).order_by(d.created_at, d.event)
                ).mappings()
            )
            ids = [r["id"] for r in rows]
            log: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
            if ids:
                for att in conn.execute(
                    select(ATTEMPTS).where(a.delivery_id.in_(ids)).order_by(a.attempted_at, a.id)
                ).mappings():
                    log[att["delivery_id"]].append(
                        WebhookAttempt(
                            attempted_at=att["attempted_at"],
                            status_code=att["status_code"],
                            latency_ms=att["latency_ms"],
                            error=att["error"],
                            outcome=att["outcome"],
                        )
                    )
        return [
            WebhookDelivery(
                id=r["id"],
                job_id=r["job_id"],
                event=r["event"],
                url=r["url"],
                status=DeliveryStatus(r["status"]),
                attempts=r["attempts"],
                next_attempt_at=r["next_attempt_at"],
                last_status_code=r["last_status_code"],
                last_error=r["last_error"],
                created_at=r["created_at"],
                delivered_at=r["delivered_at"],
                attempt_log=log[r["id"]],
            )
            for r in rows
        ]

    def replay(
        self, job_id: str, events: Sequence[str] | None = None, now: datetime | None = None
    ) -> int:
        """Send the job's deliveries again, with the same ``webhook-id`` and body."""
        now = utcnow() if now is None else now
        d = DELIVERIES.c
        query = update(DELIVERIES).where(d.job_id == job_id)
        if events:
            query = query.where(d.event.in_(list(events)))
        with self._writer.begin() as conn:
            return int(
                conn.execute(
                    query.values(
                        status=_PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        claim_token=None,
                        claimed_until=None,
                        updated_at=now,
                    )
                ).rowcount
            )

    def counts(self) -> dict[str, int]:
        d = DELIVERIES.c
        from sqlalchemy import func

        with self._engine.begin() as conn:
            return {
                str(s): int(n)
                for s, n in conn.execute(select(d.status, func.count()).group_by(d.status))
            }


def decode_payload(payload: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(payload)
    return decoded

"""PostgreSQL NOTIFY of job state changes: the triggers that send it, and its payload.

Statement-level triggers on the jobs table send ``NOTIFY inferq_jobs_<schema>`` with the
ids and new statuses of the rows an INSERT created or an UPDATE moved to another status.
A trigger fires inside the writing transaction, so the notification is delivered exactly
when the change commits (and never for one rolled back), whichever code path wrote it:
``transitions.move``, the creation path, a sweep, or a future one. One trigger call per
statement: a batch of 500 claims is a few notifications, not 500.

The payload is ``<id> <status>`` items joined by commas (job ids hold neither), cut into
notifications under PostgreSQL's 8000-byte payload limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from sqlalchemy import Connection, text

from schemas.jobs import JobStatus

CHANNEL_PREFIX = "inferq_jobs_"
# a channel name is an identifier: at most 63 bytes; longer schema names go by their md5
_MAX_SCHEMA_IN_CHANNEL = 63 - len(CHANNEL_PREFIX)
PAYLOAD_LIMIT = 7900  # bytes; PostgreSQL refuses 8000 and more

_INSERT_TRIGGER = "inferq_jobs_notify_insert"
_UPDATE_TRIGGER = "inferq_jobs_notify_update"

_CHANNEL_SQL = (
    f"'{CHANNEL_PREFIX}' || CASE WHEN octet_length(TG_TABLE_SCHEMA) <= {_MAX_SCHEMA_IN_CHANNEL}"
    " THEN TG_TABLE_SCHEMA ELSE md5(TG_TABLE_SCHEMA) END"
)


def _function(name: str, rows: str) -> str:
    """A trigger function that notifies the ``<id> <status>`` items that ``rows`` selects."""
    return f"""
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    channel text := {_CHANNEL_SQL};
    item text;
    payload text := '';
BEGIN
    FOR item IN {rows} LOOP
        IF payload = '' THEN
            payload := item;
        ELSIF octet_length(payload) + octet_length(item) + 1 > {PAYLOAD_LIMIT} THEN
            PERFORM pg_notify(channel, payload);
            payload := item;
        ELSE
            payload := payload || ',' || item;
        END IF;
    END LOOP;
    IF payload <> '' THEN
        PERFORM pg_notify(channel, payload);
    END IF;
    RETURN NULL;
END
$fn$"""


_DDL = (
    _function(_INSERT_TRIGGER, "SELECT n.id || ' ' || n.status FROM inferq_new n"),
    _function(
        _UPDATE_TRIGGER,
        "SELECT n.id || ' ' || n.status FROM inferq_new n JOIN inferq_old o ON o.id = n.id"
        " WHERE n.status IS DISTINCT FROM o.status",
    ),
    f"CREATE TRIGGER {_INSERT_TRIGGER} AFTER INSERT ON jobs"
    f" REFERENCING NEW TABLE AS inferq_new FOR EACH STATEMENT EXECUTE FUNCTION {_INSERT_TRIGGER}()",
    # (a trigger with transition tables cannot be UPDATE OF status: the function's join
    # leaves out the rows whose status stayed, such as a lease renewal's)
    f"CREATE TRIGGER {_UPDATE_TRIGGER} AFTER UPDATE ON jobs"
    " REFERENCING OLD TABLE AS inferq_old NEW TABLE AS inferq_new"
    f" FOR EACH STATEMENT EXECUTE FUNCTION {_UPDATE_TRIGGER}()",
)

_PRESENT = text(
    "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND tgname IN (:i, :u)"
)


def install_triggers(conn: Connection) -> None:
    """Create the notify triggers where they are missing (the caller holds the schema lock).

    Only when missing: CREATE TRIGGER locks the table against writes, which every process
    start would otherwise do to a busy store.
    """
    present = conn.scalar(_PRESENT, {"i": _INSERT_TRIGGER, "u": _UPDATE_TRIGGER})
    if present == 2:
        return
    for name in (_INSERT_TRIGGER, _UPDATE_TRIGGER):
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON jobs")
    for statement in _DDL:
        conn.exec_driver_sql(statement)


TRIGGER_NAMES = (_INSERT_TRIGGER, _UPDATE_TRIGGER)


def channel_for(schema: str) -> str:
    """The channel the triggers of a jobs table in ``schema`` notify (as ``_CHANNEL_SQL``)."""
    if len(schema.encode()) > _MAX_SCHEMA_IN_CHANNEL:
        schema = hashlib.md5(schema.encode(), usedforsecurity=False).hexdigest()
    return CHANNEL_PREFIX + schema


# the schema of the jobs table that this connection's search_path finds
TABLE_SCHEMA_SQL = (
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = 'jobs'::regclass"
)


def parse_payload(payload: str) -> dict[str, JobStatus]:
    """The job ids and statuses of one notification; items that do not parse are skipped
    (another version's format: the sweep covers them)."""
    return dict(_items(payload))


def _items(payload: str) -> Iterator[tuple[str, JobStatus]]:
    for item in payload.split(","):
        job_id, _, status = item.rpartition(" ")
        if not job_id:
            continue
        try:
            yield job_id, JobStatus(status)
        except ValueError:
            continue

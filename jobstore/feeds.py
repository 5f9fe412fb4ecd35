"""Change feeds: how a process learns, without polling job rows, that jobs changed.

One feed per store backend, behind ``ChangeFeed``; the API's waiter hub
(``producers/waiters.py``) is their only consumer. A feed is a hint, never the truth: the
hub re-reads the rows it is told about and sweeps all watched jobs slowly anyway, so a
notification lost by a feed costs latency, never a wrong answer.

- PostgreSQL: ``LISTEN`` on the channel the store's triggers notify (``jobstore/notify.py``)
  on one connection of its own; the notifications carry ids and statuses. A connection that
  drops is reopened (with backoff), and the hub told to check everything it watches, since
  notifications sent meanwhile are gone.
- SQLite (a file): ``PRAGMA data_version`` on a connection of its own, every few
  milliseconds and only while someone waits; it changes when any other connection, in any
  process, committed. Then the feed reads the job events written since the last one it saw
  (``job_events.position``; one writer at a time, so positions follow commit order) and
  tells their jobs' statuses: a commit costs what it changed, not a lookup of every watched
  job. A burst larger than ``EVENTS_PER_LOOK``, or a log it cannot read, has the hub look
  the watched ids up in one query instead.
- SQLite in memory: only this process can write it, so a commit on the store's engine is
  the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL

from jobstore.events import EVENT_TYPES, EVENTS
from jobstore.notify import TABLE_SCHEMA_SQL, channel_for, parse_payload
from schemas.jobs import JobStatus

log = logging.getLogger(__name__)


class ChangeSink(Protocol):
    """What a feed tells; both are called on the event loop that started the feed."""

    def changed(self, statuses: Mapping[str, JobStatus]) -> None:
        """These jobs are now in these statuses (as of a commit)."""

    def check(self) -> None:
        """Something may have changed (or notifications were lost): look the jobs up."""


class ChangeFeed(Protocol):
    def start(self, sink: ChangeSink) -> None:
        """Begin feeding ``sink``; called on a running event loop."""

    async def stop(self) -> None: ...

    def active(self, watching: bool) -> None:
        """Whether any job is waited for; a polling feed rests while none is."""


class PostgresFeed:
    """``LISTEN`` on one connection; reconnects, and has the sink check, after a drop."""

    def __init__(
        self,
        url: URL,
        *,
        schema: str | None = None,
        connect_timeout_s: int = 5,
        reconnect_max_s: float = 5.0,
        application_name: str = "inferq-waiters",
    ) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": connect_timeout_s,
            "application_name": application_name,
            # a peer that vanished without a FIN is noticed in about half a minute
            "keepalives": 1,
            "keepalives_idle": 15,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        if schema is not None:
            self._kwargs["options"] = f"-csearch_path={schema}"
        self._reconnect_max_s = reconnect_max_s
        self._task: asyncio.Task[None] | None = None
        self.connects = 0  # successful LISTENs, the first included

    def start(self, sink: ChangeSink) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(sink), name="inferq-waiters-listen"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def active(self, watching: bool) -> None:
        pass  # a LISTEN costs nothing while idle

    async def _run(self, sink: ChangeSink) -> None:
        import psycopg
        from psycopg import sql

        delay = 0.05
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
                async with conn:
                    cursor = await conn.execute(TABLE_SCHEMA_SQL)
                    row = await cursor.fetchone()
                    if row is None:
                        raise psycopg.OperationalError("no jobs table")
                    channel = channel_for(str(row[0]))
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.connects += 1
                    delay = 0.05
                    # what changed while nobody listened is not coming: look it up
                    sink.check()
                    async for note in conn.notifies():
                        sink.changed(parse_payload(note.payload))
            except psycopg.Error as exc:
                log.warning("job change feed: %s; reconnecting in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_s)


class SqliteFeed:
    """``PRAGMA data_version`` on a connection of its own, in a thread, while anyone waits."""

    def __init__(self, path: str, *, poll_s: float = 0.005) -> None:
        self._path = path
        self._poll_s = poll_s
        self._watching = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, sink: ChangeSink) -> None:
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, args=(loop, sink), name="inferq-waiters-sqlite", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._watching.set()  # wake it to see the stop
            await asyncio.to_thread(thread.join, 5)

    def active(self, watching: bool) -> None:
        if watching:
            self._watching.set()
        else:
            self._watching.clear()

    def _run(self, loop: asyncio.AbstractEventLoop, sink: ChangeSink) -> None:
        conn: sqlite3.Connection | None = None
        last: int | None = None
        position: int | None = None  # the last job event told; None: check everything
        try:
            while not self._stopping.is_set() and not loop.is_closed():
                if not self._watching.wait(1.0):
                    last = None  # nobody waited: the first look after a rest reports
                    continue
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, isolation_level=None, timeout=1)
                    version = int(conn.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error as exc:
                    log.warning("job change feed: %s", exc)
                    if conn is not None:
                        conn.close()
                    conn, version = None, -1
                    self._stopping.wait(0.5)
                if version != last:
                    if last is None or conn is None:
                        position = None
                    last = version
                    position = self._tell(loop, sink, conn, position)
                self._stopping.wait(self._poll_s)
        except RuntimeError:
            pass  # the event loop closed under us: nobody is left to tell
        finally:
            if conn is not None:
                conn.close()

    @staticmethod
    def _tell(
        loop: asyncio.AbstractEventLoop,
        sink: ChangeSink,
        conn: sqlite3.Connection | None,
        position: int | None,
    ) -> int | None:
        """Tell the sink what the events after ``position`` changed; the new position.
        Without one (a first look, a burst, an unreadable log) the sink checks all."""
        rows: list[tuple[int, str, str]] = []
        try:
            if conn is not None and position is not None:
                rows = conn.execute(_EVENTS_SINCE, (position, EVENTS_PER_LOOK + 1)).fetchall()
            if conn is not None and (position is None or len(rows) > EVENTS_PER_LOOK):
                position = int(conn.execute(_LAST_EVENT).fetchone()[0])
                rows = []
                loop.call_soon_threadsafe(sink.check)
        except sqlite3.Error as exc:  # no log to read (a store older than job_events)
            log.debug("job change feed: %s", exc)
            loop.call_soon_threadsafe(sink.check)
            return None
        if conn is None:
            loop.call_soon_threadsafe(sink.check)
            return None
        if rows:
            statuses = {job_id: _STATUS_OF[kind] for _, job_id, kind in rows if kind in _STATUS_OF}
            position = rows[-1][0]
            if statuses:
                loop.call_soon_threadsafe(sink.changed, statuses)
        return position


# the most job events one look reads; a larger burst has the hub look up its waiters instead
EVENTS_PER_LOOK = 2000
_EVENTS_SINCE = (
    f"SELECT position, job_id, type FROM {EVENTS.name} WHERE position > ? ORDER BY position LIMIT ?"
)
_LAST_EVENT = f"SELECT coalesce(max(position), 0) FROM {EVENTS.name}"
_STATUS_OF = {kind: status for status, kind in EVENT_TYPES.items()}


class CommitFeed:
    """A store in memory: only this process writes it, so its engine's commits tell all."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._listener: Any = None

    def start(self, sink: ChangeSink) -> None:
        if self._listener is not None:
            return
        loop = asyncio.get_running_loop()

        def committed(_conn: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(sink.check)

        self._listener = committed
        event.listen(self._engine, "commit", committed)

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            event.remove(self._engine, "commit", listener)

    def active(self, watching: bool) -> None:
        pass

"""`inferq dlq list | show | redrive | purge`: repair what failed without writing scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from inferq.cli_base import InferqCommand, InferqGroup, iso_time, settings

if TYPE_CHECKING:
    from rich.console import Console

    from dlq.store import DeadLetterFilter, DeadLetterStore
    from inferq.settings import Settings
    from jobstore.store import JobStore

app = typer.Typer(
    cls=InferqGroup, help="Dead letters: list, show, redrive, purge.", no_args_is_help=True
)

Model = Annotated[str | None, typer.Option(metavar="NAME", help="only dead letters of this model")]
Code = Annotated[
    str | None, typer.Option(metavar="CODE", help="only this error code, e.g. inference_failed")
]
Since = Annotated[
    datetime | None,
    typer.Option(
        parser=iso_time, metavar="TIME", help="only dead letters from this ISO time (inclusive)"
    ),
]
Until = Annotated[
    datetime | None,
    typer.Option(
        parser=iso_time, metavar="TIME", help="only dead letters before this ISO time (exclusive)"
    ),
]


def _filter(
    model: str | None,
    code: str | None,
    since: datetime | None,
    until: datetime | None,
    include_redriven: bool = False,
) -> DeadLetterFilter:
    from dlq.store import DeadLetterFilter

    return DeadLetterFilter(model, code, since, until, include_redriven)


@contextlib.contextmanager
def _opened(found: Settings) -> Iterator[tuple[JobStore, DeadLetterStore]]:
    from dlq.store import DeadLetterStore
    from inferq.wiring import open_store

    store = open_store(found)
    try:
        letters = DeadLetterStore(store.engine)
        letters.create_schema()
        yield store, letters
    finally:
        store.close()


def _consoles() -> tuple[Console, Console]:
    from rich.console import Console

    return Console(), Console(stderr=True)


@app.command("list", cls=InferqCommand)
def list_letters(
    ctx: typer.Context,
    model: Model = None,
    code: Code = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[
        int, typer.Option(min=1, metavar="N", help="at most this many, newest first")
    ] = 50,
    include_redriven: Annotated[
        bool, typer.Option("--include-redriven", help="also those already redriven")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="the dead-letter resources as JSON")
    ] = False,
) -> int:
    """List dead letters (newest first), with whole ids; says which store it read."""
    from rich.table import Table

    from dlq.http import resource

    console, _ = _consoles()
    with _opened(settings(ctx)) as (store, letters):
        # which store was read, so an empty list is not mistaken for an empty DLQ elsewhere
        url = store.engine.url.render_as_string(hide_password=True)
        print(f"dead letters in {url}", file=sys.stderr)  # plain: never wrapped
        rows = letters.list(_filter(model, code, since, until, include_redriven), limit=limit)
    if as_json:
        print(json.dumps([resource(r).model_dump(mode="json") for r in rows], indent=2))
        return 0
    if not rows:
        console.print("no dead letters match")
        return 0
    table = Table()
    # ids in full even on a narrow terminal: they are what `show` and `redrive` take
    table.add_column("id", no_wrap=True, min_width=max(len(r.id) for r in rows))
    table.add_column("job", no_wrap=True, min_width=max(len(r.job_id or "-") for r in rows))
    for name in ("model", "code", "attempts", "when"):
        table.add_column(name)
    table.add_column("message", overflow="ellipsis", no_wrap=True)
    for r in rows:
        table.add_row(
            r.id,
            r.job_id or "-",
            r.model or "-",
            r.code,
            str(r.attempts),
            r.created_at.isoformat(timespec="seconds"),
            r.message[:60],
        )
    console.print(table)
    return 0


@app.command(cls=InferqCommand)
def show(
    ctx: typer.Context,
    entry: Annotated[
        str, typer.Argument(metavar="ID", help="a dead-letter id, as `list` prints it")
    ],
) -> int:
    """One dead letter, with its reason, its original message and headers."""
    from dlq.http import resource

    console, err = _consoles()
    with _opened(settings(ctx)) as (_store, letters):
        found = letters.get_many([entry])
    if entry not in found:
        err.print(f"[red]no dead letter {entry!r}[/red]")
        return 1
    console.print_json(resource(found[entry], full=True).model_dump_json())
    return 0


@app.command(cls=InferqCommand)
def redrive(
    ctx: typer.Context,
    ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID", help="dead-letter ids (or give a filter, or --all)"),
    ] = None,
    model: Model = None,
    code: Code = None,
    since: Since = None,
    until: Until = None,
    everything: Annotated[bool, typer.Option("--all", help="every waiting dead letter")] = False,
) -> int:
    """Put dead letters back on the jobs topic or queue; a progress bar on bulk redrives."""
    console, err = _consoles()
    f = _filter(model, code, since, until)
    found = settings(ctx)
    with _opened(found) as (store, letters):
        if ids:
            known = letters.get_many(ids)
            missing = [i for i in ids if i not in known]
            if missing:
                err.print(f"[red]not in the dead-letter queue: {', '.join(missing)}[/red]")
                return 1
            chosen = list(dict.fromkeys(ids))
        elif not f.empty or everything:
            chosen = letters.ids(f)
        else:
            err.print(
                "[red]give dead-letter ids, a filter (--model/--code/--since/--until), "
                "or --all[/red]"
            )
            return 2
        if not chosen:
            console.print("no dead letters match; nothing redriven")
            return 0
        return _redrive(console, err, found, letters, store, chosen)


def _redrive(
    console: Console,
    err: Console,
    found: Settings,
    letters: DeadLetterStore,
    store: JobStore,
    ids: list[str],
) -> int:
    from rich.progress import Progress

    from dlq.redrive import Redriver
    from inferq import cli_bus

    try:
        publisher, destination = cli_bus.redrive_publisher(found)
    except cli_bus.BusError as exc:
        err.print(f"[red]{exc}[/red]")
        return 2

    async def go() -> int:
        await publisher.start()
        try:
            blobs = cli_bus.claim_check(found)
            redriver = Redriver(
                letters,
                publisher,
                destination,
                store,
                load_payload=blobs.load_dead_letter if blobs else None,
            )
            with Progress(console=console, transient=False) as progress:
                task = progress.add_task("redriving", total=len(ids))
                report = await redriver.redrive(ids, progress=lambda n: progress.advance(task, n))
        finally:
            await publisher.stop()
        console.print(
            f"redriven {len(report.redriven)}, already redriven "
            f"{len(report.already_redriven)}, failed {len(report.failed)}"
        )
        for entry, why in report.failed.items():
            err.print(f"[red]{entry}: {why}[/red]")
        return 1 if report.failed else 0

    return asyncio.run(go())


def _interactive() -> bool:
    """Someone at a terminal can answer the confirmation."""
    return sys.stdin.isatty()


@app.command(cls=InferqCommand)
def purge(
    ctx: typer.Context,
    model: Model = None,
    code: Code = None,
    since: Since = None,
    until: Until = None,
    everything: Annotated[
        bool, typer.Option("--all", help="purge without a filter: every dead letter")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="don't ask for confirmation")] = False,
) -> int:
    """Delete dead-letter records (a filter, or --all; asks first unless --yes)."""
    from dlq.store import DeadLetterFilter

    console, err = _consoles()
    f = _filter(model, code, since, until)
    if f.empty and not everything:
        err.print(
            "[red]purge without a filter would delete every dead letter: "
            "give --model/--code/--since/--until, or --all[/red]"
        )
        return 2
    with _opened(settings(ctx)) as (_store, letters):
        count = len(letters.ids(DeadLetterFilter(f.model, f.code, f.since, f.until, True)))
        if count == 0:
            console.print("no dead letters match; nothing purged")
            return 0
        if not yes:
            if not _interactive():
                err.print(f"[red]{count} dead letters would be purged; confirm with --yes[/red]")
                return 2
            answer = console.input(f"purge {count} dead letters? \\[y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                console.print("nothing purged")
                return 1
        console.print(f"purged {letters.purge(f)} dead letters")
    return 0

"""`inferq dlq list | show | redrive | purge`: repair what failed without writing scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dlq.http import resource
from dlq.redrive import RedriveJobs, Redriver
from dlq.store import DeadLetterFilter, DeadLetterStore
from inferq.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: list, show, redrive, purge")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model")
        p.add_argument("--code", help="error code, e.g. inference_failed")
        p.add_argument("--since", type=datetime.fromisoformat, help="ISO time, inclusive")
        p.add_argument("--until", type=datetime.fromisoformat, help="ISO time, exclusive")

    ls = dsub.add_parser("list", help="list dead letters (newest first)")
    filters(ls)
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--include-redriven", action="store_true")
    ls.add_argument("--json", action="store_true")
    show = dsub.add_parser("show", help="one dead letter, with its message and headers")
    show.add_argument("id")
    redrive = dsub.add_parser("redrive", help="put dead letters back on the jobs topic")
    redrive.add_argument("ids", nargs="*")
    filters(redrive)
    redrive.add_argument("--all", action="store_true", help="every waiting dead letter")
    purge = dsub.add_parser("purge", help="delete dead-letter records")
    filters(purge)
    purge.add_argument("--all", action="store_true", help="purge without a filter")
    purge.add_argument("--yes", action="store_true", help="don't ask for confirmation")


def _filter(args: argparse.Namespace, *, include_redriven: bool = False) -> DeadLetterFilter:
    return DeadLetterFilter(args.model, args.code, args.since, args.until, include_redriven)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from inferq.wiring import open_store

    store = open_store(settings)
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    console = Console()
    err = Console(stderr=True)
    try:
        command = args.dlq_command
        if command == "list":
            # which store was read, so an empty list is not mistaken for an empty DLQ elsewhere
            url = store.engine.url.render_as_string(hide_password=True)
            print(f"dead letters in {url}", file=sys.stderr)  # plain: never wrapped
            return _list(console, letters, args)
        if command == "show":
            found = letters.get_many([args.id])
            if args.id not in found:
                err.print(f"[red]no dead letter {args.id!r}[/red]")
                return 1
            console.print_json(resource(found[args.id], full=True).model_dump_json())
            return 0
        if command == "purge":
            return _purge(console, err, letters, args)
        return _redrive(console, err, letters, store, settings, args)
    finally:
        store.close()


def _list(console: Console, letters: DeadLetterStore, args: argparse.Namespace) -> int:
    rows = letters.list(_filter(args, include_redriven=args.include_redriven), limit=args.limit)
    if args.json:
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


def _purge(
    console: Console, err: Console, letters: DeadLetterStore, args: argparse.Namespace
) -> int:
    f = _filter(args)
    if f.empty and not args.all:
        err.print(
            "[red]purge without a filter would delete every dead letter: "
            "give --model/--code/--since/--until, or --all[/red]"
        )
        return 2
    count = len(letters.ids(DeadLetterFilter(f.model, f.code, f.since, f.until, True)))
    if count == 0:
        console.print("no dead letters match; nothing purged")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            err.print(f"[red]{count} dead letters would be purged; confirm with --yes[/red]")
            return 2
        answer = console.input(f"purge {count} dead letters? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            console.print("nothing purged")
            return 1
    console.print(f"purged {letters.purge(f)} dead letters")
    return 0


def _redrive(
    console: Console,
    err: Console,
    letters: DeadLetterStore,
    store: RedriveJobs,
    settings: Settings,
    args: argparse.Namespace,
) -> int:
    from inferq.wiring import ConfigError, kafka_config
    from transports.kafka import KafkaPublisher

    f = _filter(args)
    if args.ids:
        found = letters.get_many(args.ids)
        missing = [i for i in args.ids if i not in found]
        if missing:
            err.print(f"[red]not in the dead-letter queue: {', '.join(missing)}[/red]")
            return 1
        ids = list(dict.fromkeys(args.ids))
    elif not f.empty or args.all:
        ids = letters.ids(f)
    else:
        err.print(
            "[red]give dead-letter ids, a filter (--model/--code/--since/--until), or --all[/red]"
        )
        return 2
    if not ids:
        console.print("no dead letters match; nothing redriven")
        return 0
    try:
        config = kafka_config(settings, "inferq-dlq")
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]")
        return 2

    async def go() -> int:
        publisher = KafkaPublisher(config)
        await publisher.start()
        try:
            from inferq.sqs_wiring import claim_check

            blobs = claim_check(settings)
            redriver = Redriver(
                letters,
                publisher,
                settings.kafka_topic,
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

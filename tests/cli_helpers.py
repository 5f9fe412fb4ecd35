"""Helpers for the CLI tests: parse a command line without running it, walk the commands,
seed dead letters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from inferq.cli import app


def _stub_leaves(command: Any, stub: Callable[..., int]) -> None:
    if isinstance(command, TyperGroup):
        for child in command.commands.values():
            _stub_leaves(child, stub)
    else:
        command.callback = stub


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """The parameters that the command's function would be called with. A usage error (an
    unknown command or option, a bad value) raises Typer's ``click.UsageError``."""
    command = typer.main.get_command(app)  # a fresh tree: stubbing it leaves ``app`` alone
    got: dict[str, Any] = {}

    def stub(**params: Any) -> int:
        got.update(params)
        return 0

    _stub_leaves(command, stub)
    command.main(args=list(argv), prog_name="inferq", standalone_mode=False)
    return got


def walk(command: Any | None = None, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the app, groups included: ``(), ("dlq",), ("dlq", "list"), ...``."""
    command = command or typer.main.get_command(app)
    paths = [path]
    if isinstance(command, TyperGroup):
        for name, child in command.commands.items():
            paths.extend(walk(child, (*path, name)))
    return paths


def find(path: Sequence[str]) -> Any:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def seed_dead_letters(data_dir: Path) -> str:
    """Two dead letters in ``data_dir``'s SQLite store (inference_failed for job-1,
    invalid_input for job-2); returns the first one's id."""
    from dlq.router import DeadLetter
    from dlq.store import DeadLetterStore
    from jobstore.store import JobStore
    from transports.base import Delivery

    data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(f"sqlite:///{data_dir / 'jobs.db'}")
    store.create_schema()
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    d = Delivery(b"{}", None, {}, "inferq.jobs", "0@3")
    entry = letters.add(DeadLetter(d, "inference_failed", "boom", "job-1", "minilm"))
    letters.add(DeadLetter(d, "invalid_input", "bad", "job-2", "minilm"))
    store.close()
    return entry

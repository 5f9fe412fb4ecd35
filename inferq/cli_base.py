"""What every ``inferq`` command shares: ``--data-dir`` and ``-v`` before or after any
(sub)command, the settings (read once, with the bus of a running ``inferq dev``), logging and
exit codes. The commands themselves live in ``cli.py``, ``dlq_cli.py`` and ``webhooks_cli.py``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer.core import TyperCommand, TyperGroup

from inferq import devinfo
from inferq.settings import Settings

COMMON_PANEL = "Common options (before or after the command)"
# where the common options are kept: the root context's meta, so the one given last wins
_DATA_DIR = "inferq.data_dir"
_VERBOSE = "inferq.verbose"
_NOISY_LOGGERS = ("aiokafka", "botocore", "boto3", "urllib3")


class SettingsError(Exception):
    """The environment holds a setting that cannot be used; names the variable."""


def _keep_data_dir(ctx: typer.Context, value: Path | None) -> None:
    if value is not None:
        ctx.find_root().meta[_DATA_DIR] = value


def _keep_verbose(ctx: typer.Context, value: bool) -> None:
    if value:
        ctx.find_root().meta[_VERBOSE] = True


@functools.cache
def _common_params() -> tuple[Any, ...]:
    """``--data-dir`` and ``-v``, built by Typer itself so that its help shows them."""
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def common(
        data_dir: Annotated[
            Path | None,
            typer.Option(
                "--data-dir",
                metavar="DIR",
                help="data directory (INFERQ_DATA_DIR; default .inferq)",
                callback=_keep_data_dir,
                expose_value=False,
                rich_help_panel=COMMON_PANEL,
            ),
        ] = None,
        verbose: Annotated[
            bool,
            typer.Option(
                "-v",
                "--verbose",
                help="debug logging",
                callback=_keep_verbose,
                expose_value=False,
                rich_help_panel=COMMON_PANEL,
            ),
        ] = False,
    ) -> None:
        """Never run: only its parameters are used."""

    return tuple(typer.main.get_command(probe).params)


def _add_common(command: TyperCommand | TyperGroup) -> None:
    known = {o for p in command.params for o in getattr(p, "opts", ())}
    command.params.extend(p for p in _common_params() if not known & set(p.opts))


class InferqGroup(TyperGroup):
    """A command group that takes the common options too: ``inferq dlq --data-dir X list``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _add_common(self)


class InferqCommand(TyperCommand):
    """A command that takes the common options, sets up logging, and exits with the code its
    function returns; an unusable setting is exit 2 with the variable named."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_common(self)

    def invoke(self, ctx: Any) -> Any:  # Typer's own click.Context
        logging.basicConfig(
            level=logging.DEBUG if verbose(ctx) else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in _NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            code = super().invoke(ctx)
        except SettingsError as exc:
            print(f"inferq {command_name(ctx)}: invalid setting: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        if isinstance(code, int) and code:
            raise typer.Exit(code)
        return code


def command_name(ctx: typer.Context) -> str:
    """The top-level command being run (``dlq`` for ``inferq dlq list``), for messages."""
    names: list[str] = []
    node: Any = ctx
    while node is not None:
        names.append(node.info_name or "inferq")
        node = node.parent
    return names[-2] if len(names) > 1 else names[0]


def verbose(ctx: typer.Context) -> bool:
    """``-v`` was given, anywhere on the command line."""
    return bool(ctx.find_root().meta.get(_VERBOSE, False))


def settings(ctx: typer.Context, *, dev_bus: bool = True) -> Settings:
    """The settings of this command: the environment, ``--data-dir``, and (``dev_bus``) the bus
    of an ``inferq dev`` running on the same data dir, for every variable that is not set."""
    data_dir: Path | None = ctx.find_root().meta.get(_DATA_DIR)
    found = _read_settings(data_dir)
    if not dev_bus:
        return found
    info = devinfo.read(found.data_dir)
    if info is None:
        return found
    missing = {k: v for k, v in info.env.items() if k not in os.environ}
    if not missing:
        return found
    # the composition root: read once, below, like any setting (boto3 reads its own AWS_* too)
    os.environ.update(missing)
    print(
        f"inferq {command_name(ctx)}: using the bus of inferq dev (pid {info.pid}) from "
        f"{found.data_dir / devinfo.FILE}",
        file=sys.stderr,
    )
    return _read_settings(data_dir)


def _read_settings(data_dir: Path | None) -> Settings:
    overrides = {} if data_dir is None else {"data_dir": data_dir}
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "INFERQ_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
        raise SettingsError("; ".join(problems)) from exc


def iso_time(value: str | datetime) -> datetime:
    """An ISO 8601 time, e.g. ``2026-11-20T00:00`` (a Typer ``parser``: bad input is a usage
    error naming the option)."""
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-11-20T00:00)"
        ) from None

"""`inferq webhooks disabled | enable URL`: endpoints that answered 410 Gone, brought back."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from inferq.cli_base import InferqCommand, InferqGroup, settings

if TYPE_CHECKING:
    from jobstore.outbox import WebhookOutbox

app = typer.Typer(
    cls=InferqGroup, help="Webhook endpoints disabled by 410 Gone.", no_args_is_help=True
)


@contextlib.contextmanager
def _outbox(ctx: typer.Context) -> Iterator[WebhookOutbox]:
    from inferq.wiring import open_store
    from jobstore.outbox import WebhookOutbox

    store = open_store(settings(ctx))
    try:
        yield WebhookOutbox(store.engine, writer=store.writer)
    finally:
        store.close()


@app.command(cls=InferqCommand)
def disabled(ctx: typer.Context) -> int:
    """List the disabled endpoints."""
    with _outbox(ctx) as outbox:
        endpoints = outbox.disabled_endpoints()
    for e in endpoints:
        print(f"{e.url}\tdisabled {e.disabled_at.isoformat()}\t{e.reason}")
    if not endpoints:
        print("no disabled endpoints")
    return 0


@app.command(cls=InferqCommand)
def enable(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(metavar="URL", help="the URL exactly as the jobs gave it")],
) -> int:
    """Send to a disabled endpoint again (replay jobs to resend their events)."""
    with _outbox(ctx) as outbox:
        enabled = outbox.enable_endpoint(url)
    if enabled is None:
        print(f"inferq webhooks enable: {url} is not disabled", file=sys.stderr)
        return 1
    print(f"enabled {enabled.url} (disabled {enabled.disabled_at.isoformat()}: {enabled.reason})")
    return 0

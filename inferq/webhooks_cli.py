"""`inferq webhooks disabled | enable URL`: endpoints that answered 410 Gone, brought back."""

from __future__ import annotations

import argparse
import sys

from inferq.settings import Settings
from jobstore.outbox import WebhookOutbox


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    webhooks = sub.add_parser("webhooks", help="webhook endpoints disabled by 410 Gone")
    wsub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    wsub.add_parser("disabled", help="list the disabled endpoints")
    enable = wsub.add_parser(
        "enable", help="send to a disabled endpoint again (replay jobs to resend their events)"
    )
    enable.add_argument("url", help="the URL exactly as the jobs gave it")
    return webhooks


def run(args: argparse.Namespace, settings: Settings) -> int:
    from inferq.wiring import open_store

    store = open_store(settings)
    try:
        outbox = WebhookOutbox(store.engine, writer=store.writer)
        if args.webhooks_command == "disabled":
            endpoints = outbox.disabled_endpoints()
            for e in endpoints:
                print(f"{e.url}\tdisabled {e.disabled_at.isoformat()}\t{e.reason}")
            if not endpoints:
                print("no disabled endpoints")
            return 0
        enabled = outbox.enable_endpoint(args.url)
        if enabled is None:
            print(f"inferq webhooks enable: {args.url} is not disabled", file=sys.stderr)
            return 1
        print(
            f"enabled {enabled.url} (disabled {enabled.disabled_at.isoformat()}: {enabled.reason})"
        )
        return 0
    finally:
        store.close()

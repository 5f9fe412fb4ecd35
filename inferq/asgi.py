"""The ASGI factory of ``inferq api --workers N``: uvicorn starts N processes that each
import this module and call ``create_app``, which reads the settings from the environment
the parent process left (once per process) and builds that process's own app: its own
store connections, publisher and metrics. The parent prepared the bus and the schema."""

from __future__ import annotations

from fastapi import FastAPI

from inferq.settings import Settings


def create_app() -> FastAPI:
    from inferq.wiring import build_api

    # uvicorn calls this inside its running event loop: no second asyncio.run here
    return build_api(Settings(), prepared=True)

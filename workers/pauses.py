"""Waits of the worker's side loops: until stop, a wake-up, or a timeout, whichever is first."""

from __future__ import annotations

import asyncio


async def pause(seconds: float, *events: asyncio.Event) -> None:
    """Return once any of ``events`` is set or ``seconds`` have passed."""
    if any(e.is_set() for e in events):
        return
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()

"""`inferq dev` and the webhook handoff (issue 10): the roles hand webhooks to the control
plane over Redis when dev uses Redis; on the server-less fallback broker (polled, no faster
than the dispatcher) they leave them to the dispatcher."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from inferq.dev import DevOptions, _Bus, _Ports, _roles
from inferq.settings import Settings
from webhooks.receiver import closed_port


def _envs(settings: Settings) -> dict[str, Mapping[str, str]]:
    bus: Any = _Bus(transport=None, server=None, env={})  # type: ignore[arg-type]
    roles = _roles(settings, DevOptions(workers=1), bus, _Ports())
    return {role.name: role.env for role in roles}


def test_without_redis_dev_turns_the_handoff_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INFERQ_WEBHOOK_HANDOFF", raising=False)
    settings = Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    envs = _envs(settings)
    assert envs["control"]["INFERQ_REDIS_URL"].startswith("sqla+sqlite:///")
    for name in ("api", "worker-0"):
        assert envs[name]["INFERQ_WEBHOOK_HANDOFF"] == "false"


@pytest.mark.redis
def test_with_redis_dev_keeps_the_handoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.delenv("INFERQ_WEBHOOK_HANDOFF", raising=False)
    envs = _envs(Settings(data_dir=tmp_path, redis_url=redis_url))
    assert envs["control"]["INFERQ_REDIS_URL"] == redis_url
    for name in ("api", "worker-0"):
        assert "INFERQ_WEBHOOK_HANDOFF" not in envs[name]

"""The command line: clear start-up errors instead of stack traces."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _inferq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("INFERQ_MAX_BACKLOG", "lots"),
        ("INFERQ_KAFKA_PARTITIONS", "0"),
        ("INFERQ_TRANSPORT", "carrier-pigeon"),
    ],
)
def test_bad_setting_names_the_variable(variable: str, value: str) -> None:
    result = _inferq("models", "list", env={variable: value})
    assert result.returncode == 2
    assert variable in result.stderr and value in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_without_a_broker_says_what_to_set(tmp_path, model_repo) -> None:
    result = _inferq(
        "--data-dir",
        str(tmp_path),
        "worker",
        env={
            "INFERQ_KAFKA_BOOTSTRAP": "",
            "INFERQ_WORKER_METRICS_PORT": "0",
            "INFERQ_MODEL_REPOSITORY": str(model_repo),
        },
    )
    assert result.returncode == 2
    assert "INFERQ_KAFKA_BOOTSTRAP" in result.stderr and "Traceback" not in result.stderr


def test_worker_without_models_says_how_to_build_them(tmp_path) -> None:
    result = _inferq(
        "--data-dir",
        str(tmp_path),
        "worker",
        env={"INFERQ_KAFKA_BOOTSTRAP": "127.0.0.1:1", "INFERQ_WORKER_METRICS_PORT": "0"},
    )
    assert result.returncode == 2
    assert "inferq models build" in result.stderr and "Traceback" not in result.stderr


def test_api_without_a_broker_says_what_to_set(tmp_path) -> None:
    result = _inferq("--data-dir", str(tmp_path), "api", env={"INFERQ_KAFKA_BOOTSTRAP": ""})
    assert result.returncode == 2
    assert "INFERQ_KAFKA_BOOTSTRAP" in result.stderr and "Traceback" not in result.stderr

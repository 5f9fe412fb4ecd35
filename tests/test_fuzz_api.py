"""Property-based HTTP fuzzing of the whole API, driven by its own OpenAPI document.

schemathesis runs every operation through its examples, coverage, fuzzing and stateful
phases with every check: no 5xx, no response outside its schema, no undocumented status
code or header, 405 with a full Allow header, negative data rejected. It runs against a real
API process on PostgreSQL and a Kafka-protocol broker, because several of the bugs it finds
(NUL in text, bigint overflow) exist only there.

The budget is small enough for CI on two busy cores; `make fuzz` runs a larger one
(INFERQ_FUZZ_MAX_EXAMPLES). A failure prints schemathesis's report and the seed that
reproduces it (INFERQ_FUZZ_SEED).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlq.router import DeadLetter
from dlq.store import DeadLetterStore
from jobstore.store import JobStore
from tests.fixtures_servers import fresh_database
from tests.procs import Stack
from transports.base import Delivery
from transports.kafka import EmbeddedKafka

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka]

MAX_EXAMPLES = int(os.environ.get("INFERQ_FUZZ_MAX_EXAMPLES", "50"))
CONFIG = Path(__file__).with_name("schemathesis.toml")
RUN_TIMEOUT_S = int(os.environ.get("INFERQ_FUZZ_TIMEOUT_S", "240"))


@pytest.fixture
def fuzz_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for the run, dropped afterwards."""
    with fresh_database(postgres_url, "inferq_fuzz") as url:
        yield url


def _seed_dead_letters(database_url: str, topic: str) -> str:
    """Dead letters to show and redrive (one whose payload no JSON answer could carry as
    JSON), so the DLQ operations reach past 404."""
    store = JobStore(database_url)
    letters = DeadLetterStore(store.engine)
    letters.create_schema()
    payloads = [b'{"model": "identity", "input": {"tensor": [1]}}', b'{"k": "\\ud83d"}', b"\xff"]
    ids = []
    for i, payload in enumerate(payloads):
        delivery = Delivery(value=payload, key=None, headers={}, source=topic, position=f"0@{i}")
        ids.append(
            letters.add(
                DeadLetter(delivery, "invalid_input", "seeded", None, "identity", "1", "Seed", 1)
            )
        )
    store.close()
    return ids[1]


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_schemathesis_finds_nothing_on_postgres_and_kafka(
    tmp_path: Path,
    kafka_broker: EmbeddedKafka,
    topic: str,
    model_repo: Path,
    fuzz_database: str,
) -> None:
    stack = Stack(tmp_path, kafka_broker.bootstrap, topic, model_repo, database_url=fuzz_database)
    seed = int(os.environ.get("INFERQ_FUZZ_SEED", random.randrange(2**31)))
    try:
        _, url = stack.api()
        entry = _seed_dead_letters(fuzz_database, topic)
        # nothing in the API creates a dead letter, so show one that exists (the worst one)
        config = tmp_path / "schemathesis.toml"
        config.write_text(
            CONFIG.read_text() + "\n[[operations]]\n"
            'include-name = "GET /v1/dlq/{entry_id}"\n'
            f'parameters = {{ "path.entry_id" = "{entry}" }}\n'
        )
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(seed),
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--generation-database",
            "none",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / "report"),
        ]
        try:
            run = subprocess.run(
                command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            pytest.fail(f"schemathesis ran past {RUN_TIMEOUT_S}s (seed {seed}):\n{out[-6000:]}")
        print(run.stdout[-3000:])  # the summary, in the log of a passing run too
        assert run.returncode == 0, (
            f"schemathesis found failures (INFERQ_FUZZ_SEED={seed}):\n{run.stdout[-12000:]}\n"
            f"{run.stderr[-3000:]}\n{stack.log('api')}"
        )
        assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]
    finally:
        stack.stop_all()

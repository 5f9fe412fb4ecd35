"""The command line: clear start-up errors instead of stack traces."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli_helpers import seed_dead_letters


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
        # the in-memory bus lives inside one process: API and worker could never meet on it
        ("INFERQ_TRANSPORT", "memory"),
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


def test_dlq_cli_list_show_and_the_bad_inputs(tmp_path) -> None:
    entry = seed_dead_letters(tmp_path)
    listed = _inferq("--data-dir", str(tmp_path), "dlq", "list", "--json")
    assert listed.returncode == 0
    assert {d["code"] for d in __import__("json").loads(listed.stdout)} == {
        "inference_failed",
        "invalid_input",
    }
    shown = _inferq("--data-dir", str(tmp_path), "dlq", "show", entry)
    assert shown.returncode == 0 and "job-1" in shown.stdout
    # redrive of an id that is not in the DLQ
    r = _inferq("--data-dir", str(tmp_path), "dlq", "redrive", "not-there")
    assert r.returncode == 1 and "not-there" in r.stderr
    # a filter that matches nothing
    r = _inferq("--data-dir", str(tmp_path), "dlq", "redrive", "--model", "nothing")
    assert r.returncode == 0 and "nothing redriven" in r.stdout
    # purge without a filter refuses; --all without --yes and no terminal refuses too
    r = _inferq("--data-dir", str(tmp_path), "dlq", "purge")
    assert r.returncode == 2 and "--all" in r.stderr
    r = _inferq("--data-dir", str(tmp_path), "dlq", "purge", "--all")
    assert r.returncode == 2 and "--yes" in r.stderr
    r = _inferq("--data-dir", str(tmp_path), "dlq", "purge", "--code", "invalid_input", "--yes")
    assert r.returncode == 0 and "purged 1" in r.stdout
    left = _inferq("--data-dir", str(tmp_path), "dlq", "list", "--json")
    assert [d["code"] for d in __import__("json").loads(left.stdout)] == ["inference_failed"]


def test_dlq_list_prints_whole_ids_on_a_narrow_terminal_and_names_its_store(tmp_path) -> None:
    entry = seed_dead_letters(tmp_path)
    # the data dir after the subcommand, as people type it
    listed = _inferq("dlq", "list", "--data-dir", str(tmp_path), env={"COLUMNS": "60"})
    assert listed.returncode == 0, listed.stderr
    assert entry in listed.stdout and "job-1" in listed.stdout
    assert str(tmp_path / "jobs.db") in listed.stderr
    shown = _inferq("dlq", "show", entry, "--data-dir", str(tmp_path))
    assert shown.returncode == 0 and "job-1" in shown.stdout


def test_commands_find_the_bus_of_a_running_dev_on_the_same_data_dir(tmp_path) -> None:
    import os

    from inferq import devinfo

    tmp_path.mkdir(exist_ok=True)
    # a dev that is running (this test's own pid stands for it) on an address nothing serves
    info = devinfo.DevInfo(
        pid=os.getpid(), env={"INFERQ_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, api="http://x"
    )
    devinfo.write(tmp_path, info)
    r = _inferq("api", "--data-dir", str(tmp_path), env={"INFERQ_KAFKA_BOOTSTRAP": ""})
    # an empty variable is still a set one: it wins, and says what to set
    assert r.returncode == 2 and "INFERQ_KAFKA_BOOTSTRAP" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "INFERQ_KAFKA_BOOTSTRAP"}
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "inferq", "topics", "create", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=90,
    )  # fmt: skip
    assert "using the bus of inferq dev" in done.stderr, done.stderr
    assert "127.0.0.1:1" in done.stderr + done.stdout  # it tried dev's broker
    # once dev is gone (a pid that does not run), the file is ignored
    devinfo.write(tmp_path, devinfo.DevInfo(pid=2**22 + 7, env=info.env, api="http://x"))
    assert devinfo.read(tmp_path) is None


def test_bad_input_is_a_usage_error_naming_the_option_not_a_traceback(tmp_path) -> None:
    for args, option in [
        (["dlq", "list", "--limit", "lots"], "--limit"),
        (["dlq", "list", "--since", "yesterday"], "--since"),
        (["dev", "--transport", "carrier-pigeon"], "--transport"),
        (["api", "--no-such-option"], "--no-such-option"),
    ]:
        r = _inferq("--data-dir", str(tmp_path), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert option in r.stderr and "Usage: inferq" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    missing = _inferq()  # no command at all: the usage, and exit 2 as before
    assert missing.returncode == 2 and "Usage: inferq" in missing.stdout + missing.stderr
    shown = _inferq("--help")
    assert shown.returncode == 0 and "dlq" in shown.stdout and "--data-dir" in shown.stdout

"""The Typer app in-process (CliRunner): common options in every position, help everywhere,
usage errors, exit codes, the bus of a running ``inferq dev``, dead-letter commands."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferq import cli_base, cli_bus, devinfo, dlq_cli
from inferq.cli import app, main
from inferq.settings import Settings
from tests.cli_helpers import find, parse, seed_dead_letters, walk

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# what a running dev hands out; the runner restores these after each command
BUS_VARIABLES = {"INFERQ_TRANSPORT": None, "INFERQ_KAFKA_BOOTSTRAP": None}


def invoke(*args: str, **kwargs: Any) -> Any:
    return runner.invoke(app, list(args), env={**BUS_VARIABLES, **kwargs.pop("env", {})}, **kwargs)


# --- --data-dir and -v, before or after any (sub)command -------------------------------------


@pytest.mark.parametrize(
    "position",
    [
        lambda d: ["--data-dir", d, "dlq", "list"],
        lambda d: ["dlq", "--data-dir", d, "list"],
        lambda d: ["dlq", "list", "--data-dir", d],
        # given twice, the one nearer the end wins (as with argparse before)
        lambda d: ["--data-dir", "/nowhere", "dlq", "list", "--data-dir", d],
    ],
    ids=["before", "between", "after", "last-wins"],
)
def test_data_dir_works_before_and_after_the_subcommand(tmp_path: Path, position: Any) -> None:
    entry = seed_dead_letters(tmp_path)
    result = invoke(*position(str(tmp_path)))
    assert result.exit_code == 0, result.output
    assert f"dead letters in sqlite:///{tmp_path / 'jobs.db'}" in result.stderr
    assert entry in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-v", "dlq", "list"],
        ["dlq", "-v", "list"],
        ["dlq", "list", "-v"],
        ["dlq", "list", "--verbose"],
    ],
)
def test_verbose_works_before_and_after_the_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    assert invoke(*args, "--data-dir", str(tmp_path)).exit_code == 0
    assert invoke("dlq", "list", "--data-dir", str(tmp_path)).exit_code == 0
    assert levels == [logging.DEBUG, logging.INFO]


def test_every_command_and_group_takes_the_common_options() -> None:
    for path in walk():
        opts = {o for p in find(path).params for o in p.opts}
        assert {"--data-dir", "-v", "--verbose"} <= opts, path


# --- help --------------------------------------------------------------------------------------


def test_every_option_and_argument_has_help_and_every_help_page_renders() -> None:
    for path in walk():
        command = find(path)
        assert command.help, f"inferq {' '.join(path)} has no help text"
        for param in command.params:
            assert getattr(param, "help", None), f"inferq {' '.join(path)}: {param.name}"
        result = invoke(*path, "--help")
        assert result.exit_code == 0, result.output
        assert f"Usage: inferq {' '.join(path)}".rstrip() in result.stdout
        for param in command.params:
            assert param.opts[0] in result.stdout or (param.metavar or "") in result.stdout
        if hasattr(command, "commands"):
            assert all(name in result.stdout for name in command.commands), path
    assert invoke("-h").exit_code == 0  # -h, as argparse had it


def _documented_invocations() -> list[list[str]]:
    """Every `inferq ...` in README.md (code blocks and inline), placeholders filled in, plus
    the Makefile's and the options the prose names."""
    readme = (ROOT / "README.md").read_text()
    found = re.findall(r"^(?:[A-Z_]+=\S+ )*inferq ([^#\n]*)", readme, flags=re.M)
    found += re.findall(r"`inferq ([a-z][^`]*)`", readme)
    found += ["models build", "dev --port 8080"]  # the Makefile
    found += [
        "control --no-beat",
        "control --local-broker-fallback --concurrency 8",
        "dev --port 8001 --kafka-port 19093 --workers 2 --no-build",
        "dev --transport sqs --aws-port 15001",
        "models build --repository /models --force",
        "dlq list --include-redriven --limit 5 --json --until 2026-11-21",
        "dlq redrive --all",
        "dlq purge --all --yes",
    ]
    subs = {"<id>": "dl-1", "URL": "https://hooks.example.com/x", "...": ""}
    out = []
    for line in found:
        for placeholder, value in subs.items():
            line = line.replace(placeholder, value)
        out.append(line.split())
    return out


def test_every_documented_invocation_parses() -> None:
    invocations = _documented_invocations()
    assert ["dlq", "show", "dl-1"] in invocations and ["webhooks", "disabled"] in invocations
    for argv in invocations:
        parse(argv)  # raises on an unknown command, option or bad value
    got = parse(["dlq", "list", "--model", "minilm", "--since", "2026-11-20T00:00"])
    assert got["model"] == "minilm" and got["since"].isoformat() == "2026-11-20T00:00:00"
    assert parse(["dev", "--transport", "sqs"])["transport"] == "sqs"
    assert parse(["dlq", "redrive", "a", "b"])["ids"] == ["a", "b"]


# --- bad input, exit codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["dlq", "list", "--bogus"], "--bogus"),
        (["dlq", "list", "--limit", "0"], "--limit"),
        (["dlq", "purge", "--until", "next week"], "--until"),
        (["dev", "--port", "http"], "--port"),
        (["dev", "--transport", "memory"], "--transport"),
        (["webhooks", "enable"], "URL"),
        (["nope"], "nope"),
    ],
)
def test_bad_input_is_a_usage_error_that_names_it(args: list[str], named: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "Usage: inferq" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_main_answers_the_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--data-dir", str(tmp_path), "dlq", "list"]) == 0
    assert main(["dlq", "show", "missing", "--data-dir", str(tmp_path)]) == 1
    assert main(["dlq", "list", "--bogus"]) == 2
    assert main([]) == 2

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dlq_cli, "_opened", interrupted)
    assert main(["dlq", "list", "--data-dir", str(tmp_path)]) == 130


def test_a_bad_setting_names_the_variable(tmp_path: Path) -> None:
    result = invoke("models", "list", env={"INFERQ_RETRY_MAX_ATTEMPTS": "0"})
    assert result.exit_code == 2
    assert "inferq models: invalid setting: INFERQ_RETRY_MAX_ATTEMPTS=" in result.stderr


# --- the bus of a running inferq dev ------------------------------------------------------------


def test_commands_use_the_bus_of_a_running_dev_and_redrive_onto_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transports.memory import MemoryBroker, MemoryPublisher

    seed_dead_letters(tmp_path)
    devinfo.write(
        tmp_path,
        devinfo.DevInfo(pid=os.getpid(), env={"INFERQ_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, api="x"),
    )
    broker = MemoryBroker()
    used: list[Settings] = []

    def redrive_publisher(settings: Settings) -> tuple[MemoryPublisher, str]:
        used.append(settings)
        return MemoryPublisher(broker), "jobs-here"

    monkeypatch.setattr(cli_bus, "redrive_publisher", redrive_publisher)
    result = invoke("dlq", "redrive", "--all", "--data-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"inferq dlq: using the bus of inferq dev (pid {os.getpid()})" in result.stderr
    assert "redriven 2, already redriven 0, failed 0" in result.stdout
    assert [s.kafka_bootstrap for s in used] == ["127.0.0.1:1"]
    assert len(broker.messages("jobs-here")) == 2
    # a variable that is set wins over dev's, and nothing is said
    again = invoke(
        "dlq", "list", "--data-dir", str(tmp_path), env={"INFERQ_KAFKA_BOOTSTRAP": "elsewhere:9"}
    )
    assert again.exit_code == 0 and "using the bus" not in again.stderr
    assert "INFERQ_KAFKA_BOOTSTRAP" not in os.environ or os.environ["INFERQ_KAFKA_BOOTSTRAP"] != (
        "127.0.0.1:1"
    )  # the runner put the environment back


def test_dev_itself_ignores_dev_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devinfo.write(
        tmp_path,
        devinfo.DevInfo(pid=os.getpid(), env={"INFERQ_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, api="x"),
    )
    seen: list[Any] = []

    def run_dev(settings: Settings, options: Any) -> int:
        seen.append((settings, options))
        return 0

    monkeypatch.setattr("inferq.dev.run_dev", run_dev)
    result = invoke("dev", "--data-dir", str(tmp_path), "--port", "8123", "--no-build")
    assert result.exit_code == 0, result.output
    ((settings, options),) = seen
    assert settings.kafka_bootstrap is None and settings.data_dir == tmp_path.resolve()
    assert options.port == 8123 and not options.build_models and options.transport == "kafka"


# --- dead letters --------------------------------------------------------------------------------


def test_dlq_list_prints_whole_ids_that_show_accepts(tmp_path: Path) -> None:
    entry = seed_dead_letters(tmp_path)
    listed = invoke("dlq", "list", "--data-dir", str(tmp_path), env={"COLUMNS": "50"})
    assert listed.exit_code == 0, listed.output
    ids = [i for i in re.findall(r"\S+", listed.stdout) if len(i) == len(entry)]
    assert entry in ids
    for shown_id in {entry}:
        assert invoke("dlq", "show", shown_id, "--data-dir", str(tmp_path)).exit_code == 0
    only = invoke("dlq", "list", "--code", "invalid_input", "--json", "--data-dir", str(tmp_path))
    assert '"invalid_input"' in only.stdout and '"inference_failed"' not in only.stdout


def test_purge_asks_at_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_dead_letters(tmp_path)
    monkeypatch.setattr(dlq_cli, "_interactive", lambda: True)
    no = invoke("dlq", "purge", "--all", "--data-dir", str(tmp_path), input="n\n")
    assert no.exit_code == 1 and "purge 2 dead letters? [y/N]" in no.stdout
    assert "nothing purged" in no.stdout
    yes = invoke("dlq", "purge", "--all", "--data-dir", str(tmp_path), input="y\n")
    assert yes.exit_code == 0 and "purged 2 dead letters" in yes.stdout


def test_redrive_needs_ids_a_filter_or_all(tmp_path: Path) -> None:
    seed_dead_letters(tmp_path)
    result = invoke("dlq", "redrive", "--data-dir", str(tmp_path))
    assert result.exit_code == 2 and "--all" in result.stderr


def test_iso_time_accepts_what_the_readme_shows() -> None:
    assert cli_base.iso_time("2026-11-20T00:00").isoformat() == "2026-11-20T00:00:00"
    assert cli_base.iso_time("2026-11-20T00:00+00:00").tzinfo is not None


def test_without_a_bus_redrive_and_topics_create_say_what_to_set(tmp_path: Path) -> None:
    seed_dead_letters(tmp_path)
    redriven = invoke("dlq", "redrive", "--all", "--data-dir", str(tmp_path))
    assert redriven.exit_code == 2 and "INFERQ_KAFKA_BOOTSTRAP" in redriven.stderr
    created = invoke("topics", "create", "--data-dir", str(tmp_path))
    assert created.exit_code == 2
    assert "inferq topics create: INFERQ_KAFKA_BOOTSTRAP is not set" in created.stderr

"""The dev supervisor with real (tiny) child processes: restarts with backoff, the crash loop
declared and kept reported, the stop order; and `inferq dev` refusing a busy port it was given."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferq.supervisor import Backoff, Role, Supervisor
from tests.procs import wait_for

FAST = Backoff(
    initial_s=0.05, factor=2, max_s=0.2, stable_s=30, loop_restarts=4, loop_window_s=30,
    loop_retry_s=0.4,
)  # fmt: skip


INFERQ = (sys.executable, "-m", "inferq")


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _run_until(sup: Supervisor, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.poll()
        if callable(check) and check():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s")


def test_a_crashing_role_is_restarted_with_backoff_then_reported_as_a_crash_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferq.dev")
    sup = Supervisor([Role("crasher", _python("raise SystemExit(3)"), dict(os.environ), 0)], FAST)
    sup.start_all()
    try:
        _run_until(sup, lambda: sup.restarts().get("crasher", 0) >= 6, 30)
    finally:
        sup.stop()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "crasher" in r.getMessage()]
    exits = [(level, m) for level, m in lines if "exited with code 3" in m]
    delays = [float(re.search(r"in ([\d.]+)s$", m).group(1)) for _, m in exits]  # type: ignore[union-attr]
    # 0.05, 0.1, 0.2 (the cap), then the crash loop's slow retry from the 4th restart on
    assert delays[:6] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4], lines
    assert [level for level, _ in exits[:6]] == ["WARNING"] * 3 + ["ERROR"] * 3, lines
    assert [f"restart #{n} " in m for n, (_, m) in enumerate(exits[:6], 1)] == [True] * 6
    declared = [m for level, m in lines if level == "ERROR" and "CRASH LOOP" in m]
    assert len(declared) == 1 and "4 restarts" in declared[0], lines
    assert all("still crash-looping" in m for _, m in exits[3:6]), lines
    assert sup.crash_looping() == ["crasher"]


def test_a_role_that_recovers_leaves_the_crash_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inferq.dev")
    starts = tmp_path / "starts"
    # crashes on its first 5 starts (say, until a fix is saved), then keeps running
    code = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(starts)!r})\n"
        "n = len(p.read_text()) if p.exists() else 0\n"
        "p.write_text('x' * (n + 1))\n"
        "sys.exit(1) if n < 5 else time.sleep(60)\n"
    )
    backoff = Backoff(initial_s=0.05, max_s=0.1, stable_s=0.5, loop_restarts=3, loop_retry_s=0.1)
    sup = Supervisor([Role("flaky", _python(code), {}, 0)], backoff)
    sup.start_all()
    try:
        _run_until(sup, lambda: sup.crash_looping() == ["flaky"], 20)
        _run_until(sup, lambda: sup.restarts()["flaky"] == 5 and sup.crash_looping() == [], 20)
        assert "flaky" in sup.pids()
    finally:
        sup.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("flaky has run" in m and "no longer in a crash loop" in m for m in messages)


def test_a_killed_role_is_reported_by_signal_and_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="inferq.dev")
    sup = Supervisor([Role("sleeper", _python("import time; time.sleep(60)"), {}, 0)], FAST)
    sup.start_all()
    try:
        first = sup.pids()["sleeper"]
        os.kill(first, signal.SIGKILL)
        _run_until(sup, lambda: sup.pids().get("sleeper", first) != first, 10)
    finally:
        sup.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        f"sleeper (pid {first}) was killed by signal SIGKILL" in m and "restart #1" in m
        for m in messages
    ), messages
    assert sup.crash_looping() == []


def test_stop_goes_stage_by_stage_each_waited_for(tmp_path: Path) -> None:
    record = tmp_path / "order"
    # each role takes a while to stop, so a stage not waited for would interleave
    code = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(0.3)\n"
        f"    open({str(record)!r}, 'a').write(sys.argv[1] + '\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"open({str(tmp_path)!r} + '/ready-' + sys.argv[1], 'w').close()\n"
        "time.sleep(60)\n"
    )
    names = [("control", 2), ("worker-0", 1), ("api", 0), ("worker-1", 1)]
    roles = [Role(name, (*_python(code), name), {}, stage) for name, stage in names]
    sup = Supervisor(roles, FAST)
    sup.start_all()
    ready = [tmp_path / f"ready-{name}" for name, _ in names]
    wait_for(lambda: all(p.exists() for p in ready), 30, "every role's SIGTERM handler")
    sup.stop(timeout_s=10)
    order = record.read_text().split()
    assert order[0] == "api" and set(order[1:3]) == {"worker-0", "worker-1"}, order
    assert order[3] == "control", order
    assert sup.pids() == {}


@pytest.mark.parametrize("how", ["timeout", "second ctrl-c"])
def test_a_stuck_role_is_killed(how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inferq.dev")
    ready = tmp_path / "ready"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    sup = Supervisor([Role("stuck", _python(code), {}, 0)], FAST)
    sup.start_all()
    wait_for(ready.exists, 30, "the role to ignore SIGTERM")
    started = time.monotonic()
    if how == "timeout":
        sup.stop(timeout_s=1)
    else:
        sup.stop(timeout_s=60, force=lambda: time.monotonic() - started > 0.5)
    assert time.monotonic() - started < 5
    assert any("did not stop in time; killing it" in r.getMessage() for r in caplog.records)
    assert any(
        "stopped stuck: it was killed by signal SIGKILL" in r.getMessage() for r in caplog.records
    )


@pytest.mark.slow  # imports the whole stack
def test_dev_refuses_a_busy_port_it_was_given(tmp_path: Path, model_repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, INFERQ_MODEL_REPOSITORY=str(model_repo))
        env.pop("INFERQ_KAFKA_BOOTSTRAP", None)
        result = subprocess.run(
            [*INFERQ, "--data-dir", str(tmp_path), "dev", "--no-build", "--kafka-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result
    assert f"port {port} for the Kafka broker is in use" in result.stdout, result
    assert "--kafka-port" in result.stdout
    assert not (tmp_path / "kafka").exists(), "a broker was started anyway"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # exited; nobody may reap it in a container


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_roles_do_not_outlive_a_killed_dev(tmp_path: Path) -> None:
    parent = (
        "import os, sys, time\n"
        "from inferq.supervisor import Role, Supervisor\n"
        "sleeper = (sys.executable, '-c', 'import time; time.sleep(60)')\n"
        "sup = Supervisor([Role('sleeper', sleeper, dict(os.environ), 0)])\n"
        "sup.start_all()\n"
        "print(sup.pids()['sleeper'], flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert not _gone(child)
        proc.kill()  # kill -9: dev gets no chance to stop anything
        proc.wait()
        wait_for(lambda: _gone(child), 10, "the orphaned role to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

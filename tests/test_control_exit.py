"""`inferq control` must not report a crash as success: Celery's ``worker_main`` drops the exit
code of a worker stopped by an unrecoverable error, and a supervisor (dev's, Kubernetes') reads
exit 0 as "asked to stop"."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import os
    import signal
    import sys
    from celery import Celery, bootsteps
    from control.app import run_worker, worker_argv

    class Boom(bootsteps.StartStopStep):
        def start(self, c):
            raise RuntimeError("boom")  # neither a connection nor a channel error

    app = Celery("t", broker="memory://", set_as_current=False)
    app.conf.update(worker_hijack_root_logger=False, worker_redirect_stdouts=False)
    if sys.argv[1] == "crash":
        app.steps["consumer"].add(Boom)
    sys.exit(100 + run_worker(app, worker_argv(concurrency=1, beat=False)))
    """
)


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(90)
def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero() -> None:
    done = _run("crash")
    assert done.returncode == 101, done.stdout + done.stderr
    assert "Unrecoverable error: RuntimeError('boom')" in done.stderr


@pytest.mark.timeout(90)
def test_a_worker_asked_to_stop_exits_zero() -> None:
    """SIGTERM once the worker says it is ready, as dev and Kubernetes send it (sent from
    inside a bootstep it raced Celery's own start-up and was sometimes lost)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "stop"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if "ready." in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 100, "".join(seen) + (rest or "")

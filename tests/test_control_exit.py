"""`inferq control` must not report a crash as success: Celery's ``worker_main`` drops the exit
code of a worker stopped by an unrecoverable error, and a supervisor (dev's, Kubernetes') reads
exit 0 as "asked to stop"."""

from __future__ import annotations

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
    else:  # a warm shutdown asked for, as dev and Kubernetes ask: SIGTERM once it runs
        class Stop(bootsteps.StartStopStep):
            last = True

            def start(self, c):
                os.kill(os.getpid(), signal.SIGTERM)
        app.steps["consumer"].add(Stop)
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
    done = _run("stop")
    assert done.returncode == 100, done.stdout + done.stderr

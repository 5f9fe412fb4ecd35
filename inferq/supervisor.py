"""The supervisor under `inferq dev`: it keeps the role processes (API, workers, control plane)
running, restarts one that exits unexpectedly with exponential backoff and a loud log line
saying why, declares a crash loop instead of hiding it, and stops the roles in order.

A crash-looping role keeps being retried, slowly: in development the usual fix is an edit to
the code or the environment, which the next restart picks up without restarting dev.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("inferq.dev")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    stable_s: float = 60.0  # a child that ran this long was healthy: its backoff starts over
    loop_restarts: int = 5  # this many restarts within loop_window_s is a crash loop
    loop_window_s: float = 120.0
    loop_retry_s: float = 60.0  # how often a crash-looping role is still retried

    def delay(self, consecutive: int) -> float:
        """The wait before restart number ``consecutive`` (1-based) of a crash streak."""
        return float(min(self.initial_s * self.factor ** (consecutive - 1), self.max_s))

    def describe(self) -> str:
        return (
            f"a role that exits is restarted after {self.initial_s:g}s, doubling up to "
            f"{self.max_s:g}s; {self.loop_restarts} restarts within {self.loop_window_s:g}s "
            f"is a crash loop, reported at ERROR and retried every {self.loop_retry_s:g}s"
        )


@dataclass(frozen=True)
class Role:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    stage: int  # stop order: lower stages stop first, and fully, before the next


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when dev dies, even by kill -9
    (Linux; elsewhere None). Resolved here, so the forked child only makes one libc call."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, term = os.getpid(), int(signal.SIGTERM)

    def arm() -> None:
        prctl(1, term)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # dev died before the line above
            os.kill(os.getpid(), term)

    return arm


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Child:
    role: Role
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0  # over the whole session
    streak: int = 0  # consecutive quick crashes; drives the backoff
    recent: deque[float] = field(default_factory=deque)  # when each restart was scheduled
    restart_at: float | None = None
    crash_loop: bool = False


class Supervisor:
    """Not thread-safe: start, poll and stop from one thread (dev's main loop)."""

    def __init__(
        self,
        roles: Sequence[Role],
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff = backoff or Backoff()
        self._clock = clock
        self._children = [_Child(role) for role in roles]
        self._preexec = die_with_parent()

    def start_all(self) -> None:
        for child in self._children:
            self._spawn(child)

    def pids(self) -> dict[str, int]:
        return {
            c.role.name: c.process.pid
            for c in self._children
            if c.process is not None and c.process.poll() is None
        }

    def restarts(self) -> dict[str, int]:
        return {c.role.name: c.restarts for c in self._children if c.restarts}

    def crash_looping(self) -> list[str]:
        return [c.role.name for c in self._children if c.crash_loop]

    def poll(self) -> None:
        """Notice exits, schedule restarts, perform the restarts that are due."""
        now, b = self._clock(), self.backoff
        for child in self._children:
            process = child.process
            if process is not None and process.poll() is not None:
                self._exited(child, process, now)
            elif process is not None and child.streak and now - child.started_at >= b.stable_s:
                self._recovered(child, now - child.started_at)
            if child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                try:
                    self._spawn(child)
                except OSError as exc:  # the interpreter gone, out of processes: keep trying
                    name, retry = child.role.name, b.loop_retry_s
                    log.error("cannot restart %s: %s; next try in %gs", name, exc, retry)
                    child.restart_at = now + b.loop_retry_s

    def _recovered(self, child: _Child, ran_s: float) -> None:
        """A restarted child that has run ``stable_s``: its streak (and crash loop) is over."""
        child.streak = 0
        child.recent.clear()
        if child.crash_loop:
            child.crash_loop = False
            name = child.role.name
            log.warning(
                "%s has run %.0fs since its restart: no longer in a crash loop", name, ran_s
            )

    def _exited(self, child: _Child, process: subprocess.Popen[bytes], now: float) -> None:
        name, b = child.role.name, self.backoff
        ran_s = now - child.started_at
        child.process = None
        if ran_s >= b.stable_s:
            self._recovered(child, ran_s)
        child.restarts += 1
        child.streak += 1
        child.recent.append(now)
        while child.recent and now - child.recent[0] > b.loop_window_s:
            child.recent.popleft()
        why = f"{name} (pid {process.pid}) {describe_exit(process.returncode)} after {ran_s:.1f}s"
        if len(child.recent) >= b.loop_restarts:
            delay = b.loop_retry_s
            if not child.crash_loop:
                child.crash_loop = True
                log.error(
                    "CRASH LOOP: %s: %d restarts within %gs; retrying every %gs; "
                    "its own output above says why",
                    name,
                    len(child.recent),
                    b.loop_window_s,
                    delay,
                )
            log.error("%s; still crash-looping: restart #%d in %gs", why, child.restarts, delay)
        else:
            delay = b.delay(child.streak)
            log.warning("%s; restart #%d in %gs", why, child.restarts, delay)
        child.restart_at = now + delay

    def _spawn(self, child: _Child) -> None:
        # a session of its own: Ctrl-C reaches only dev, which stops the roles in order
        child.process = subprocess.Popen(
            list(child.role.argv),
            env=dict(child.role.env),
            start_new_session=True,
            preexec_fn=self._preexec,  # one prctl call, resolved before the fork
        )
        child.started_at = self._clock()
        again = f", restart #{child.restarts}" if child.restarts else ""
        log.info("started %s (pid %d%s)", child.role.name, child.process.pid, again)

    def stop(self, timeout_s: float = 20.0, force: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM stage by stage, each waited for (SIGKILL past ``timeout_s`` or on ``force``)."""
        for child in self._children:
            child.restart_at = None
        for stage in sorted({c.role.stage for c in self._children}):
            group = [c for c in self._children if c.role.stage == stage]
            for child in group:
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = self._clock() + timeout_s
            for child in group:
                self._wait(child, deadline, force)

    def _wait(self, child: _Child, deadline: float, force: Callable[[], bool]) -> None:
        process, name = child.process, child.role.name
        if process is None:
            log.info("stopped %s (it was down)", name)
            return
        while process.poll() is None and self._clock() < deadline and not force():
            time.sleep(0.05)
        if process.poll() is None:
            log.warning("%s (pid %d) did not stop in time; killing it", name, process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # with anything it started
            process.wait()
        child.process = None
        code = process.returncode
        if code in (0, -signal.SIGTERM):
            log.info("stopped %s", name)
        else:
            log.warning("stopped %s: it %s", name, describe_exit(code))

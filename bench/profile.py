"""Optional sampling profiles of the roles during the timed windows (`--profile DIR`).

py-spy (``pip install py-spy``) records each role in "raw" (collapsed stack) format; the
summary below folds those stacks into the functions that cost the most, per role. Profiling
takes CPU itself, so figures from a profiled run are for reading where the time goes, not
for comparing with an unprofiled one. INFERQ_BENCH_PYSPY_ARGS adds py-spy options: "--gil"
shows what holds each role's interpreter, which bounds a single-process role.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# frames from these top-level folders are "ours"; the rest is libraries and the runtime
PROJECT_PACKAGES = ("schemas", "producers", "workers", "jobstore", "dlq", "transports", "inferq")
# more py-spy options, e.g. "--gil" (only the thread holding the GIL) or "--native"
EXTRA_ARGS_ENV = "INFERQ_BENCH_PYSPY_ARGS"
# entry points that every sample passes through: true, and no news
_ENTRY_PREFIXES = ("inferq.__main__.", "inferq.cli.", "inferq.cli_base.")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy")


@contextlib.contextmanager
def record(
    directory: Path | None, label: str, pids: Mapping[str, int], rate: int = 97
) -> Iterator[None]:
    """Sample every pid in ``pids`` while the block runs; no-op without a directory."""
    exe = py_spy()
    if directory is None or exe is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    for role, pid in pids.items():
        out = directory / f"{label}-{role}.txt"
        procs.append(
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(out),
                    *os.environ.get(EXTRA_ARGS_ENV, "").split(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# Leaf frames of threads that wait for work. py-spy's idle detection lets some of them
# through (thread pools blocked on a queue, the selector); they are counted apart.
IDLE_LEAVES = frozenset(
    {
        "threading.Condition.wait",
        "threading.Event.wait",
        "concurrent.futures.thread._worker",
        "futures.thread._worker",
        "selectors.EpollSelector.select",
        "selectors._PollLikeSelector.select",
    }
)


@dataclass
class Summary:
    samples: int  # busy samples: the percentages below are of these
    idle: int  # samples of waiting threads, left out
    self_top: list[tuple[str, int]]  # where the CPU is spent (leaf frames)
    ours_top: list[tuple[str, int]]  # project functions, inclusive of what they call


def _short(frame: str) -> tuple[str, bool]:
    """'func (path:line)' -> ('module.func', is_project_frame)."""
    m = _FRAME.match(frame)
    if not m:
        return frame, False
    path = m.group("file")
    parts = Path(path).with_suffix("").parts
    ours = False
    for i, part in enumerate(parts):
        if part in PROJECT_PACKAGES and "site-packages" not in parts[:i]:
            ours = True
            parts = parts[i:]
            break
    else:
        cut = parts.index("site-packages") + 1 if "site-packages" in parts else len(parts) - 2
        parts = parts[max(cut, 0) :]
    return f"{'.'.join(parts)}.{m.group('func')}", ours


def summarize(path: Path, top: int = 12) -> Summary | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_short(f) for f in stack.split(";")]
        if not frames:
            continue
        if frames[-1][0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        leaf[frames[-1][0]] += count
        for name in {n for n, ours in frames if ours and not n.startswith(_ENTRY_PREFIXES)}:
            inclusive[name] += count
    if not total:
        return None
    return Summary(total, idle, leaf.most_common(top), inclusive.most_common(top))

"""`inferq api --workers N` (issue 10): N API processes serve one port, each a full API
(POST, GET), and SIGTERM or Ctrl-C stops every one of them. Which process serves which
connection is read from outside, as an operator would: the process tree and the sockets each
process holds (/proc), not a header the API would add for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.procs import Stack, free_port, wait_for
from tests.test_e2e_kafka import stack as stack


def _children(parent: int, marker: bytes = b"") -> list[int]:
    """The child processes of ``parent`` whose command line holds ``marker``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and marker in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def _api_processes(parent: int) -> list[int]:
    """The worker processes uvicorn spawned (not multiprocessing's resource tracker)."""
    return _children(parent, b"spawn_main")


def _connections_by_process(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections on ``port`` each process holds."""
    owner: dict[str, int] = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir() if fds.exists() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01" and inode in owner:
                counts[owner[inode]] += 1
    return counts


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(stack: Stack, workers: int) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    port = free_port()
    proc = stack.spawn(["api", "--port", str(port), "--workers", str(workers)], "api")

    def up() -> bool:
        assert proc.poll() is None, stack.log("api")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 90, "the API")
    wait_for(lambda: len(_api_processes(proc.pid)) == workers, 60, f"{workers} API processes")
    return proc, port, _api_processes(proc.pid)


def _stopped(proc: subprocess.Popen[bytes], stack: Stack, descendants: list[int]) -> None:
    """The parent exits 0 and leaves no process behind (no orphaned API, no tracker)."""
    assert proc.wait(30) == 0, stack.log("api")
    wait_for(lambda: not any(_alive(p) for p in descendants), 10, "every child to exit")


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_api_processes_serve_one_port_and_sigterm_stops_all(stack: Stack) -> None:
    proc, port, children = _start(stack, 2)
    descendants = _children(proc.pid)
    clients: list[httpx.Client] = []
    try:
        # keep-alive connections, opened one after another, each used for a submit and a
        # read of what it submitted, until both processes hold some of them
        for _ in range(64):
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            clients.append(client)
            r = client.post("/v1/jobs", json={"model": "identity", "input": {"tensor": [1.0]}})
            assert r.status_code == 202, r.text
            job = client.get(r.headers["location"])
            assert job.status_code == 200 and job.json()["id"] == r.json()["id"]
            held = _connections_by_process(children, port)
            if len(clients) >= 8 and all(held.values()):
                break
            time.sleep(0.02)
        held = _connections_by_process(children, port)
        assert all(held.values()), f"connections per API process: {held}"
        assert sum(held.values()) == len(clients)
        # every process reads what another one wrote: one store behind one port
        for client in clients[:8]:
            listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
            assert len(listed) == len(clients)
    finally:
        for client in clients:
            client.close()
    os.kill(proc.pid, signal.SIGTERM)  # the parent alone, as a process manager does
    _stopped(proc, stack, descendants)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_stops_every_api_process(stack: Stack) -> None:
    proc, port, children = _start(stack, 2)
    assert len(set(children)) == 2
    descendants = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole group
    _stopped(proc, stack, descendants)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--workers", "0"], {}, "--workers"),
        (["--workers", "two"], {}, "--workers"),
        ([], {"INFERQ_API_WORKERS": "0"}, "INFERQ_API_WORKERS"),
    ],
)
def test_bad_worker_counts_are_refused(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferq", "api", "--data-dir", str(tmp_path), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr

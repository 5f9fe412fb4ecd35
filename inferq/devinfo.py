"""What a running ``inferq dev`` tells other ``inferq`` commands on the same data dir.

Dev writes ``<data dir>/dev.json`` (its pid, transport, broker or endpoint address, ports)
once its servers are up and removes it when it stops. ``inferq dlq ...``, ``inferq topics
create`` and the rest, run in a second terminal with the same ``--data-dir``, read it and use
the same bus without any environment variable; a variable that is set still wins.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FILE = "dev.json"


@dataclass(frozen=True)
class DevInfo:
    pid: int
    env: dict[str, str]  # settings of the bus, as environment variables (INFERQ_TRANSPORT, ...)
    api: str
    ports: dict[str, int] = field(default_factory=dict)


def write(data_dir: Path, info: DevInfo) -> Path:
    path = data_dir / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(path)  # a reader never sees half a file
    return path


def remove(data_dir: Path, pid: int) -> None:
    info = read(data_dir)
    if info is not None and info.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / FILE).unlink()


def read(data_dir: Path) -> DevInfo | None:
    """The running dev's info, or None (no file, unreadable, or its dev is gone)."""
    try:
        raw = json.loads((data_dir / FILE).read_text())
        info = DevInfo(
            pid=int(raw["pid"]),
            env={str(k): str(v) for k, v in raw["env"].items()},
            api=str(raw["api"]),
            ports={str(k): int(v) for k, v in raw.get("ports", {}).items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return info if _alive(info.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

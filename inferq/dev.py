"""`inferq dev`: the embedded all-in-one, on Kafka (noida-db) or SQS (moto_server).

It starts the local server (unless INFERQ_KAFKA_BOOTSTRAP / AWS_ENDPOINT_URL name one) in a
process group of its own, so that Ctrl-C reaches only dev; then the API, the workers and the
control plane as supervised children (inferq/supervisor.py: restarts with backoff, crash loops
reported). Every port falls back to a free one when its default is taken; the banner shows
them all. Ctrl-C or SIGTERM stops the API, then the workers, then the control plane, and the
local server last, so nothing shuts down against a dead broker. A second Ctrl-C kills.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from inferq import devinfo
from inferq.settings import Settings
from inferq.supervisor import Backoff, Role, Supervisor

if TYPE_CHECKING:
    from transports.transport import LocalServer, Transport

log = logging.getLogger("inferq.dev")

DEFAULT_API_PORT = 8000


@dataclass(frozen=True)
class DevOptions:
    """A port given here (from the command line) is required; None means the default, or a
    free port when the default is taken."""

    port: int | None = None
    workers: int = 1
    transport: str | None = None  # a transport name; None: the settings' (INFERQ_TRANSPORT)
    build_models: bool = True
    # the local server's port by the dev option that names it ("--kafka-port": 19093), as
    # each transport's LocalServerSpec.option says
    local_ports: Mapping[str, int] = field(default_factory=dict)
    backoff: Backoff = field(default_factory=Backoff)


class DevError(Exception):
    """dev cannot start as asked; the message says what to change."""


@dataclass
class _Bus:
    """What the chosen transport contributes: its local server, the roles' environment."""

    transport: Transport  # pointed at the local server when dev runs one
    server: LocalServer | None
    env: dict[str, str]

    @property
    def what(self) -> str:
        return self.transport.local.what if self.server is not None else "the bus"

    def prepare(self) -> None:
        """Topics or queues (and a local claim-check bucket); again after a server restart."""
        asyncio.run(self.transport.prepare(create=True))


def _say(message: str) -> None:
    print(f"[inferq dev] {message}", flush=True)


def _ensure_models(settings: Settings, build: bool) -> bool:
    from workers.repository import ModelRepository

    repo = ModelRepository(settings.resolved_model_repository)
    if repo.configs():
        return True
    if not build:
        _say(f"no models in {repo.root}; run `inferq models build`")
        return False
    from workers.export import ExportError, build_all

    _say(f"building models into {repo.root} (once; cached afterwards)")
    try:
        build_all(repo.root)
    except ExportError as exc:
        _say(f"cannot build models: {exc}")
        return False
    return True


class _Ports:
    """Ports for everything dev opens, checked free now (a child binds it moments later)."""

    def __init__(self) -> None:
        self._chosen: set[int] = set()

    def pick(self, what: str, preferred: int, *, required: str | None = None) -> int:
        """``required``: the flag that asked for ``preferred``, which then must be free."""
        if preferred and preferred not in self._chosen and _free(preferred):
            self._chosen.add(preferred)
            return preferred
        if required is not None:
            raise DevError(f"port {preferred} for {what} is in use; choose another with {required}")
        port = preferred
        while port in self._chosen or not _free(port):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        log.warning("port %d for %s is taken; using %d", preferred, what, port)
        self._chosen.add(port)
        return port


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def control_broker(settings: Settings) -> str:
    """Redis when it answers, else a broker that needs no server; says which."""
    from inferq.control import local_broker_url, redis_reachable

    if redis_reachable(settings.redis_url):
        _say(f"control plane (Celery) broker: Redis at {settings.redis_url}")
        return settings.redis_url
    url = local_broker_url(settings)
    _say(f"Redis at {settings.redis_url} is not reachable; control plane broker: {url}")
    return url


def _bus(settings: Settings, options: DevOptions, ports: _Ports) -> _Bus:
    """The transport, on a local server of dev's own unless the settings name one."""
    from inferq.wiring import ConfigError, transport_of

    try:
        transport = transport_of(settings, options.transport)
    except ConfigError as exc:
        raise DevError(str(exc)) from exc
    server: LocalServer | None = None
    env: dict[str, str] = {}
    if transport.address is None:
        spec = transport.local
        asked = options.local_ports.get(spec.option)
        port = ports.pick(
            spec.port_of or spec.what,
            asked or spec.port,
            required=None if asked is None else spec.option,
        )
        server = transport.local_server(settings.data_dir, port)
        transport = transport.on_local_server(server.address)
        for name, value in server.environment().items():
            env[name] = os.environ.get(name, value)
            os.environ.setdefault(name, value)  # for our own clients in prepare()
    env.update(transport.environment())
    return _Bus(transport, server, env)


def _roles(settings: Settings, options: DevOptions, bus: _Bus, ports: _Ports) -> list[Role]:
    env = dict(os.environ)
    env.update(bus.env)
    env.update({"INFERQ_DATA_DIR": str(settings.data_dir), "PYTHONUNBUFFERED": "1"})
    broker = control_broker(settings)
    if broker != settings.redis_url:
        # the server-less broker is polled: handing webhooks over it would not be faster
        # than the dispatch sweep, so the sweep alone delivers
        env["INFERQ_WEBHOOK_HANDOFF"] = "false"
    api_port = ports.pick(
        "the API",
        options.port or DEFAULT_API_PORT,
        required=None if options.port is None else "--port",
    )
    argv = (sys.executable, "-m", "inferq")
    roles = [Role("api", (*argv, "api", "--port", str(api_port)), env, stage=0)]
    for i in range(options.workers):
        metrics = settings.worker_metrics_port
        if metrics:
            metrics = ports.pick(f"worker-{i} metrics", metrics + i)
        worker_env = {
            **env,
            "INFERQ_WORKER_METRICS_PORT": str(metrics),
            "INFERQ_WORKER_ID": f"dev-worker-{i}",  # static group member: see shared NOTES
        }
        roles.append(Role(f"worker-{i}", (*argv, "worker"), worker_env, stage=1))
    control_port = settings.control_metrics_port
    if control_port:
        control_port = ports.pick("control metrics", control_port)
    control_env = {
        **env,
        "INFERQ_REDIS_URL": broker,
        "INFERQ_CONTROL_METRICS_PORT": str(control_port),
    }
    roles.append(Role("control", (*argv, "control"), control_env, stage=2))
    return roles


def _port_of(role: Role, variable: str) -> int:
    return int(role.env[variable])


def _banner(settings: Settings, roles: list[Role], bus: _Bus, sup: Supervisor) -> None:
    api_role = roles[0]
    api = f"http://127.0.0.1:{api_role.argv[-1]}"
    pids = sup.pids()
    _say("ready")
    _say(f"  API        {api}   (docs {api}/docs, AsyncAPI {api}/asyncapi.json, {api}/metrics)")
    for role in roles[1:]:
        variable = "INFERQ_WORKER_METRICS_PORT"
        if role.name == "control":
            variable = "INFERQ_CONTROL_METRICS_PORT"
        port = _port_of(role, variable)
        where = f"http://127.0.0.1:{port}/metrics" if port else "off"
        _say(f"  {role.name} metrics  {where}")
    where = "local" if bus.server is not None else "external"
    _say("  " + bus.transport.describe(where))
    _say(f"  job store  {settings.resolved_database_url}")
    _say(f"  models     {settings.resolved_model_repository}")
    _say("  roles      " + ", ".join(f"{name} pid {pid}" for name, pid in pids.items()))
    _say(f"  restarts   {sup.backoff.describe()}")
    _say(
        f"  try: curl -s -XPOST {api}/v1/jobs -H 'content-type: application/json' "
        '-d \'{"model":"minilm","input":{"text":"hello"}}\''
    )
    _say("Ctrl-C stops everything (roles first, the local server last; twice: kill)")


def _publish_info(settings: Settings, roles: list[Role], bus: _Bus) -> None:
    """<data dir>/dev.json: other `inferq` commands on this data dir use the same bus."""
    ports = {"api": int(roles[0].argv[-1])}
    for role in roles[1:]:
        for variable in ("INFERQ_WORKER_METRICS_PORT", "INFERQ_CONTROL_METRICS_PORT"):
            if role.env.get(variable):
                ports[f"{role.name} metrics"] = int(role.env[variable])
    info = devinfo.DevInfo(
        pid=os.getpid(), env=dict(bus.env), api=f"http://127.0.0.1:{ports['api']}", ports=ports
    )
    path = devinfo.write(settings.data_dir, info)
    _say(f"  dev info   {path} (other `inferq` commands with this --data-dir use this bus)")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def run_dev(settings: Settings, options: DevOptions) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not _ensure_models(settings, options.build_models):
        return 2
    signals = {"stopping": False, "force": False}

    def on_signal(signum: int, _frame: object) -> None:
        if signals["stopping"]:
            signals["force"] = True
        signals["stopping"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(settings, options, signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(settings: Settings, options: DevOptions, signals: dict[str, bool]) -> int:
    from inferq.wiring import open_store

    ports = _Ports()
    try:
        bus = _bus(settings, options, ports)
        roles = _roles(settings, options, bus, ports)
    except DevError as exc:
        _say(str(exc))
        return 2
    if bus.server is not None:
        _say(f"starting {bus.what} ({bus.server.log_path})")
        try:
            bus.server.start()
        except Exception as exc:
            _say(f"{bus.what} did not start: {exc}")
            return 2
        log.info("started %s (pid %s)", bus.what, bus.server.pid)
    sup = Supervisor(roles, options.backoff)
    code = 0
    try:
        bus.prepare()
        open_store(settings).close()  # schema in place before the children race for it
        if not signals["stopping"]:
            sup.start_all()
        code = _supervise(settings, roles, bus, sup, signals)
    except Exception as exc:
        log.error("dev failed: %s; stopping everything", exc)
        code = 1
    finally:
        _say("stopping")
        devinfo.remove(settings.data_dir, os.getpid())
        sup.stop(force=lambda: signals["force"])
        if bus.server is not None:
            bus.server.stop()
            log.info("stopped %s", bus.what)
        looping = sup.crash_looping()
        if sup.restarts():
            log.warning("restarts this session: %s", sup.restarts())
        if looping:
            log.error("exiting 1: %s crash-looping until the end", ", ".join(looping))
            code = code or 1
        _say("stopped")
    return code


def _supervise(
    settings: Settings, roles: list[Role], bus: _Bus, sup: Supervisor, signals: dict[str, bool]
) -> int:
    healthz = f"http://127.0.0.1:{roles[0].argv[-1]}/healthz"
    deadline = time.monotonic() + 120
    while not signals["stopping"] and not _http_ok(healthz):
        if time.monotonic() > deadline:
            log.error("the API did not answer %s within 120s; see its output above", healthz)
            return 1
        sup.poll()
        time.sleep(0.2)
    if signals["stopping"]:
        return 0
    _publish_info(settings, roles, bus)
    _banner(settings, roles, bus, sup)
    server_retry_at = 0.0
    while not signals["stopping"]:
        sup.poll()
        server = bus.server
        if server is not None and not server.running and time.monotonic() >= server_retry_at:
            # the roles keep retrying their connections meanwhile; data dir and port are kept
            log.error("%s exited (its log: %s); restarting it", bus.what, server.log_path)
            try:
                server.stop()
                server.start()
                bus.prepare()
                log.warning("%s restarted (pid %s)", bus.what, server.pid)
            except Exception as exc:
                log.error("%s did not restart: %s; next try in 10s", bus.what, exc)
                server_retry_at = time.monotonic() + 10
        time.sleep(0.2)
    return 0


def data_dir_default() -> Path:
    return Path(".inferq")

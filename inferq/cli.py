"""`inferq` command line: dev, api, worker, control, models, topics, queues, dlq, webhooks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from inferq import cli_bus, dlq_cli, webhooks_cli
from inferq.cli_base import InferqCommand, InferqGroup, settings, verbose

log = logging.getLogger("inferq")

CONTEXT = {"help_option_names": ["-h", "--help"]}
API_FACTORY = "inferq.asgi:create_app"  # what each process of `inferq api --workers N` runs

app = typer.Typer(
    name="inferq",
    cls=InferqGroup,
    help=(
        "Asynchronous ML inference jobs: the HTTP API, workers, the control plane, and the "
        "tools to run and repair them. Every command takes --data-dir and -v, before or "
        "after the command; run with the --data-dir of a running `inferq dev`, it uses that "
        "dev's bus."
    ),
    context_settings=CONTEXT,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(cls=InferqGroup, help="The model repository.", no_args_is_help=True)
topics_app = typer.Typer(cls=InferqGroup, help="Kafka topics.", no_args_is_help=True)
queues_app = typer.Typer(cls=InferqGroup, help="SQS queues.", no_args_is_help=True)


class Transport(StrEnum):
    kafka = "kafka"
    sqs = "sqs"


# --- the roles -----------------------------------------------------------------------------


@app.command(cls=InferqCommand)
def dev(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option(metavar="PORT", help="API port (default 8000, or a free one when taken)"),
    ] = None,
    kafka_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", help="embedded Kafka broker port (default 19092, or a free one)"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(metavar="N", help="worker processes")] = 1,
    aws_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", help="local moto_server port, with --transport sqs (default 15000)"
        ),
    ] = None,
    transport: Annotated[
        Transport | None,
        typer.Option(help="the bus (default: INFERQ_TRANSPORT, else kafka)", show_default=False),
    ] = None,
    no_build: Annotated[
        bool, typer.Option("--no-build", help="don't build missing models")
    ] = False,
) -> int:
    """Local broker, API, workers and control plane, supervised. A port given must be free."""
    from inferq.dev import DevOptions, run_dev

    found = settings(ctx, dev_bus=False)
    # each transport's local server takes the port of the option its LocalServerSpec names
    asked = {"--kafka-port": kafka_port, "--aws-port": aws_port}
    return run_dev(
        found,
        DevOptions(
            port=port,
            workers=workers,
            transport=transport.value if transport else found.transport,
            local_ports={option: p for option, p in asked.items() if p is not None},
            build_models=not no_build,
        ),
    )


@app.command(cls=InferqCommand)
def api(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(metavar="HOST", help="address to listen on (default INFERQ_API_HOST)"),
    ] = None,
    port: Annotated[
        int | None, typer.Option(metavar="PORT", help="port to listen on (default INFERQ_API_PORT)")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            help="API processes sharing the port (default INFERQ_API_WORKERS, 1)",
        ),
    ] = None,
) -> int:
    """Run the HTTP API against external servers."""
    import uvicorn

    from inferq.wiring import ConfigError, build_api, prepare_api

    found = settings(ctx)
    count = workers or found.api_workers
    # uvloop and httptools: the event loop and HTTP parser in C, named so that a missing one
    # fails at start instead of falling back to the pure-Python ones
    server: dict[str, Any] = {
        "host": host or found.api_host,
        "port": port or found.api_port,
        "log_level": "warning",
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
    }
    try:
        if count == 1:
            uvicorn.run(build_api(found), **server)
            return 0
        prepare_api(found)  # once, here: topics and schema before the processes race for them
    except ConfigError as exc:
        print(f"inferq api: {exc}", file=sys.stderr)
        return 2
    # each process builds its own app from the settings, which it reads from the environment
    # it inherits: what --data-dir and a running dev's bus added goes there first
    os.environ["INFERQ_DATA_DIR"] = str(found.data_dir)
    uvicorn.run(API_FACTORY, factory=True, workers=count, **server)
    return 0


@app.command(cls=InferqCommand)
def worker(ctx: typer.Context) -> int:
    """Run one worker against external servers."""
    from prometheus_client import CollectorRegistry, start_http_server

    from inferq.wiring import ConfigError, run_worker
    from transports.base import TransportError

    found = settings(ctx)
    registry = CollectorRegistry()
    if found.worker_metrics_port:
        start_http_server(found.worker_metrics_port, addr="127.0.0.1", registry=registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(found, stop, registry)

    try:
        asyncio.run(main())
    except (ConfigError, TransportError) as exc:
        print(f"inferq worker: {exc}", file=sys.stderr)
        return 2
    return 0


@app.command(cls=InferqCommand)
def control(
    ctx: typer.Context,
    concurrency: Annotated[
        int | None,
        typer.Option(metavar="N", help="delivery threads (default INFERQ_CONTROL_CONCURRENCY)"),
    ] = None,
    no_beat: Annotated[
        bool,
        typer.Option("--no-beat", help="don't embed the beat (every replica but one)"),
    ] = False,
    local_broker_fallback: Annotated[
        bool,
        typer.Option(
            "--local-broker-fallback",
            help="use a server-less broker in the data dir when Redis is unreachable (dev)",
        ),
    ] = False,
) -> int:
    """Run the Celery control plane: webhook delivery and sweeps (with beat)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from control.app import make_celery, run_worker, worker_argv
    from inferq.control import control_config, local_broker_url, redis_reachable

    found = settings(ctx)
    found.data_dir.mkdir(parents=True, exist_ok=True)
    broker = found.redis_url
    if local_broker_fallback and not redis_reachable(broker):
        broker = local_broker_url(found)
        print(
            f"inferq control: Redis at {found.redis_url} is not reachable; "
            f"using the server-less broker {broker}",
            file=sys.stderr,
            flush=True,
        )
    log.info("control plane broker: %s", broker)
    registry = CollectorRegistry()
    if found.control_metrics_port:
        try:
            start_http_server(found.control_metrics_port, addr="127.0.0.1", registry=registry)
        except OSError as exc:  # a busy port must not stop webhook delivery
            log.warning("no metrics on port %d: %s", found.control_metrics_port, exc)
    celery = make_celery(control_config(found, broker_url=broker, registry=registry))
    argv = worker_argv(
        concurrency=concurrency or found.control_concurrency,
        beat=not no_beat,
        loglevel="INFO" if verbose(ctx) else "WARNING",  # INFO logs every beat tick
        extra=["--hostname", f"inferq-control-{os.getpid()}@%h"],
    )
    code = run_worker(celery, argv)
    if code:  # Celery's own "Unrecoverable error" traceback is above
        print(f"inferq control: the Celery worker stopped with exit code {code}", file=sys.stderr)
    return code


# --- models, topics, queues ----------------------------------------------------------------


@models_app.command("build", cls=InferqCommand)
def models_build(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option("--force", help="export again even where a model is built")
    ] = False,
    repository: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="model repository (default INFERQ_MODEL_REPOSITORY)"),
    ] = None,
) -> int:
    """Export the shipped models to ONNX (offline, cached)."""
    from workers.export import ExportError, build_all

    root = repository or settings(ctx).resolved_model_repository
    try:
        for path in build_all(root, force=force):
            print(f"ready: {path}")
    except ExportError as exc:
        print(f"inferq models build: {exc}", file=sys.stderr)
        return 2
    return 0


@models_app.command("list", cls=InferqCommand)
def models_list(ctx: typer.Context) -> int:
    """List the models in the repository."""
    from workers.repository import ModelRepository

    for c in ModelRepository(settings(ctx).resolved_model_repository).configs():
        default = " (default)" if c.default else ""
        print(
            f"{c.name}/{c.version}{default}  adapter={c.adapter}  "
            f"max_batch_size={c.max_batch_size}  max_wait_ms={c.max_wait_ms}"
        )
    return 0


@topics_app.command("create", cls=InferqCommand)
def topics_create(ctx: typer.Context) -> int:
    """Create the jobs and dead-letter topics."""
    found = settings(ctx)
    try:
        cli_bus.create_topics(found)
    except cli_bus.BusError as exc:
        print(f"inferq topics create: {exc}", file=sys.stderr)
        return 2
    print(
        f"topics ready: {found.kafka_topic} ({found.kafka_partitions} partitions), "
        f"{found.dlq_topic}"
    )
    return 0


@queues_app.command("create", cls=InferqCommand)
def queues_create(ctx: typer.Context) -> int:
    """Create the jobs queue and its dead-letter queue (with RedrivePolicy)."""
    found = settings(ctx)
    try:
        cli_bus.create_queues(found)
    except cli_bus.BusError as exc:
        print(f"inferq queues create: {exc}", file=sys.stderr)
        return 2
    print(
        f"queues ready: {found.sqs_queue_name}, {found.sqs_dlq} "
        f"(maxReceiveCount {found.sqs_max_receive_count})"
    )
    return 0


app.add_typer(models_app, name="models")
app.add_typer(topics_app, name="topics")
app.add_typer(queues_app, name="queues")
app.add_typer(dlq_cli.app, name="dlq")
app.add_typer(webhooks_cli.app, name="webhooks")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``inferq`` console script: runs one command, answers its exit code. Bad input is
    Click's usage error (exit 2) naming the option; Ctrl-C is 130."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="inferq")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0

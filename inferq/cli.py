"""`inferq` command line: dev, api, worker, control, models, topics, dlq, webhooks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from inferq import devinfo
from inferq.settings import Settings

log = logging.getLogger("inferq")


class SettingsError(Exception):
    """The environment holds a setting that cannot be used; names the variable."""


def _settings(args: argparse.Namespace) -> Settings:
    settings = _read_settings(args)
    if args.command == "dev":
        return settings
    # a running `inferq dev` on this data dir: use its bus (a variable that is set still wins)
    info = devinfo.read(settings.data_dir)
    if info is None:
        return settings
    missing = {k: v for k, v in info.env.items() if k not in os.environ}
    if not missing:
        return settings
    os.environ.update(missing)  # the composition root: read once, below, like any setting
    print(
        f"inferq {args.command}: using the bus of inferq dev (pid {info.pid}) from "
        f"{settings.data_dir / devinfo.FILE}",
        file=sys.stderr,
    )
    return _read_settings(args)


def _read_settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "INFERQ_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
        raise SettingsError("; ".join(problems)) from exc


def cmd_dev(args: argparse.Namespace) -> int:
    from inferq.dev import DevOptions, run_dev

    settings = _settings(args)
    transport = args.transport or ("sqs" if settings.transport == "sqs" else "kafka")
    return run_dev(
        settings,
        DevOptions(
            port=args.port,
            kafka_port=args.kafka_port,
            workers=args.workers,
            transport=transport,
            aws_port=args.aws_port,
            build_models=not args.no_build,
        ),
    )


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from inferq.wiring import ConfigError, build_api

    settings = _settings(args)
    try:
        app = build_api(settings)
    except ConfigError as exc:
        print(f"inferq api: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level="warning",
        access_log=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from inferq.wiring import ConfigError, run_worker

    settings = _settings(args)
    registry = CollectorRegistry()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr="127.0.0.1", registry=registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop, registry)

    from transports.base import TransportError

    try:
        asyncio.run(main())
    except (ConfigError, TransportError) as exc:
        print(f"inferq worker: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from control.app import make_celery, worker_argv
    from inferq.control import control_config, local_broker_url, redis_reachable

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = settings.redis_url
    if args.local_broker_fallback and not redis_reachable(broker):
        broker = local_broker_url(settings)
        print(
            f"inferq control: Redis at {settings.redis_url} is not reachable; "
            f"using the server-less broker {broker}",
            file=sys.stderr,
            flush=True,
        )
    log.info("control plane broker: %s", broker)
    registry = CollectorRegistry()
    if settings.control_metrics_port:
        try:
            start_http_server(settings.control_metrics_port, addr="127.0.0.1", registry=registry)
        except OSError as exc:  # a busy port must not stop webhook delivery
            log.warning("no metrics on port %d: %s", settings.control_metrics_port, exc)
    app = make_celery(control_config(settings, broker_url=broker, registry=registry))
    argv = worker_argv(
        concurrency=args.concurrency or settings.control_concurrency,
        beat=not args.no_beat,
        loglevel="INFO" if args.verbose else "WARNING",  # INFO logs every beat tick
        extra=["--hostname", f"inferq-control-{os.getpid()}@%h"],
    )
    app.worker_main(argv)
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from workers.export import ExportError, build_all

    settings = _settings(args)
    root = Path(args.repository) if args.repository else settings.resolved_model_repository
    try:
        for path in build_all(root, force=args.force):
            print(f"ready: {path}")
    except ExportError as exc:
        print(f"inferq models build: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from workers.repository import ModelRepository

    settings = _settings(args)
    for c in ModelRepository(settings.resolved_model_repository).configs():
        default = " (default)" if c.default else ""
        print(
            f"{c.name}/{c.version}{default}  adapter={c.adapter}  "
            f"max_batch_size={c.max_batch_size}  max_wait_ms={c.max_wait_ms}"
        )
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from inferq.wiring import ConfigError, kafka_config
    from transports.kafka import ensure_topics

    settings = _settings(args)
    try:
        config = kafka_config(settings, "inferq-admin")
    except ConfigError as exc:
        print(f"inferq topics create: {exc}", file=sys.stderr)
        return 2
    asyncio.run(
        ensure_topics(
            config, {settings.kafka_topic: settings.kafka_partitions, settings.dlq_topic: 1}
        )
    )
    print(
        f"topics ready: {settings.kafka_topic} ({settings.kafka_partitions} partitions), "
        f"{settings.dlq_topic}"
    )
    return 0


def cmd_queues_create(args: argparse.Namespace) -> int:
    from inferq.sqs_wiring import prepare_queues
    from transports.base import TransportError

    settings = _settings(args)
    try:
        asyncio.run(prepare_queues(settings, create=True))
    except TransportError as exc:
        print(f"inferq queues create: {exc}", file=sys.stderr)
        return 2
    print(
        f"queues ready: {settings.sqs_queue_name}, {settings.sqs_dlq} "
        f"(maxReceiveCount {settings.sqs_max_receive_count})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description=__doc__)
    parser.add_argument("--data-dir", help="data directory (INFERQ_DATA_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="local broker, API, workers, control plane, supervised")
    # ports: unset = the default, or a free one when the default is taken (the banner says)
    dev.add_argument("--port", type=int, help="API port (default 8000)")
    dev.add_argument("--kafka-port", type=int, help="embedded broker port (default 19092)")
    dev.add_argument("--workers", type=int, default=1)
    dev.add_argument("--aws-port", type=int, help="local moto_server port (sqs; default 15000)")
    dev.add_argument("--transport", choices=["kafka", "sqs"], default=None)
    dev.add_argument("--no-build", action="store_true", help="don't build missing models")
    dev.set_defaults(func=cmd_dev)

    api = sub.add_parser("api", help="run the HTTP API against external servers")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run one worker against external servers")
    worker.set_defaults(func=cmd_worker)

    control = sub.add_parser(
        "control", help="run the Celery control plane: webhook delivery and sweeps (with beat)"
    )
    control.add_argument("--concurrency", type=int, help="delivery threads")
    control.add_argument("--no-beat", action="store_true", help="don't embed the beat")
    control.add_argument(
        "--local-broker-fallback",
        action="store_true",
        help="use a server-less broker in the data dir when Redis is unreachable (dev)",
    )
    control.set_defaults(func=cmd_control)

    models = sub.add_parser("models", help="the model repository")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="export the shipped models to ONNX (offline, cached)")
    build.add_argument("--force", action="store_true")
    build.add_argument("--repository", help="model repository (INFERQ_MODEL_REPOSITORY)")
    build.set_defaults(func=cmd_models_build)
    msub.add_parser("list", help="list the repository").set_defaults(func=cmd_models_list)

    topics = sub.add_parser("topics", help="Kafka topics")
    tsub = topics.add_subparsers(dest="topics_command", required=True)
    tsub.add_parser("create", help="create the jobs and dead-letter topics").set_defaults(
        func=cmd_topics_create
    )

    queues = sub.add_parser("queues", help="SQS queues")
    qsub = queues.add_subparsers(dest="queues_command", required=True)
    qsub.add_parser(
        "create", help="create the jobs queue and its dead-letter queue (with RedrivePolicy)"
    ).set_defaults(func=cmd_queues_create)

    from inferq import dlq_cli, webhooks_cli

    dlq_cli.add_parser(sub)
    webhooks_cli.add_parser(sub).set_defaults(func=cmd_webhooks)
    _common_options_everywhere(parser)
    return parser


def _common_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``-v`` work after any subcommand too: ``inferq dlq list --data-dir X``."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in action.choices.values():
            known = {o for a in child._actions for o in a.option_strings}
            if "--data-dir" not in known:
                child.add_argument(
                    "--data-dir", default=argparse.SUPPRESS, help="data directory (INFERQ_DATA_DIR)"
                )
            if "--verbose" not in known:
                child.add_argument(
                    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="debug logging",
                )  # fmt: skip
            _common_options_everywhere(child)


def cmd_dlq(args: argparse.Namespace) -> int:
    from inferq import dlq_cli

    return dlq_cli.run(args, _settings(args))


def cmd_webhooks(args: argparse.Namespace) -> int:
    from inferq import webhooks_cli

    return webhooks_cli.run(args, _settings(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "dlq":
        args.func = cmd_dlq
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"inferq {args.command}: invalid setting: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code

"""Typed settings, read once from the environment (``INFERQ_*``) and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    # the in-memory transport serves tests inside one process; no role can run on it
    transport: Literal["kafka", "sqs"] = "kafka"
    data_dir: Path = Path(".inferq")

    kafka_bootstrap: str | None = None
    kafka_topic: str = "inferq.jobs"
    kafka_partitions: int = Field(default=4, ge=1)
    kafka_group: str = "inferq-workers"
    kafka_max_request_size: int = Field(default=1024 * 1024, ge=1024)  # largest record sent

    # SQS (boto3 reads region and credentials itself; the endpoint is read here, once)
    sqs_queue: str = "inferq-jobs"
    sqs_fifo: bool = False
    sqs_create_queues: bool = True  # create the queue and its DLQ on start when missing
    sqs_max_receive_count: int = Field(default=5, ge=1, le=1000)
    sqs_visibility_timeout_s: int = Field(default=60, ge=1, le=43_200)
    sqs_wait_time_s: int = Field(default=5, ge=0, le=20)
    sqs_max_message_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    aws_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL", "INFERQ_AWS_ENDPOINT_URL")
    )
    # S3 claim-check for large inputs and results
    s3_bucket: str | None = None  # unset: no offloading; input_url still needs an allowed bucket
    s3_prefix: str = "inferq/"
    s3_allowed_buckets: str | None = None  # comma-separated buckets input_url may name
    inline_input_max_bytes: int = Field(default=64 * 1024, ge=0)
    inline_result_max_bytes: int = Field(default=64 * 1024, ge=0)
    input_url_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    s3_presign_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    database_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_repository: Path | None = None

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(default=1, ge=1, le=64)  # processes of `inferq api` on the port
    worker_metrics_port: int = 9400

    max_backlog: int = Field(default=100_000, ge=1)
    max_backlog_per_model: dict[str, int] = Field(default_factory=dict)  # JSON: {"minilm": 5000}

    # dead letters: a payload too large for the destination keeps this much of its head
    # (all of it goes to s3_bucket when set); a publish failing this long ends in the table
    dlq_head_bytes: int = Field(default=64 * 1024, ge=0)
    dlq_publish_deadline_s: float = Field(default=60.0, gt=0)

    retry_max_attempts: int = Field(default=5, ge=1)
    retry_base_delay_s: float = Field(default=1.0, ge=0)
    retry_max_delay_s: float = Field(default=300.0, ge=0)

    autoscale_target_drain_s: float = Field(default=60.0, gt=0)
    autoscale_min_workers: int = Field(default=1, ge=0)
    autoscale_max_workers: int = Field(default=16, ge=1)
    autoscale_scale_down_delay_s: float = Field(default=120.0, ge=0)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_batch_body_bytes: int = Field(default=16_777_216, ge=1024)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    publish_attempts: int = Field(default=4, ge=1)
    # ?wait and Prefer: wait: the sweep behind the change feed, and how often a SQLite
    # store's data_version is looked at while anyone waits
    wait_sweep_s: float = Field(default=1.0, ge=0.05, le=60)
    wait_poll_s: float = Field(default=0.005, ge=0.001, le=1)

    worker_id: str | None = None
    worker_fetch_max_records: int = Field(default=512, ge=1)
    worker_lease_s: float = Field(default=300.0, gt=0)
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    # Kafka: a queued job unclaimed this long while the group has no backlog lost its message
    # (a broker that dropped acknowledged records); the retry pump publishes it again. At
    # least twice publish_timeout_s is used, so that no publish still in progress counts
    stranded_after_s: float = Field(default=120.0, gt=0)
    inference_threads: int = Field(default=0, ge=0)  # 0: let ONNX Runtime decide
    execution_providers: str | None = None  # e.g. "CPUExecutionProvider"; None: auto

    # --- job events (issue 10): SSE streams, and the relay onto <topic>.events / SNS ---
    events_publish: bool = True  # the worker's relay publishes stored events onto the bus
    events_relay_interval_s: float = Field(default=0.1, gt=0)
    events_relay_batch: int = Field(default=500, ge=1, le=10_000)
    sse_heartbeat_s: float = Field(default=15.0, gt=0)

    # --- webhooks and the Celery control plane (issue 4) ---
    webhook_secret: str | None = None  # whsec_...; comma-separated during a rotation
    webhook_allowed_hosts: str = ""  # hosts or CIDRs the SSRF guard lets through
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"  # seconds
    webhook_retry_jitter: float = Field(default=0.1, ge=0, le=1)
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0)
    webhook_read_timeout_s: float = Field(default=10.0, gt=0)
    webhook_total_timeout_s: float = Field(default=30.0, gt=0)
    webhook_max_url_length: int = Field(default=2048, ge=16)
    webhook_max_response_bytes: int = Field(default=65536, ge=0)
    webhook_lease_s: float = Field(default=60.0, gt=0)
    webhook_dispatch_interval_s: float = Field(default=0.5, gt=0)
    # hand each committed outcome's webhook to the control plane at once (over the Celery
    # broker, INFERQ_REDIS_URL); off: the dispatch sweep alone delivers (issue 10)
    webhook_handoff: bool = True
    control_concurrency: int = Field(default=8, ge=1)
    control_queue: str = "inferq-control"
    control_metrics_port: int = 9500  # 0: no metrics endpoint
    sweep_interval_s: float = Field(default=30.0, gt=0)
    result_retention_s: float = Field(default=7 * 86400.0, gt=0)
    job_max_attempts: int = Field(default=5, ge=1)  # lapsed leases before a job fails

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'jobs.db'}"

    @property
    def resolved_model_repository(self) -> Path:
        return (self.model_repository or self.data_dir / "models").expanduser().resolve()

    @property
    def dlq_topic(self) -> str:
        return f"{self.kafka_topic}.dlq"

    @property
    def sqs_queue_name(self) -> str:
        """The jobs queue: ``sqs_queue``, with ``.fifo`` added when ``sqs_fifo``."""
        from transports.sqs import queue_name

        return queue_name(self.sqs_queue, fifo=self.sqs_fifo)

    @property
    def sqs_dlq(self) -> str:
        from transports.sqs import dlq_name

        return dlq_name(self.sqs_queue_name)

    @property
    def allowed_buckets(self) -> frozenset[str]:
        """Buckets an ``input_url`` may name: the configured list plus our own bucket."""
        names = {b.strip() for b in (self.s3_allowed_buckets or "").split(",") if b.strip()}
        if self.s3_bucket:
            names.add(self.s3_bucket)
        return frozenset(names)

    @property
    def provider_preference(self) -> tuple[str, ...] | None:
        if not self.execution_providers:
            return None
        return tuple(p.strip() for p in self.execution_providers.split(",") if p.strip())

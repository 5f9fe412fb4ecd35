"""Typed settings, read once from the environment (``INFERQ_*``) and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    transport: Literal["kafka", "memory"] = "kafka"
    data_dir: Path = Path(".inferq")

    kafka_bootstrap: str | None = None
    kafka_topic: str = "inferq.jobs"
    kafka_partitions: int = Field(default=4, ge=1)
    kafka_group: str = "inferq-workers"

    database_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_repository: Path | None = None

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    worker_metrics_port: int = 9400

    max_backlog: int = Field(default=100_000, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    publish_attempts: int = Field(default=4, ge=1)

    worker_id: str | None = None
    worker_fetch_max_records: int = Field(default=512, ge=1)
    worker_lease_s: float = Field(default=300.0, gt=0)
    inference_threads: int = Field(default=0, ge=0)  # 0: let ONNX Runtime decide
    execution_providers: str | None = None  # e.g. "CPUExecutionProvider"; None: auto

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
    def provider_preference(self) -> tuple[str, ...] | None:
        if not self.execution_providers:
            return None
        return tuple(p.strip() for p in self.execution_providers.split(",") if p.strip())

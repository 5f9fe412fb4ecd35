"""Worker metrics, registered on an injected registry (no global default registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.batch_size = Histogram(
            "inferq_batch_size_jobs",
            "Jobs per inference batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_wait = Histogram(
            "inferq_batch_wait_seconds",
            "Time the first job of a batch waited for the batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "inferq_inference_duration_seconds",
            "Model run time per batch.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end = Histogram(
            "inferq_job_end_to_end_seconds",
            "Job creation to stored outcome.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.jobs = Counter(
            "inferq_jobs_processed_total",
            "Jobs that reached an outcome in this worker.",
            ["model", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "inferq_dlq_messages_total",
            "Messages sent to the dead-letter destination.",
            ["reason"],
            registry=registry,
        )
        self.dlq_trimmed = Counter(
            "inferq_dlq_trimmed_total",
            "Dead letters cut to their head to fit the destination (copy: s3 or none).",
            ["copy"],
            registry=registry,
        )
        self.dlq_unpublished = Counter(
            "inferq_dlq_unpublished_total",
            "Dead letters kept in the dead-letter table only: the destination refused them "
            "or stayed unreachable, or the worker was stopping.",
            ["reason"],
            registry=registry,
        )
        self.skipped = Counter(
            "inferq_messages_skipped_total",
            "Messages acknowledged without running (already terminal, cancelled, expired, dup).",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "inferq_retries_total",
            "Failed attempts scheduled for a retry.",
            ["model", "code"],
            registry=registry,
        )
        self.throughput = Gauge(
            "inferq_worker_throughput_jobs_per_second",
            "Jobs finished per second by this worker (EWMA).",
            registry=registry,
        )
        self.in_flight = Gauge(
            "inferq_worker_inflight_jobs", "Jobs claimed and not yet stored.", registry=registry
        )
        self.lag = Gauge(
            "inferq_consumer_lag_messages",
            "Messages not yet committed by the worker group.",
            ["source"],
            registry=registry,
        )
        self.model_info = Gauge(
            "inferq_model_info",
            "Models loaded by this worker, and the provider each runs on.",
            ["model", "version", "provider"],
            registry=registry,
        )

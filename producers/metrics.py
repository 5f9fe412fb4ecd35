"""API metrics on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 500)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "inferq_http_requests_total",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "inferq_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.submitted = Counter(
            "inferq_jobs_submitted_total",
            "Jobs accepted by the API.",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "inferq_jobs_rejected_total",
            "Job submissions refused, by error code.",
            ["code"],
            registry=registry,
        )
        # _count: the store transactions that wrote submitted jobs; _sum: the jobs they wrote
        self.insert_group = Histogram(
            "inferq_submit_insert_group_jobs",
            "Jobs of concurrent POST /v1/jobs requests written per store transaction.",
            buckets=GROUP_BUCKETS,
            registry=registry,
        )
        self.publish_retries = Counter(
            "inferq_publish_retries_total", "Publish attempts retried.", registry=registry
        )
        self.event_streams = Gauge(
            "inferq_event_streams",
            "Open job event streams (GET /v1/jobs/{id}/events).",
            registry=registry,
        )
        self.waiters = Gauge(
            "inferq_api_waiters",
            "Requests waiting for a job to finish (?wait, Prefer: wait).",
            registry=registry,
        )
        self.wait_lookups = Counter(
            "inferq_api_wait_lookups_total",
            "Store queries made for all waiters together: after a change the feed reported "
            "without statuses (feed) and by the slow sweep (sweep).",
            ["reason"],
            registry=registry,
        )

"""One webhook delivery attempt, and what follows from it. No Celery here: the tasks call in.

The attempt is an HTTP POST of the stored body, signed afresh (Standard Webhooks) with the
current timestamp, under connect/read timeouts and an overall deadline; redirects are not
followed and at most ``max_response_bytes`` of the answer are read. 2xx delivers, 410 disables
the endpoint, anything else (or no answer) schedules the next attempt from the retry schedule,
or from ``Retry-After`` on 429/503, until the schedule runs out. A URL the SSRF check refuses
(it resolves somewhere private now) fails at once with the reason; one whose host does not
resolve for now is retried.

The connection goes to an address the check approved, not to a fresh lookup of the host
(which a DNS-rebinding host could answer differently), keeping the ``Host`` header and TLS
server name: see webhooks/pinning.py.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from jobstore.outbox import AttemptResult, Claimed, WebhookOutbox
from jobstore.records import utcnow
from schemas.webhooks import DeliveryStatus
from webhooks.pinning import PinnedTransport, pinned
from webhooks.signing import WebhookSigner

log = logging.getLogger(__name__)

# immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (the Standard Webhooks schedule)
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
# Raises ValueError when the URL may not be called (with ``retryable`` True when that may
# change by itself, e.g. the host does not resolve for now); returns the addresses it checked.
UrlCheck = Callable[[str], Sequence[str]]


@dataclass(frozen=True)
class DeliverySchedule:
    """``schedule[n]`` is the wait before attempt n+1; its length is the attempt limit."""

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.1  # +/- this fraction of each wait
    max_retry_after_s: float = 86400.0

    def next_delay(self, attempts_done: int, retry_after_s: float | None = None) -> float | None:
        """Seconds until the next attempt, or None when the schedule is spent."""
        if attempts_done >= len(self.schedule):
            return None
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        base = self.schedule[attempts_done]
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True)
class DeliveryConfig:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_response_bytes: int = 65536
    user_agent: str = "inferq-webhooks/0.1"


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "inferq_webhook_deliveries_total",
            "Webhook delivery attempts by outcome",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "inferq_webhook_delivery_seconds",
            "Duration of one webhook HTTP attempt",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.lag = Histogram(
            "inferq_webhook_lag_seconds",
            "From the event entering the outbox to its successful delivery",
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 36000),
        )


@dataclass
class Deliverer:
    outbox: WebhookOutbox
    signer_keys: Callable[[], WebhookSigner]
    policy: DeliverySchedule
    config: DeliveryConfig
    check_url: UrlCheck
    metrics: WebhookMetrics
    client: httpx.Client = field(default_factory=lambda: new_client(DeliveryConfig()))

    def deliver(self, claim: Claimed) -> DeliveryStatus | None:
        """Attempt one delivery; None when the claim is stale (another task owns it)."""
        row = self.outbox.get(claim.id)
        if row is None or row.status != DeliveryStatus.DELIVERING or row.claim_token != claim.token:
            return None
        if row.endpoint_disabled:
            self.outbox.skip(claim, "endpoint disabled after 410 Gone")
            self.metrics.deliveries.labels("disabled").inc()
            return DeliveryStatus.DISABLED
        attempted_at = utcnow()
        started = time.perf_counter()
        status_code: int | None = None
        retry_after: float | None = None
        error: str | None = None
        refused = False
        try:
            addresses = self.check_url(row.url)
        except ValueError as exc:
            error = f"{getattr(exc, 'code', 'webhook_url_forbidden')}: {exc}"
            refused = not getattr(exc, "retryable", False)
        else:
            status_code, retry_after, error = self._post(
                row.id, row.url, row.payload.encode(), addresses
            )
        elapsed = time.perf_counter() - started
        self.metrics.seconds.observe(elapsed)
        attempt = AttemptResult(attempted_at, status_code, elapsed * 1000.0, error)

        next_at: datetime | None = None
        if refused:  # retrying cannot help until someone changes the DNS or the allowlist
            outcome = DeliveryStatus.FAILED
        elif status_code is not None and 200 <= status_code < 300:
            outcome = DeliveryStatus.DELIVERED
        elif status_code == 410:
            outcome = DeliveryStatus.DISABLED
        else:
            honoured = retry_after if status_code in (429, 503) else None
            delay = self.policy.next_delay(row.attempts + 1, honoured)
            if delay is None:
                outcome = DeliveryStatus.FAILED
            else:
                outcome = DeliveryStatus.PENDING
                next_at = utcnow() + timedelta(seconds=delay)
        self.outbox.record(claim, attempt, outcome=outcome, next_attempt_at=next_at)
        label = (
            "refused" if refused else {DeliveryStatus.PENDING: "retry"}.get(outcome, outcome.value)
        )
        self.metrics.deliveries.labels(label).inc()
        if outcome == DeliveryStatus.DELIVERED:
            self.metrics.lag.observe((utcnow() - row.created_at).total_seconds())
        else:
            log.info("webhook %s to %s: %s (%s)", row.id, row.url, label, error or status_code)
        return outcome

    def _post(
        self, msg_id: str, url: str, body: bytes, addresses: Sequence[str]
    ) -> tuple[int | None, float | None, str | None]:
        headers = {
            **self.signer_keys().headers(msg_id, int(time.time()), body),
            "content-type": "application/json",
            "user-agent": self.config.user_agent,
        }
        deadline = time.monotonic() + self.config.total_timeout_s
        try:
            with (
                pinned(url, addresses),
                self.client.stream("POST", url, content=body, headers=headers) as response,
            ):
                read = 0
                for chunk in response.iter_raw():
                    read += len(chunk)
                    if read >= self.config.max_response_bytes:
                        break  # enough: the status is what counts, the rest is dropped
                    if time.monotonic() > deadline:
                        return response.status_code, None, "the response body was too slow"
                code = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"))
        except httpx.TimeoutException as exc:
            return None, None, f"timeout: {type(exc).__name__}"
        except httpx.HTTPError as exc:
            return None, None, f"{type(exc).__name__}: {exc}"[:500]
        if 300 <= code < 400:
            return code, None, "redirects are not followed"
        if not 200 <= code < 300 and code != 410:
            return code, retry_after, f"HTTP {code}"
        return code, retry_after, None


def new_client(config: DeliveryConfig, *, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    timeout = httpx.Timeout(
        connect=config.connect_timeout_s,
        read=config.read_timeout_s,
        write=config.read_timeout_s,
        pool=config.connect_timeout_s,
    )
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    return httpx.Client(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: the SSRF check must see the target
        # connects to the addresses the check approved, not to a second lookup
        transport=PinnedTransport(verify=verify, limits=limits),
    )


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - utcnow()).total_seconds())


def parse_schedule(value: str | Sequence[float]) -> tuple[float, ...]:
    """``"0,5,300"`` -> (0.0, 5.0, 300.0)."""
    items = value.split(",") if isinstance(value, str) else value
    schedule = tuple(float(v) for v in items if str(v).strip())
    if not schedule or any(v < 0 for v in schedule):
        raise ValueError("the retry schedule is a non-empty list of non-negative seconds")
    return schedule

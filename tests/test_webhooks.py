"""Webhooks without Celery: signatures, the outbox transaction, the SSRF guard, the API
routes, and one delivery attempt against a real loopback receiver behaving badly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook

import jobstore.store as store_module
from jobstore.outbox import WebhookOutbox, webhook_id
from jobstore.records import NewJob, Outcome, utcnow
from jobstore.store import JobStore
from schemas.errors import ErrorCode
from schemas.jobs import JobStatus
from schemas.webhooks import DeliveryStatus, WebhookPayload
from tests.test_api import Api
from tests.test_api import api as api
from tests.test_jobstore import store as store
from tests.webhook_receiver import Receiver, closed_port
from webhooks.delivery import (
    Deliverer,
    DeliveryConfig,
    DeliverySchedule,
    WebhookMetrics,
    new_client,
    parse_retry_after,
    parse_schedule,
)
from webhooks.signing import SecretError, WebhookSigner, generate_secret, load_or_create_secret
from webhooks.ssrf import UrlGuard, WebhookUrlError

SECRET = generate_secret()
LOOPBACK = UrlGuard.from_allowlist(["127.0.0.1"])


def _outbox(store: JobStore) -> WebhookOutbox:
    return WebhookOutbox(store.engine, writer=store.writer)


def _job(job_id: str, url: str = "https://example.com/hook", events: list[str] | None = None):
    webhook: dict = {"url": url}
    if events is not None:
        webhook["events"] = events
    return NewJob(
        id=job_id, model="identity", version="1", input={"tensor": [1.0]}, webhook=webhook
    )


def _finish(store: JobStore, job_id: str, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    claimed = store.claim([job_id], worker_id="w", lease_s=60).claimed
    (record,) = claimed
    store.complete([Outcome(job_id, record.attempts, status, result={"y": [1.0]})])


# --- signatures -------------------------------------------------------------------------


def test_signature_verifies_with_standardwebhooks() -> None:
    signer = WebhookSigner.from_secrets([SECRET])
    body = b'{"type":"job.succeeded"}'
    headers = signer.headers("msg_1", int(time.time()), body)
    Webhook(SECRET).verify(body, headers)  # raises when wrong


def test_rotation_gives_one_signature_per_secret_and_both_verify() -> None:
    old, new = generate_secret(), generate_secret()
    signer = WebhookSigner.from_secrets([new, old])
    body = b"{}"
    headers = signer.headers("msg_2", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)
    with pytest.raises(Exception, match="signature"):
        Webhook(generate_secret()).verify(body, headers)


@pytest.mark.parametrize("bad", ["whsec_", "whsec_!!!!", "whsec_c2hvcnQ="])
def test_bad_secrets_are_refused(bad: str) -> None:
    with pytest.raises(SecretError):
        WebhookSigner.from_secrets([bad])


def test_secret_is_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "webhook_secret"
    first = load_or_create_secret(path)
    assert first.startswith("whsec_") and load_or_create_secret(path) == first
    assert path.stat().st_mode & 0o777 == 0o600


# --- the outbox -------------------------------------------------------------------------


def test_outcome_and_webhook_row_commit_together(store: JobStore) -> None:
    store.create(_job("j1"))
    _finish(store, "j1")
    (delivery,) = _outbox(store).for_job("j1")
    assert delivery.id == webhook_id("j1", "job.succeeded")
    assert delivery.status == DeliveryStatus.PENDING
    payload = WebhookPayload.model_validate_json(
        _outbox(store).get(delivery.id).payload  # type: ignore[union-attr]
    )
    assert payload.type == "job.succeeded"
    assert payload.data.id == "j1" and payload.data.status == JobStatus.SUCCEEDED
    assert payload.data.result == {"y": [1.0]}


def test_a_failed_outbox_write_rolls_the_outcome_back(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create(_job("j1"))
    (record,) = store.claim(["j1"], worker_id="w", lease_s=60).claimed

    def crash(*args: object, **kwargs: object) -> int:
        raise RuntimeError("crash between the outcome and its webhook")

    monkeypatch.setattr(store_module, "enqueue_job_events", crash)
    with pytest.raises(RuntimeError):
        store.complete([Outcome("j1", record.attempts, JobStatus.SUCCEEDED, result={})])
    # neither happened: the job is still running, so its redelivery will complete it again
    assert store.get("j1").status == JobStatus.RUNNING  # type: ignore[union-attr]
    assert _outbox(store).for_job("j1") == []
    monkeypatch.undo()
    assert store.complete([Outcome("j1", record.attempts, JobStatus.SUCCEEDED, result={})])
    assert len(_outbox(store).for_job("j1")) == 1


def test_events_filter_and_default_terminal_events(store: JobStore) -> None:
    store.create(_job("default"))
    store.create(_job("all", events=["job.started", "job.failed", "job.succeeded"]))
    store.create(_job("failed-only", events=["job.failed"]))
    store.create(NewJob(id="none", model="identity", version="1", input={}))
    for job_id in ("default", "all", "failed-only", "none"):
        _finish(store, job_id)
    outbox = _outbox(store)
    assert [d.event for d in outbox.for_job("default")] == ["job.succeeded"]
    assert sorted(d.event for d in outbox.for_job("all")) == ["job.started", "job.succeeded"]
    assert outbox.for_job("failed-only") == []
    assert outbox.for_job("none") == []


def test_started_is_sent_once_across_redeliveries(store: JobStore) -> None:
    store.create(_job("j", events=["job.started"]))
    store.claim(["j"], worker_id="w1", lease_s=60)
    store.claim(["j"], worker_id="w2", lease_s=60)  # a redelivery: running -> running
    assert [d.event for d in _outbox(store).for_job("j")] == ["job.started"]


def test_cancel_expiry_and_poison_emit_their_events(store: JobStore) -> None:
    store.create(_job("c"))
    store.cancel("c")
    past = utcnow() - timedelta(seconds=5)
    store.create(
        NewJob(
            id="e",
            model="identity",
            version="1",
            input={},
            webhook={"url": "https://example.com/h"},
            expires_at=past,
        )
    )
    assert store.expire_overdue() == ["e"]
    store.create(_job("p"))
    assert store.fail_unstarted("p", "malformed_message", "bad")
    outbox = _outbox(store)
    assert [d.event for d in outbox.for_job("c")] == ["job.cancelled"]
    assert [d.event for d in outbox.for_job("e")] == ["job.expired"]
    assert [d.event for d in outbox.for_job("p")] == ["job.failed"]


def test_claim_due_hands_each_row_out_once_until_its_lease_lapses(store: JobStore) -> None:
    for i in range(5):
        store.create(_job(f"j{i}"))
        _finish(store, f"j{i}")
    outbox = _outbox(store)
    first = outbox.claim_due(limit=100, lease_s=60)
    assert len(first) == 5
    assert outbox.claim_due(limit=100, lease_s=60) == []
    later = utcnow() + timedelta(seconds=61)  # the tasks were lost: hand them out again
    again = outbox.claim_due(limit=100, lease_s=60, now=later)
    assert {c.id for c in again} == {c.id for c in first}
    assert all(c.token != first[0].token for c in again)


# --- SSRF -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://example.com/x", ErrorCode.WEBHOOK_URL_INVALID),
        ("http://nonexistent.invalid/hook", ErrorCode.WEBHOOK_URL_INVALID),
        ("https://example.com/" + "a" * 2100, ErrorCode.WEBHOOK_URL_INVALID),
        ("http://127.0.0.1:8000/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://localhost/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://10.1.2.3/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://192.168.0.1/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://169.254.169.254/latest/meta-data", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://[::1]/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://[::ffff:127.0.0.1]/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://224.0.0.1/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://100.100.100.200/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://0.0.0.0/hook", ErrorCode.WEBHOOK_URL_FORBIDDEN),
        ("http://metadata.google.internal/x", ErrorCode.WEBHOOK_URL_FORBIDDEN),
    ],
)
def test_ssrf_guard_refuses(url: str, code: ErrorCode) -> None:
    with pytest.raises(WebhookUrlError) as info:
        UrlGuard().check(url)
    assert info.value.code == code


def test_ssrf_allowlist_admits_hosts_and_cidrs() -> None:
    UrlGuard().check("http://93.184.216.34/hook")  # public: fine without an allowlist
    guard = UrlGuard.from_allowlist(["10.0.0.0/8", "localhost", "127.0.0.1"])
    guard.check("http://10.1.2.3/hook")
    guard.check("http://localhost:9000/hook")
    guard.check("http://127.0.0.1:9000/hook")
    with pytest.raises(WebhookUrlError):
        guard.check("http://192.168.1.1/hook")


def test_dns_rebinding_is_caught_at_each_check() -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    guard = UrlGuard(resolver=lambda host, port: next(answers))
    guard.check("http://rebind.example/hook")
    with pytest.raises(WebhookUrlError) as info:
        guard.check("http://rebind.example/hook")
    assert info.value.code == ErrorCode.WEBHOOK_URL_FORBIDDEN


# --- API --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("webhook", "code", "field"),
    [
        ({"url": "ftp://example.com/x"}, "field_invalid", "webhook.url"),
        ({"url": "http://nonexistent.invalid/h"}, "webhook_url_invalid", "webhook.url"),
        ({"url": "http://10.0.0.1/h"}, "webhook_url_forbidden", "webhook.url"),
        ({"url": "http://127.0.0.1:1/h"}, "webhook_url_forbidden", "webhook.url"),
        ({"url": "https://example.com/" + "a" * 2100}, "webhook_url_invalid", "webhook.url"),
        ({"url": "https://93.184.216.34/" + "a" * 2040}, "webhook_url_invalid", "webhook.url"),
        ({"url": "https://93.184.216.34/", "events": ["job.exploded"]}, "field_invalid", None),
    ],
)
async def test_bad_webhooks_are_refused_at_submit(
    api: Api,
    webhook: dict,
    code: str,
    field: str | None,
) -> None:
    r = await api.submit({"model": "minilm", "input": {"text": "x"}, "webhook": webhook})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["field"] == (field or "webhook.events.0")
    assert api.published() == []


async def test_delivery_log_and_replay_routes(api: Api) -> None:
    r = await api.submit(
        {"model": "minilm", "input": {"text": "x"}, "webhook": {"url": "https://93.184.216.34/h"}}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert (await api.client.get(f"/v1/jobs/{job_id}/webhooks")).json() == {"data": []}
    r = await api.client.post(f"/v1/jobs/{job_id}/webhooks/replay")
    assert r.status_code == 409 and r.json()["error"]["code"] == "webhook_nothing_to_replay"
    _finish(api.store, job_id)
    (delivery,) = (await api.client.get(f"/v1/jobs/{job_id}/webhooks")).json()["data"]
    assert delivery["id"] == webhook_id(job_id, "job.succeeded")
    assert delivery["status"] == "pending"
    r = await api.client.post(f"/v1/jobs/{job_id}/webhooks/replay")
    assert r.status_code == 202
    assert r.json()["data"][0]["id"] == delivery["id"]
    r = await api.client.get("/v1/jobs/nope/webhooks")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = await api.submit({"model": "minilm", "input": {"text": "x"}})
    r = await api.client.post(f"/v1/jobs/{r.json()['id']}/webhooks/replay")
    assert r.status_code == 409 and r.json()["error"]["code"] == "webhook_not_configured"


# --- one delivery attempt against a misbehaving receiver --------------------------------

FAST = DeliveryConfig(connect_timeout_s=1, read_timeout_s=0.5, total_timeout_s=2)


@pytest.fixture
def deliverer(store: JobStore) -> Iterator[Deliverer]:
    signer = WebhookSigner.from_secrets([SECRET])
    d = Deliverer(
        outbox=_outbox(store),
        signer_keys=lambda: signer,
        policy=DeliverySchedule(schedule=(0, 10, 10), jitter=0),
        config=FAST,
        check_url=LOOPBACK,
        metrics=WebhookMetrics(CollectorRegistry()),
        client=new_client(FAST),
    )
    yield d
    d.client.close()


def _attempt(store: JobStore, deliverer: Deliverer, url: str, job_id: str = "j"):
    store.create(_job(job_id, url=url))
    _finish(store, job_id)
    (claim,) = _outbox(store).claim_due(limit=10, lease_s=30)
    outcome = deliverer.deliver(claim)
    (delivery,) = _outbox(store).for_job(job_id)
    return outcome, delivery


@pytest.fixture
def receiver_factory() -> Iterator:
    started: list[Receiver] = []

    def make(mode: str) -> Receiver:
        r = Receiver(SECRET, mode=mode, hang_s=3)
        r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def test_delivered_and_verified(store, deliverer, receiver_factory) -> None:
    r = receiver_factory("ok")
    outcome, delivery = _attempt(store, deliverer, r.url)
    assert outcome == DeliveryStatus.DELIVERED and delivery.status == "delivered"
    assert r.rejected == [] and [x.msg_id for x in r.received] == [delivery.id]
    (attempt,) = delivery.attempt_log
    assert attempt.status_code == 200 and attempt.outcome == "delivered"


@pytest.mark.parametrize(
    ("mode", "status_code", "error"),
    [
        ("garbage", None, "RemoteProtocolError"),
        ("hang", None, "timeout"),
        ("redirect", 302, "redirects are not followed"),
        ("fail", 503, "HTTP 503"),
    ],
)
def test_bad_receivers_get_a_recorded_attempt_and_a_retry(
    store, deliverer, receiver_factory, mode: str, status_code: int | None, error: str
) -> None:
    r = receiver_factory(mode)
    outcome, delivery = _attempt(store, deliverer, r.url)
    assert outcome == DeliveryStatus.PENDING and delivery.status == "pending"
    (attempt,) = delivery.attempt_log
    assert attempt.status_code == status_code
    assert error in (attempt.error or "")
    assert attempt.outcome == "retry"
    assert delivery.next_attempt_at is not None
    assert 8 <= (delivery.next_attempt_at - attempt.attempted_at).total_seconds() <= 12


def test_receiver_down_is_a_retry(store, deliverer) -> None:
    outcome, delivery = _attempt(store, deliverer, f"http://127.0.0.1:{closed_port()}/h")
    assert outcome == DeliveryStatus.PENDING
    assert "ConnectError" in (delivery.attempt_log[0].error or "")


def test_enormous_body_is_not_read(store, deliverer, receiver_factory) -> None:
    r = receiver_factory("huge")
    outcome, delivery = _attempt(store, deliverer, r.url)
    assert outcome == DeliveryStatus.DELIVERED  # the status counts; 100 MiB were not read
    assert delivery.attempt_log[0].latency_ms < 20_000


def test_retry_after_is_honoured(store, deliverer, receiver_factory) -> None:
    r = receiver_factory("retry_after")
    outcome, delivery = _attempt(store, deliverer, r.url)
    assert outcome == DeliveryStatus.PENDING
    wait = (delivery.next_attempt_at - delivery.attempt_log[0].attempted_at).total_seconds()
    assert 0.5 <= wait <= 2.5  # Retry-After: 1, not the schedule's 10 s


def test_gone_disables_the_endpoint(store, deliverer, receiver_factory) -> None:
    r = receiver_factory("gone")
    outcome, delivery = _attempt(store, deliverer, r.url)
    assert outcome == DeliveryStatus.DISABLED and delivery.status == "disabled"
    assert _outbox(store).endpoint_disabled(r.url)
    # the next event to that endpoint is settled without a request
    requests = r.requests
    outcome, delivery = _attempt(store, deliverer, r.url, job_id="k")
    assert outcome == DeliveryStatus.DISABLED and r.requests == requests
    assert delivery.attempt_log[0].outcome == "skipped"


def test_schedule_runs_out_into_failed(store, receiver_factory) -> None:
    r = receiver_factory("fail")
    signer = WebhookSigner.from_secrets([SECRET])
    d = Deliverer(
        outbox=_outbox(store),
        signer_keys=lambda: signer,
        policy=DeliverySchedule(schedule=(0, 0, 0), jitter=0),
        config=FAST,
        check_url=LOOPBACK,
        metrics=WebhookMetrics(CollectorRegistry()),
        client=new_client(FAST),
    )
    store.create(_job("j", url=r.url))
    _finish(store, "j")
    outcomes = []
    for _ in range(3):
        (claim,) = _outbox(store).claim_due(limit=1, lease_s=30)
        outcomes.append(d.deliver(claim))
    assert outcomes == [DeliveryStatus.PENDING, DeliveryStatus.PENDING, DeliveryStatus.FAILED]
    (delivery,) = _outbox(store).for_job("j")
    assert delivery.status == "failed" and len(delivery.attempt_log) == 3
    assert _outbox(store).claim_due(limit=1, lease_s=30) == []
    d.client.close()


def test_url_rechecked_at_delivery(store, receiver_factory) -> None:
    r = receiver_factory("ok")
    signer = WebhookSigner.from_secrets([SECRET])
    d = Deliverer(
        outbox=_outbox(store),
        signer_keys=lambda: signer,
        policy=DeliverySchedule(schedule=(0, 10), jitter=0),
        config=FAST,
        check_url=UrlGuard(),  # no allowlist: loopback refused at send time
        metrics=WebhookMetrics(CollectorRegistry()),
        client=new_client(FAST),
    )
    outcome, delivery = _attempt(store, d, r.url)
    # refused now: failed at once, not retried on the schedule
    assert outcome == DeliveryStatus.FAILED and r.requests == 0
    assert "webhook_url_forbidden" in (delivery.attempt_log[0].error or "")
    d.client.close()


def test_helpers() -> None:
    assert parse_schedule("0, 5,300") == (0.0, 5.0, 300.0)
    with pytest.raises(ValueError):
        parse_schedule("")
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None
    assert DeliverySchedule(schedule=(0, 5)).next_delay(2) is None
    delay = DeliverySchedule(schedule=(0, 100), jitter=0.1).next_delay(1)
    assert delay is not None and 90 <= delay <= 110
    assert (
        json.loads(
            WebhookPayload(
                type="job.failed",
                timestamp=utcnow(),
                data={  # type: ignore[arg-type]
                    "id": "x",
                    "status": "failed",
                    "model": "m",
                    "version": None,
                    "created_at": utcnow(),
                },
            ).model_dump_json()
        )["type"]
        == "job.failed"
    )
    assert httpx  # imported for the fixtures' clients


# --- sweeps -----------------------------------------------------------------------------


def test_stale_running_jobs_are_republished_then_requeued(store: JobStore) -> None:
    from control import sweeps
    from schemas.envelope import decode_message

    store.create(_job("s", events=["job.failed"]))
    store.claim(["s"], worker_id="dead", lease_s=0.01)
    published: list = []
    later = utcnow() + timedelta(seconds=1)
    requeued, failed = sweeps.requeue_stale(store, published.extend, max_attempts=3, now=later)
    assert (requeued, failed) == (1, 0)
    assert store.get("s").status == JobStatus.QUEUED  # type: ignore[union-attr]
    (envelope,) = published
    headers, value = envelope.to_binary()
    again = decode_message(dict(headers), value)
    assert again.id == "s" and again.data.model == "identity"
    # the worker takes it again (attempt 2); a sweep during a live lease does nothing
    store.claim(["s"], worker_id="w", lease_s=60)
    assert sweeps.requeue_stale(store, published.extend, max_attempts=3) == (0, 0)


def test_purge_removes_old_finished_jobs_and_their_webhooks(store: JobStore) -> None:
    from control import sweeps

    store.create(_job("old"))
    _finish(store, "old")
    store.create(_job("running"))
    store.claim(["running"], worker_id="w", lease_s=60)
    assert sweeps.purge_finished(store, 3600, now=utcnow() + timedelta(hours=2)) == 1
    assert store.get("old") is None and _outbox(store).for_job("old") == []
    assert store.get("running") is not None


def test_our_verifier_accepts_what_we_sign_and_refuses_tampering_and_replays() -> None:
    from webhooks.signing import SignatureError, WebhookSigner, generate_secret

    old, new = generate_secret(), generate_secret()
    sender = WebhookSigner.from_secrets([new, old])
    body, now = b'{"type": "job.succeeded"}', 1_700_000_000
    headers = sender.headers("msg_1", now, body)
    WebhookSigner.from_secrets([old]).verify(body, headers, now=now)  # during a rotation
    WebhookSigner.from_secrets([new]).verify(body, headers, now=now + 299)
    with pytest.raises(SignatureError):
        sender.verify(body + b" ", headers, now=now)
    with pytest.raises(SignatureError):
        sender.verify(body, {**headers, "webhook-id": "msg_2"}, now=now)
    with pytest.raises(SignatureError):
        sender.verify(body, headers, now=now + 301)  # a replay, too late
    with pytest.raises(SignatureError):
        WebhookSigner.from_secrets([generate_secret()]).verify(body, headers, now=now)
    with pytest.raises(SignatureError):
        sender.verify(body, {"webhook-id": "msg_1"}, now=now)


def test_the_packaged_receiver_verifies_with_our_signer() -> None:
    import json as _json

    from webhooks.receiver import receiver
    from webhooks.signing import WebhookSigner, generate_secret

    secret = generate_secret()
    body = _json.dumps({"type": "job.succeeded", "data": {"id": "j1"}}).encode()
    headers = WebhookSigner.from_secrets([secret]).headers("msg_1", int(time.time()), body)
    with receiver(secret) as r:
        assert httpx.post(r.url, content=body, headers=headers).status_code == 200
        forged = {**headers, "webhook-signature": "v1,AAAA"}
        assert httpx.post(r.url, content=body, headers=forged).status_code == 400
    assert [(x.msg_id, x.job_id) for x in r.received] == [("msg_1", "j1")]
    assert len(r.rejected) == 1


def test_the_receiver_runs_as_a_command_and_prints_each_verified_delivery(
    tmp_path: Path,
) -> None:
    """`python -m webhooks.receiver`, as the README's local recipe runs it."""
    import re
    import signal
    import subprocess
    import sys

    secret_file = tmp_path / "webhook_secret"
    command = [sys.executable, "-m", "webhooks.receiver", "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--secret-file", str(secret_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # started before inferq wrote its secret: it waits for the file
        assert (
            proc.stdout.readline()
            == f"waiting for {secret_file} (inferq writes it when it first starts)\n"
        )
        secret_file.write_text(SECRET + "\n")  # as inferq writes it: with a newline
        first = proc.stdout.readline()
        found = re.search(r"receiving webhooks at (http://127\.0\.0\.1:\d+/hook)", first)
        assert found, first + proc.stdout.read()
        body = json.dumps(
            {"type": "job.succeeded", "data": {"id": "j1", "status": "succeeded"}}
        ).encode()
        headers = WebhookSigner.from_secrets([SECRET]).headers("msg_1", int(time.time()), body)
        assert httpx.post(found.group(1), content=body, headers=headers).status_code == 200
        forged = {**headers, "webhook-signature": "v1,AAAA"}
        assert httpx.post(found.group(1), content=body, headers=forged).status_code == 400
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert lines == [
        "verified job.succeeded job=j1 status=succeeded webhook-id=msg_1",
        "REJECTED msg_1: no signature matches",
        "stopped: 1 verified, 1 rejected",
    ], out


def test_the_receiver_command_says_why_it_cannot_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from webhooks.receiver import main

    with pytest.raises(SystemExit) as missing:
        main(["--secret-file", str(tmp_path / "webhook_secret"), "--wait-for-secret", "0"])
    assert missing.value.code == 2
    assert "inferq writes it there when it first starts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main(["--secret", "not-a-secret"])
    assert bad.value.code == 2 and "bad secret" in capsys.readouterr().err

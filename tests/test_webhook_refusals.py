"""The SSRF guard and IPv6 forms that carry an IPv4 address, webhook deliveries the guard
refuses, connections pinned to the checked address (DNS
rebinding), and endpoints disabled by 410 Gone brought back through the API and the CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from jobstore.outbox import WebhookOutbox
from jobstore.store import JobStore
from schemas.errors import ErrorCode
from schemas.webhooks import DeliveryStatus
from tests.test_api import Api
from tests.test_api import api as api
from tests.test_webhooks import _finish, _job
from tests.webhook_receiver import Receiver
from webhooks.delivery import (
    Deliverer,
    DeliveryConfig,
    DeliverySchedule,
    WebhookMetrics,
    new_client,
)
from webhooks.signing import WebhookSigner, generate_secret
from webhooks.ssrf import UrlGuard, WebhookUrlError

SECRET = generate_secret()
FAST = DeliveryConfig(connect_timeout_s=1, read_timeout_s=2, total_timeout_s=4)
HOST = "rebind.test"


def _outbox(store: JobStore) -> WebhookOutbox:
    return WebhookOutbox(store.engine, writer=store.writer)


def _deliverer(
    store: JobStore, guard: UrlGuard, client: httpx.Client | None = None, schedule=(0, 10, 10)
) -> Deliverer:
    signer = WebhookSigner.from_secrets([SECRET])
    return Deliverer(
        outbox=_outbox(store),
        signer_keys=lambda: signer,
        policy=DeliverySchedule(schedule=schedule, jitter=0),
        config=FAST,
        check_url=guard,
        metrics=WebhookMetrics(CollectorRegistry()),
        client=client or new_client(FAST),
    )


def _deliver(store: JobStore, deliverer: Deliverer) -> DeliveryStatus | None:
    (claim,) = _outbox(store).claim_due(limit=10, lease_s=30)
    return deliverer.deliver(claim)


def _start(**kw) -> Receiver:
    r = Receiver(SECRET, **kw)
    r.start()
    return r


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for r in started:
        r.stop()


# --- IPv6 forms of IPv4 addresses -------------------------------------------------------


# IPv6 forms that carry an IPv4 address the packets really go to: 6to4 (2002:V4::/48),
# Teredo (2001::/32: server, and the client XOR 0xffffffff), NAT64 (64:ff9b::/96 and the
# local-use 64:ff9b:1::/48), IPv4-mapped (::ffff:V4) and IPv4-compatible (::V4).
def _embedded_forms(v4: str) -> list[str]:
    n = int(ipaddress.IPv4Address(v4))
    hi, lo = n >> 16, n & 0xFFFF
    teredo_client = n ^ 0xFFFFFFFF
    compatible = [f"::{hi:x}:{lo:x}"] if n > 1 else []  # :: and ::1 are not that form
    return [
        *compatible,
        f"2002:{hi:x}:{lo:x}::1",
        f"2002:{hi:x}:{lo:x}::",
        f"2001:0:{hi:x}:{lo:x}:0:0:{teredo_client >> 16:x}:{teredo_client & 0xFFFF:x}",
        f"2001:0:5db8:5db8:8000:f227:{teredo_client >> 16:x}:{teredo_client & 0xFFFF:x}",
        f"64:ff9b::{hi:x}:{lo:x}",
        f"64:ff9b::{v4}",
        f"::ffff:{v4}",
    ]


@pytest.mark.parametrize(
    ("v4", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.200", "cloud metadata"),
        ("0.0.0.0", "unspecified"),
    ],
)
def test_ssrf_guard_sees_the_ipv4_inside_ipv6_forms(v4: str, kind: str) -> None:
    for address in _embedded_forms(v4):
        with pytest.raises(WebhookUrlError) as info:
            UrlGuard().check(f"http://[{address}]/hook")
        assert info.value.code == ErrorCode.WEBHOOK_URL_FORBIDDEN, address
        if address.startswith("2001:0:5db8"):  # Teredo: the public server, a private client
            assert "client" in info.value.message, (address, info.value.message)
        assert v4 in info.value.message and kind in info.value.message, (
            address,
            info.value.message,
        )
    # a Teredo address whose server is the private one (its client is 93.10.51.82)
    n = int(ipaddress.IPv4Address(v4))
    with pytest.raises(WebhookUrlError) as info:
        UrlGuard().check(f"http://[2001:0:{n >> 16:x}:{n & 0xFFFF:x}:8000:f227:a2f5:ccad]/hook")
    assert "server" in info.value.message and v4 in info.value.message


def test_ssrf_guard_lets_ipv6_forms_of_public_ipv4_through() -> None:
    for address in _embedded_forms("93.184.216.34"):
        addresses = UrlGuard().check(f"http://[{address}]/hook")
        assert len(addresses) == 1, address


def test_ssrf_guard_refuses_local_use_nat64_whatever_it_carries() -> None:
    # 64:ff9b:1::/48 is local-use (RFC 8215), not globally reachable, and its embedding
    # depends on a prefix length the guard cannot know
    for address in ("64:ff9b:1::5db8:d822", "64:ff9b:1:5db8:d8:2200::"):
        with pytest.raises(WebhookUrlError) as info:
            UrlGuard().check(f"http://[{address}]/hook")
        assert info.value.code == ErrorCode.WEBHOOK_URL_FORBIDDEN
    with pytest.raises(WebhookUrlError) as info:
        UrlGuard().check("http://[64:ff9b:1::7f00:1]/hook")
    assert "127.0.0.1" in info.value.message
    # an operator's own NAT64 prefix can be allowlisted; a v4 allowlist admits its forms too
    UrlGuard.from_allowlist(["64:ff9b:1::/48"]).check("http://[64:ff9b:1::5db8:d822]/hook")
    UrlGuard.from_allowlist(["10.0.0.0/8"]).check("http://[2002:a01:203::1]/hook")


# --- refused at delivery time: failed at once, with its reason -----------------------


async def test_a_url_refused_at_delivery_fails_at_once_with_its_reason(
    api: Api, receivers: list[Receiver]
) -> None:
    r = _start()
    receivers.append(r)
    api.store.create(_job("j", url=r.url))  # admitted at submit; resolves to loopback now
    _finish(api.store, "j")
    d = _deliverer(api.store, UrlGuard())
    try:
        assert _deliver(api.store, d) == DeliveryStatus.FAILED
    finally:
        d.client.close()
    assert r.requests == 0
    assert _outbox(api.store).claim_due(limit=10, lease_s=30) == []  # no retry is scheduled
    (delivery,) = (await api.client.get("/v1/jobs/j/webhooks")).json()["data"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 1
    assert delivery["next_attempt_at"] is None
    assert delivery["last_error"].startswith("webhook_url_forbidden: ")
    assert "127.0.0.1" in delivery["last_error"] and "loopback" in delivery["last_error"]
    (attempt,) = delivery["attempt_log"]
    assert attempt["outcome"] == "failed" and attempt["error"] == delivery["last_error"]


def test_a_host_that_does_not_resolve_for_now_is_retried(api: Api) -> None:
    def no_answer(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    api.store.create(_job("j", url="https://hooks.example.com/h"))
    _finish(api.store, "j")
    d = _deliverer(api.store, UrlGuard(resolver=no_answer))
    try:
        assert _deliver(api.store, d) == DeliveryStatus.PENDING
    finally:
        d.client.close()
    (delivery,) = _outbox(api.store).for_job("j")
    assert delivery.next_attempt_at is not None
    assert "does not resolve" in (delivery.last_error or "")


# --- DNS rebinding: the connection goes to the address the guard checked -------------


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What the HTTP client's own lookup of HOST answers: somewhere else than the guard's."""
    answers: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == HOST:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[HOST], int(port)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def _guard_seeing(address: str) -> UrlGuard:
    # the allowlist admits loopback so that real local servers can stand in for hosts
    return UrlGuard.from_allowlist(["127.0.0.0/8"], resolver=lambda host, port: [address])


def test_the_connection_goes_to_the_checked_address(
    api: Api, receivers: list[Receiver], rebinding_dns: dict[str, str]
) -> None:
    checked = _start(host="127.0.0.1")
    receivers.append(checked)
    rebound = _start(host="127.0.0.2", port=checked.port)  # same port, another address
    receivers.append(rebound)
    rebinding_dns[HOST] = "127.0.0.2"
    api.store.create(_job("j", url=checked.url_for(HOST)))
    _finish(api.store, "j")
    d = _deliverer(api.store, _guard_seeing("127.0.0.1"))
    try:
        assert _deliver(api.store, d) == DeliveryStatus.DELIVERED
    finally:
        d.client.close()
    assert rebound.requests == 0
    assert checked.requests == 1 and checked.rejected == []
    assert checked.host_headers == [f"{HOST}:{checked.port}"]


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


def _tls_for(name: str, tmp_path: Path) -> Tls:
    """A throwaway CA and a certificate for ``name`` only (no IP address in it)."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = cert("inferq test CA", ca_key, "inferq test CA", ca_key, True)
    leaf = cert(name, leaf_key, "inferq test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return Tls(server, client)


def test_a_pinned_https_connection_keeps_the_server_name(
    api: Api, receivers: list[Receiver], rebinding_dns: dict[str, str], tmp_path: Path
) -> None:
    tls = _tls_for(HOST, tmp_path)
    r = _start(host="127.0.0.1", tls=tls.server)
    receivers.append(r)
    rebinding_dns[HOST] = "127.0.0.2"  # nothing listens there
    api.store.create(_job("j", url=r.url_for(HOST)))
    _finish(api.store, "j")
    d = _deliverer(api.store, _guard_seeing("127.0.0.1"), new_client(FAST, verify=tls.client))
    try:
        outcome = _deliver(api.store, d)
    finally:
        d.client.close()
    (delivery,) = _outbox(api.store).for_job("j")
    assert outcome == DeliveryStatus.DELIVERED, delivery.last_error
    # the certificate names HOST only: it verified against HOST, sent as SNI and Host
    assert r.server_names == [HOST]
    assert r.host_headers == [f"{HOST}:{r.port}"]


def test_every_checked_address_is_tried_in_turn(api: Api, receivers: list[Receiver]) -> None:
    r = _start(host="127.0.0.1")
    receivers.append(r)
    # nothing listens on 127.0.0.3: that address refuses, the next one answers
    guard = UrlGuard.from_allowlist(
        ["127.0.0.0/8"], resolver=lambda host, port: ["127.0.0.3", "127.0.0.1"]
    )
    api.store.create(_job("j", url=r.url_for(HOST)))
    _finish(api.store, "j")
    d = _deliverer(api.store, guard)
    try:
        assert _deliver(api.store, d) == DeliveryStatus.DELIVERED
    finally:
        d.client.close()
    assert r.requests == 1


# --- an endpoint disabled by 410 Gone, enabled again ---------------------------------


async def test_a_disabled_endpoint_can_be_enabled_through_the_api(
    api: Api, receivers: list[Receiver]
) -> None:
    r = _start(mode="gone")
    receivers.append(r)
    api.store.create(_job("j", url=r.url))
    _finish(api.store, "j")
    d = _deliverer(api.store, UrlGuard.from_allowlist(["127.0.0.1"]))
    try:
        assert _deliver(api.store, d) == DeliveryStatus.DISABLED
        listed = (await api.client.get("/v1/webhooks/endpoints/disabled")).json()["data"]
        assert [e["url"] for e in listed] == [r.url] and "410" in listed[0]["reason"]

        resp = await api.client.post("/v1/webhooks/endpoints/enable", json={"url": r.url})
        assert resp.status_code == 200, resp.text
        assert resp.json()["url"] == r.url
        assert (await api.client.get("/v1/webhooks/endpoints/disabled")).json()["data"] == []
        assert not _outbox(api.store).endpoint_disabled(r.url)

        # a second time: nothing to enable, said clearly
        resp = await api.client.post("/v1/webhooks/endpoints/enable", json={"url": r.url})
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "webhook_endpoint_not_disabled"
        assert resp.json()["error"]["field"] == "url"

        # the receiver is back: a replay of the job's webhook now arrives
        r.mode = "ok"
        assert (await api.client.post("/v1/jobs/j/webhooks/replay")).status_code == 202
        assert _deliver(api.store, d) == DeliveryStatus.DELIVERED
        assert len(r.received) == 1
    finally:
        d.client.close()


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({}, "field_missing", "url"),
        ({"url": 7}, "field_invalid", "url"),
        # PostgreSQL cannot hold a NUL in text: found by schemathesis as a 500 there
        ({"url": "https://example.com/a\u0000b"}, "field_invalid", "url"),
        (b'{"url": "https://example.com/\\ud800"}', "field_invalid", "url"),  # lone surrogate
    ],
)
async def test_enable_refuses_a_bad_body(
    api: Api, body: dict | bytes, code: str, field: str
) -> None:
    url = "/v1/webhooks/endpoints/enable"
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        resp = await api.client.post(url, content=body, headers=headers)
    else:
        resp = await api.client.post(url, json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == code and resp.json()["error"]["field"] == field


def _inferq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq", *args], capture_output=True, text=True, timeout=60
    )


def test_a_disabled_endpoint_can_be_enabled_from_the_cli(tmp_path: Path) -> None:
    from jobstore.outbox import AttemptResult
    from jobstore.records import utcnow

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    url = "https://hooks.example.com/gone"
    store.create(_job("j", url=url))
    _finish(store, "j")
    (claim,) = _outbox(store).claim_due(limit=1, lease_s=30)
    _outbox(store).record(
        claim, AttemptResult(utcnow(), 410, 1.0, None), outcome=DeliveryStatus.DISABLED
    )
    store.close()

    listed = _inferq("--data-dir", str(tmp_path), "webhooks", "disabled")
    assert listed.returncode == 0, listed.stderr
    assert url in listed.stdout
    enabled = _inferq("--data-dir", str(tmp_path), "webhooks", "enable", url)
    assert enabled.returncode == 0, enabled.stderr
    assert f"enabled {url}" in enabled.stdout
    again = _inferq("--data-dir", str(tmp_path), "webhooks", "enable", url)
    assert again.returncode == 1 and "not disabled" in again.stderr
    listed = _inferq("--data-dir", str(tmp_path), "webhooks", "disabled")
    assert listed.returncode == 0 and url not in listed.stdout

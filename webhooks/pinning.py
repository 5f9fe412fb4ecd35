"""Webhook connections to the addresses the SSRF check approved, never to a fresh lookup.

The check resolves the host and approves its addresses; if the HTTP client then resolved the
host again, a DNS-rebinding host could answer a private address the second time. So the
client's network backend does not resolve: it connects to the addresses pinned for the host
by ``pinned`` around the request, and refuses a host that has none. The URL keeps its host
name, so the ``Host`` header, the TLS server name and certificate verification (and the
pool's keep-alive connections, which are per host) are what they would be without the pin.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
import httpx

# host (as httpcore's origin spells it: IDNA, lower case) -> addresses, per thread/task
_PINS: ContextVar[Mapping[str, tuple[str, ...]] | None] = ContextVar(
    "inferq_webhook_pins", default=None
)


def pin_key(url: str | httpx.URL) -> str:
    return httpx.URL(url).raw_host.decode("ascii").lower()


@contextmanager
def pinned(url: str, addresses: Sequence[str]) -> Iterator[None]:
    """Requests to ``url``'s host inside this block connect to ``addresses``, in order."""
    token = _PINS.set({**(_PINS.get() or {}), pin_key(url): tuple(dict.fromkeys(addresses))})
    try:
        yield
    finally:
        _PINS.reset(token)


class PinnedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, with the host name replaced by its pinned addresses."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = (_PINS.get() or {}).get(host.lower())
        if not addresses:
            raise httpcore.ConnectError(f"no checked address for {host}: not resolving it again")
        failure: Exception | None = None
        for address in addresses:  # like socket.create_connection: the next on failure
            try:
                return self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are not sent to unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport (request mapping, exception mapping) over a PinnedBackend pool."""

    def __init__(self, *, verify: ssl.SSLContext | bool, limits: httpx.Limits) -> None:
        super().__init__(verify=verify, limits=limits, trust_env=False)
        # the only way to give httpx's transport another network backend: its pool
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedBackend(),
        )

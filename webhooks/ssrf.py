"""SSRF guard for webhook URLs: http(s) only, bounded length, and resolving only to public
addresses unless an allowlist (hosts or CIDRs) admits them.

An IPv6 address that carries an IPv4 one (IPv4-mapped or -compatible, 6to4, Teredo server
and client, NAT64 64:ff9b::/96) is judged by the IPv4 address its packets end up at; the
local-use NAT64 prefix 64:ff9b:1::/48 is refused unless allowlisted.

The same guard runs at submit time (a clear 422) and again before every delivery attempt,
because a name may resolve elsewhere later (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from schemas.errors import ErrorCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

# Cloud metadata endpoints that are not already non-global (AWS/GCP/Azure 169.254.169.254 is
# link-local; these are the stragglers).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "192.0.0.192")
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})

# IPv6 forms whose packets end up at an IPv4 address they carry: that address decides.
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: not global
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d


class WebhookUrlError(ValueError):
    """The URL is refused; ``code`` is webhook_url_invalid or webhook_url_forbidden.

    ``retryable``: the refusal may lift by itself (the host does not resolve for now), so a
    delivery retries it; any other refusal fails the delivery at once.
    """

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class UrlGuard:
    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_length: int = 2048
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_allowlist(
        cls, entries: Iterable[str], *, max_length: int = 2048, resolver: Resolver | None = None
    ) -> UrlGuard:
        """``entries``: host names (``hooks.internal``) or addresses/CIDRs (``10.0.0.0/8``)."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks), max_length, resolver or system_resolver)

    def check(self, url: str) -> list[str]:
        """Raise WebhookUrlError unless ``url`` may be called; return the addresses it has."""
        if len(url) > self.max_length:
            raise _invalid(f"the URL is longer than {self.max_length} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _invalid(f"the URL cannot be parsed: {exc}") from exc
        if parts.scheme not in ("http", "https"):
            raise _invalid("only http and https URLs can receive webhooks")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise _invalid("the URL has no host")
        port = port or (443 if parts.scheme == "https" else 80)
        host_allowed = host in self.allowed_hosts
        if host in METADATA_HOSTS and not host_allowed:
            raise _forbidden(f"{host} is a cloud metadata service")
        try:
            addresses = self.resolver(host, port)
        except UnicodeError as exc:
            raise _invalid(f"the host {host!r} is not a valid host name") from exc
        except OSError as exc:
            raise _unresolved(host) from exc
        if not addresses:
            raise _unresolved(host)
        if host_allowed:
            return addresses
        for text in addresses:
            address = _parse(text)
            if self._in_allowed_network(address):
                continue
            if address in _NAT64_LOCAL_USE:
                carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                raise _forbidden(
                    f"{host} resolves to {address}, a local-use NAT64 address (in the /96 "
                    f"form it carries {carried}); add it or its prefix to "
                    "INFERQ_WEBHOOK_ALLOWED_HOSTS to allow it"
                )
            embedded = _embedded(address)
            for role, carried in embedded:
                if not self._address_allowed(carried):
                    raise _forbidden(
                        f"{host} resolves to {address}, whose {role} is {carried}, a "
                        f"{_kind(carried)} address; add it to INFERQ_WEBHOOK_ALLOWED_HOSTS "
                        "to allow it"
                    )
            # a form that carries an IPv4 address is judged by it (all of them allowed)
            if not embedded and not self._address_allowed(address):
                raise _forbidden(
                    f"{host} resolves to {address}, a {_kind(address)} address; "
                    "add it to INFERQ_WEBHOOK_ALLOWED_HOSTS to allow it"
                )
        return addresses

    def __call__(self, url: str) -> list[str]:
        return self.check(url)

    def _in_allowed_network(self, address: IPAddress) -> bool:
        return any(
            address in net for net in self.allowed_networks if net.version == address.version
        )

    def _address_allowed(self, address: IPAddress) -> bool:
        return self._in_allowed_network(address) or _kind(address) is None


def _parse(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded(address: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, named by their role; [] for none.

    Not the local-use NAT64 prefix: where it carries the address depends on a prefix length
    the guard cannot know (RFC 6052), so that prefix is refused whole unless allowlisted.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    value = int(address)
    if address in _SIXTOFOUR:
        return [("embedded IPv4 (6to4)", ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF))]
    if address in _TEREDO:
        server = ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address((value & 0xFFFFFFFF) ^ 0xFFFFFFFF)
        return [("Teredo server", server), ("Teredo client", client)]
    if address in _NAT64_WELL_KNOWN:
        return [("embedded IPv4 (NAT64)", ipaddress.IPv4Address(value & 0xFFFFFFFF))]
    if address in _IPV4_COMPATIBLE and value > 1:  # not :: or ::1
        return [("embedded IPv4 (IPv4-compatible)", ipaddress.IPv4Address(value))]
    return []


def _kind(address: IPAddress) -> str | None:
    """Why an address is off limits, or None for a public unicast one."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return kind
    if not address.is_global:
        return "non-public"
    return None


def _invalid(message: str) -> WebhookUrlError:
    return WebhookUrlError(ErrorCode.WEBHOOK_URL_INVALID, message)


def _unresolved(host: str) -> WebhookUrlError:
    return WebhookUrlError(
        ErrorCode.WEBHOOK_URL_INVALID, f"the host {host!r} does not resolve", retryable=True
    )


def _forbidden(message: str) -> WebhookUrlError:
    return WebhookUrlError(ErrorCode.WEBHOOK_URL_FORBIDDEN, message)

"""SSRF guard for webhook URLs: http(s) only, bounded length, and resolving only to public
addresses unless an allowlist (hosts or CIDRs) admits them.

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


class WebhookUrlError(ValueError):
    """The URL is refused; ``code`` is webhook_url_invalid or webhook_url_forbidden."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        except (OSError, UnicodeError) as exc:
            raise _invalid(f"the host {host!r} does not resolve") from exc
        if not addresses:
            raise _invalid(f"the host {host!r} does not resolve")
        if host_allowed:
            return addresses
        for text in addresses:
            address = _parse(text)
            if not self._address_allowed(address):
                raise _forbidden(
                    f"{host} resolves to {address}, a {_kind(address)} address; "
                    "add it to INFERQ_WEBHOOK_ALLOWED_HOSTS to allow it"
                )
        return addresses

    def __call__(self, url: str) -> None:
        self.check(url)

    def _address_allowed(self, address: IPAddress) -> bool:
        if any(address in net for net in self.allowed_networks if net.version == address.version):
            return True
        return _kind(address) is None


def _parse(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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


def _forbidden(message: str) -> WebhookUrlError:
    return WebhookUrlError(ErrorCode.WEBHOOK_URL_FORBIDDEN, message)

"""X-Forwarded-For / X-Forwarded-Proto from trusted proxies (`--proxy-headers`).

Only applied to connections from `--forwarded-allow-ips`; from anyone else the headers are
ignored, so a client cannot claim another address. With a chain of proxies the client is the
right-most address that is not itself a trusted proxy.

The connection asks `ProxyHeaders.trusts(peer)` once, when it is made, and calls `apply(scope)`
only for trusted peers: with proxy headers off, or from an untrusted peer, a request pays nothing.
"""

from __future__ import annotations

import ipaddress
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_SCHEMES = frozenset(("http", "https", "ws", "wss"))


class TrustedHosts:
    """A set of IPs and networks, or everyone (`*`)."""

    def __init__(self, entries: list[str]) -> None:
        self.always = "*" in entries
        self.networks: list[IPNetwork] = []
        self.literals: set[str] = set()
        for entry in entries:
            if entry == "*":
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.literals.add(entry)  # e.g. a hostname

    def __contains__(self, host: object) -> bool:
        if self.always:
            return True
        if not isinstance(host, str):
            return False
        if host in self.literals:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        mapped = address.ipv4_mapped if address.version == 6 else None
        if mapped is not None:  # a dual-stack socket (`--host ::`) reports IPv4 peers so
            candidates.append(mapped)
        return any(ip in network for ip in candidates for network in self.networks)

    def client_of(self, forwarded_for: str) -> str | None:
        """The right-most address in an X-Forwarded-For chain that is not a trusted proxy."""
        hosts = [item.strip() for item in forwarded_for.split(",") if item.strip()]
        if not hosts:
            return None
        if not self.always:
            for host in reversed(hosts):
                if host not in self:
                    return host
        return hosts[0]


class ProxyHeaders:
    """Applies X-Forwarded-For/Proto to the scopes of requests from trusted peers."""

    def __init__(self, trusted_hosts: list[str]) -> None:
        self.trusted = TrustedHosts(trusted_hosts)
        self._cache: dict[str, bool] = {}

    def trusts(self, client: tuple[str, int] | None) -> bool:
        """Is this peer a trusted proxy? Cached per address: asked once per connection."""
        if client is None:
            return self.trusted.always
        host = client[0]
        trusted = self._cache.get(host)
        if trusted is None:
            trusted = host in self.trusted
            if len(self._cache) < 4096:
                self._cache[host] = trusted
        return trusted

    def apply(self, scope: dict[str, Any]) -> None:
        forwarded_for = forwarded_proto = None
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded_for = value.decode("latin-1")
            elif name == b"x-forwarded-proto":
                forwarded_proto = value.decode("latin-1")
        if forwarded_proto:
            proto = forwarded_proto.split(",")[-1].strip().lower()
            if proto in _SCHEMES:
                if scope["type"] == "websocket":
                    proto = proto.replace("http", "ws")
                scope["scheme"] = proto
        if forwarded_for:
            host = self.trusted.client_of(forwarded_for)
            if host:
                scope["client"] = (host, 0)

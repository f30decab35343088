"""X-Forwarded-For / X-Forwarded-Proto from trusted proxies (`--proxy-headers`).

Only applied to connections from `--forwarded-allow-ips`; from anyone else the headers are
ignored, so a client cannot claim another address. With a chain of proxies the client is the
right-most address that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress

from fulmen.types import ASGIApp, Receive, Scope, Send

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
                self.literals.add(entry)  # e.g. a hostname or "unix:" peer name

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
        return any(address in network for network in self.networks)

    def client_of(self, forwarded_for: str) -> str | None:
        """The right-most address in an X-Forwarded-For chain that is not a trusted proxy."""
        hosts = [item.strip() for item in forwarded_for.split(",") if item.strip()]
        if self.always:
            return hosts[0] if hosts else None
        for host in reversed(hosts):
            if host not in self:
                return host
        return hosts[0] if hosts else None


class ProxyHeadersMiddleware:
    def __init__(self, app: ASGIApp, trusted_hosts: list[str]) -> None:
        self.app = app
        self.trusted = TrustedHosts(trusted_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if client is not None and client[0] in self.trusted:
                self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: Scope) -> None:
        forwarded_for = forwarded_proto = None
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded_for = value.decode("latin-1")
            elif name == b"x-forwarded-proto":
                forwarded_proto = value.decode("latin-1")
        if forwarded_proto:
            proto = forwarded_proto.split(",")[-1].strip().lower()
            if proto in ("http", "https", "ws", "wss"):
                if scope["type"] == "websocket":
                    proto = proto.replace("http", "ws")
                scope["scheme"] = proto
        if forwarded_for:
            host = self.trusted.client_of(forwarded_for)
            if host:
                scope["client"] = (host, 0)

"""Proxy headers from trusted proxies (`--proxy-headers`, `--proxy-headers-mode`).

Two header families, never mixed (a client cannot spoof the family the proxy does not write):

- `x-forwarded` (default, as uvicorn): `X-Forwarded-For` and `X-Forwarded-Proto`, plus
  `X-Forwarded-Host` and `X-Forwarded-Port` with `--proxy-headers-host`.
- `forwarded`: RFC 7239 `Forwarded` (`for=`, `proto=`, `host=` with `--proxy-headers-host`,
  `by=` accepted and unused).

Only applied to connections from `--forwarded-allow-ips` (`unix:` trusts Unix socket peers);
from anyone else the headers are ignored, so a client cannot claim another address. With a chain
of proxies the client is the right-most hop that is not itself a trusted proxy.

The connection asks `ProxyHeaders.trusts(peer)` once, when it is made, and calls `apply(scope)`
only for trusted peers that sent one of the headers: a request without them pays nothing.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from fulmen.protocols.wire import valid_host

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MODES = ("x-forwarded", "forwarded")
UNIX = "unix:"
_SCHEMES = frozenset(("http", "https", "ws", "wss"))
_HTTP_SCHEME = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# One forwarded-pair (RFC 7239 §4) and the separator after it: ';' (same element), ',' (next
# element) or the end of the value.
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*([;,]|\Z)")
_SKIP = re.compile(r"[ \t,]*")  # empty list elements are allowed (RFC 9110 §5.6.1)
_UNESCAPE = re.compile(r"\\(.)")
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")


class TrustedHosts:
    """A set of IPs and networks, Unix socket peers (`unix:`), or everyone (`*`)."""

    def __init__(self, entries: list[str]) -> None:
        self.always = "*" in entries
        self.unix = self.always or UNIX in entries
        self.networks: list[IPNetwork] = []
        self.literals: set[str] = set()
        for entry in entries:
            if entry in ("*", UNIX):
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


def parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """The elements of a `Forwarded` value, each {lower-case name: unquoted value}, or None if
    it is malformed anywhere (then it is ignored as a whole: a client's malformed element could
    otherwise swallow the elements the proxies appended after it)."""
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    pos = 0
    end = len(value)
    while True:
        if not element:
            pos = _SKIP.match(value, pos).end()  # type: ignore[union-attr]
            if pos == end:
                return elements
        match = _PAIR.match(value, pos)
        if match is None:
            return None
        name, raw, separator = match.group(1, 2, 3)
        name = name.lower()
        if name in element:  # each parameter at most once per element (RFC 7239 §4)
            return None
        element[name] = _UNESCAPE.sub(r"\1", raw[1:-1]) if raw[0] == '"' else raw
        pos = match.end()
        if separator != ";":
            elements.append(element)
            element = {}
        if not separator:
            return elements


def parse_node(node: str) -> tuple[str, int] | None:
    """The address and port of a `for=` node (RFC 7239 §6): `192.0.2.1`, `192.0.2.1:8080`,
    `[2001:db8::1]:8080`; None for `unknown`, obfuscated identifiers (`_hidden`) and anything
    that is not an address. An obfuscated or absent port is 0."""
    if node.startswith("["):
        host, bracket, rest = node[1:].partition("]")
        if not bracket:
            return None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, colon, port = node.partition(":")
        rest = colon + port
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return None
    if not rest:
        return host, 0
    port = rest[1:]
    if rest[0] != ":":
        return None
    if port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535:
        return host, int(port)
    if _OBFUSCATED.fullmatch(port):
        return host, 0
    return None


def _last(values: list[bytes]) -> str:
    """The nearest proxy's value: the last item of the (joined) header lines."""
    return b",".join(values).decode("latin-1").rsplit(",", 1)[-1].strip()


class ProxyHeaders:
    """Applies proxy headers to the scopes of requests from trusted peers."""

    def __init__(
        self, trusted_hosts: list[str], mode: str = "x-forwarded", host: bool = False
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"proxy_headers_mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.trusted = TrustedHosts(trusted_hosts)
        self.forwarded = mode == "forwarded"
        self.host = host
        self._cache: dict[str, bool] = {}

    def trusts(self, client: tuple[str, int] | None) -> bool:
        """Is this peer a trusted proxy? Cached per address: asked once per connection.
        A peer without an address is a Unix socket peer."""
        if client is None:
            return self.trusted.unix
        host = client[0]
        trusted = self._cache.get(host)
        if trusted is None:
            trusted = host in self.trusted
            if len(self._cache) < 4096:
                self._cache[host] = trusted
        return trusted

    def apply(self, scope: dict[str, Any]) -> None:
        if self.forwarded:
            self._apply_forwarded(scope)
        else:
            self._apply_x_forwarded(scope)

    def _apply_x_forwarded(self, scope: dict[str, Any]) -> None:
        found: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            if name[:12] == b"x-forwarded-":
                found.setdefault(name, []).append(value)
        if b"x-forwarded-proto" in found:
            _set_scheme(scope, _last(found[b"x-forwarded-proto"]))
        if b"x-forwarded-for" in found:
            forwarded_for = b",".join(found[b"x-forwarded-for"]).decode("latin-1")
            client = self.trusted.client_of(forwarded_for)
            if client:
                scope["client"] = (client, 0)
        if self.host and (b"x-forwarded-host" in found or b"x-forwarded-port" in found):
            host = _last(found[b"x-forwarded-host"]) if b"x-forwarded-host" in found else None
            port = _last(found[b"x-forwarded-port"]) if b"x-forwarded-port" in found else None
            _set_host(scope, host, port)

    def _apply_forwarded(self, scope: dict[str, Any]) -> None:
        values = [value for name, value in scope["headers"] if name == b"forwarded"]
        if not values:
            return
        elements = parse_forwarded(b",".join(values).decode("latin-1"))
        if not elements:
            return
        chosen = elements[0]  # every hop trusted, or '*': the left-most
        if not self.trusted.always:
            for element in reversed(elements):
                node = parse_node(element.get("for", ""))
                if node is None or node[0] not in self.trusted:
                    chosen = element
                    break
        # The chosen element was written by the first trusted proxy: its proto and host are
        # what the client used to reach it.
        if "proto" in chosen:
            _set_scheme(scope, chosen["proto"].strip())
        client = parse_node(chosen.get("for", ""))
        if client is not None:
            scope["client"] = client
        if self.host and "host" in chosen:
            _set_host(scope, chosen["host"].strip(), None)


def _set_scheme(scope: dict[str, Any], proto: str) -> None:
    proto = proto.lower()
    if proto in _SCHEMES:
        table = _WS_SCHEME if scope["type"] == "websocket" else _HTTP_SCHEME
        scope["scheme"] = table[proto]


def _split_host(host: str) -> tuple[str, str] | None:
    """A Host value as (name, port text); None if it is not a valid Host."""
    if not host or not valid_host(host.encode("latin-1")):
        return None
    if host.startswith("["):
        name, _, port = host[1:].partition("]")
        return name, port[1:]
    name, _, port = host.partition(":")
    return (name, port) if name else None


def _set_host(scope: dict[str, Any], host: str | None, port: str | None) -> None:
    """`scope["server"]` and the `host` header follow the forwarded host and port."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    index = next((i for i, (name, _) in enumerate(headers) if name == b"host"), None)
    if host is None:  # only a port: the host the client asked for, with that port
        current = headers[index][1].decode("latin-1") if index is not None else ""
        parts = _split_host(current)
        if parts is None:
            if scope["server"] is None:
                return
            parts = (scope["server"][0], "")
    else:
        parts = _split_host(host)
        if parts is None:
            return
    name, host_port = parts
    text = port if port is not None and port.isascii() and port.isdigit() else host_port
    secure = scope["scheme"] in ("https", "wss")
    number = int(text) if text and len(text) <= 5 else 0
    if not 0 < number <= 65535:
        number = 443 if secure else 80
    value = f"[{name}]" if ":" in name else name
    if number != (443 if secure else 80):
        value += f":{number}"
    scope["server"] = (name, number)
    if index is None:
        headers.append((b"host", value.encode("latin-1")))
    else:
        headers[index] = (b"host", value.encode("latin-1"))

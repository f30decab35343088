"""Access log lines: `--access-log-format` (`AccessFormat`) and the timing its `bytes` and
`duration_ms` atoms need (`timed_app`).

A format is parsed and checked once (`Config` checks it at startup), then `AccessFormat.log`
computes only the atoms it uses, per line, to the `fulmen.access` logger. The logging
configuration itself (handlers, colours, JSON lines) is `fulmen.logging`'s. A leaf module:
`fulmen.config` imports it.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from typing import Any

from fulmen.protocols.wire import REASONS, escape

# The default line, as atoms: `127.0.0.1:51234 - "GET /path?q=1 HTTP/1.1" 200 OK`.
DEFAULT_ACCESS_FORMAT = '%(client)s - "%(method)s %(target)s %(protocol)s" %(status)d %(reason)s'
_ATOM = re.compile(r"%\(([^)]*)\)")
_HEADER_ATOM = re.compile(r"\{([!#$%&'*+.^_`|~0-9A-Za-z-]+)\}([io])")
# Each atom with a sample value, to check the format's conversions once, at startup.
ATOMS: dict[str, Any] = {
    "client": "127.0.0.1:51234",
    "method": "GET",
    "path": "/",
    "query": "",
    "target": "/",
    "protocol": "HTTP/1.1",
    "scheme": "http",
    "status": 200,
    "reason": "OK",
    "bytes": 0,
    "duration_ms": 0.0,
    "timestamp": "2000-01-01T00:00:00.000+00:00",
}
_TIMED = frozenset(("bytes", "duration_ms"))
STATS_KEY = "fulmen.access"  # scope key of [start time, body bytes] when the format uses them


class AccessFormat:
    """A parsed `--access-log-format`: which atoms it uses, computed only those per line."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.atoms: list[str] = []
        self.request_headers: list[tuple[str, bytes]] = []
        self.response_headers: list[tuple[str, bytes]] = []
        for key in dict.fromkeys(_ATOM.findall(fmt)):
            header = _HEADER_ATOM.fullmatch(key)
            if header is not None:
                target = self.request_headers if header[2] == "i" else self.response_headers
                target.append((key, header[1].lower().encode("ascii")))
            elif key in ATOMS:
                self.atoms.append(key)
            else:
                raise ValueError(
                    f"access_log_format: unknown atom %({key}); use {', '.join(ATOMS)}, "
                    "{header-name}i or {header-name}o"
                )
        sample = {key: ATOMS[key] for key in self.atoms}
        sample.update((key, "-") for key, _ in self.request_headers + self.response_headers)
        try:
            fmt % sample
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"access_log_format {fmt!r} is not a valid format: {exc}") from None
        self.timed = not _TIMED.isdisjoint(self.atoms)

    def log(self, scope: dict[str, Any], status: int, headers: Any) -> None:
        """Log one access line for a request `scope` answered with `status` and `headers`."""
        fields = self.fields(scope, status, headers)
        text = {k: escape(v) if isinstance(v, str) else v for k, v in fields.items()}
        access_logger.info(self.fmt, text, extra={"status_code": status, "access": fields})

    def fields(self, scope: dict[str, Any], status: int, headers: Any) -> dict[str, Any]:
        """The raw (unescaped) value of each atom the format uses."""
        fields: dict[str, Any] = {}
        for atom in self.atoms:
            fields[atom] = _COMPUTE[atom](scope, status)
        for key, name in self.request_headers:
            fields[key] = _header(scope["headers"], name)
        for key, name in self.response_headers:
            fields[key] = _header(headers, name)
        return fields


access_logger = logging.getLogger("fulmen.access")


def _header(headers: Any, name: bytes) -> str:
    values = [bytes(value) for key, value in headers if bytes(key).lower() == name]
    return b", ".join(values).decode("latin-1") if values else "-"


def _client(scope: dict[str, Any], status: int) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _query(scope: dict[str, Any]) -> str:
    return bytes(scope.get("query_string", b"")).decode("latin-1")


def _target(scope: dict[str, Any], status: int) -> str:
    query = _query(scope)
    return f"{scope['path']}?{query}" if query else str(scope["path"])


def _stat(scope: dict[str, Any], index: int) -> Any:
    stats = scope.get(STATS_KEY)
    if stats is None:
        return 0
    return stats[1] if index else (time.perf_counter() - stats[0]) * 1000.0


_COMPUTE: dict[str, Any] = {
    "client": _client,
    "method": lambda scope, status: scope.get("method", "GET"),  # a WebSocket scope has none
    "path": lambda scope, status: scope["path"],
    "query": lambda scope, status: _query(scope),
    "target": _target,
    "protocol": lambda scope, status: f"HTTP/{scope['http_version']}",
    "scheme": lambda scope, status: scope["scheme"],
    "status": lambda scope, status: status,
    "reason": lambda scope, status: REASONS.get(status, ""),
    "bytes": lambda scope, status: _stat(scope, 1),
    "duration_ms": lambda scope, status: _stat(scope, 0),
    "timestamp": lambda scope, status: iso_time(time.time()),
}


def timed_app(app: Any) -> Any:
    """Wrap `app` to record, in its scope, when it started and the body bytes it sent: for the
    `bytes` and `duration_ms` atoms only. The counts are taken before each message is passed
    on, because the access line is written inside the last `send`."""

    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        stats = scope[STATS_KEY] = [time.perf_counter(), 0]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                stats[1] += len(message.get("body", b""))
            await send(message)

        await app(scope, receive, counting_send)

    return timed


def iso_time(created: float) -> str:
    """`created` (seconds since the epoch) in ISO 8601, local time, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(created).astimezone()
    return moment.isoformat(timespec="milliseconds")

"""Bytes helpers for HTTP/1.1: status lines, header checks, chunk framing, canned responses."""

from __future__ import annotations

import http
import re
from email.utils import formatdate

# RFC 9110 §5.6.2: a field name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: no CR, LF or NUL in a field value (response splitting).
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
# RFC 9112 §3.2 / RFC 3986 §3.2.2: host = IP-literal / IPv4address / reg-name, then [":" port].
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")

STATUS_LINES: dict[int, bytes] = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in http.HTTPStatus
}
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# RFC 9110 §6.4.1: these never carry content.
NO_BODY_STATUSES = frozenset({204, 304})


def status_line(status: int) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`, precomputed for every known status."""
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status!r}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


_valid_names: set[bytes] = set()


def check_header(name: bytes, value: bytes) -> None:
    """Refuse a header that could split the response or is not a valid field."""
    if name not in _valid_names:
        if not isinstance(name, bytes) or _TOKEN.fullmatch(name) is None:
            raise RuntimeError(f"Invalid HTTP header name {name!r}")
        if len(_valid_names) < 1024:  # names repeat; values do not, so only names are cached
            _valid_names.add(name)
    if not isinstance(value, bytes) or _BAD_VALUE.search(value) is not None:
        raise RuntimeError(f"Invalid HTTP header value {value!r}")


def valid_host(value: bytes) -> bool:
    return _HOST.fullmatch(value) is not None


def chunk(data: bytes) -> bytes:
    """Frame `data` as one chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def http_date() -> bytes:
    return formatdate(usegmt=True).encode("ascii")


def default_header_lines(
    server_header: bool, date_header: bool, extra: list[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """The (lower-case name, header line) pairs added to every response; rebuilt each second."""
    lines: list[tuple[bytes, bytes]] = []
    if server_header:
        lines.append((b"server", b"server: fulmen\r\n"))
    if date_header:
        lines.append((b"date", b"date: " + http_date() + CRLF))
    for name, value in extra:
        raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
        check_header(raw_name, raw_value)
        lines.append((raw_name.lower(), raw_name + b": " + raw_value + CRLF))
    return lines


def simple_response(status: int, body: bytes, defaults: bytes, close: bool = True) -> bytes:
    """A complete plain-text response, e.g. for a rejected request or an app error."""
    connection = b"connection: close\r\n" if close else b""
    return b"".join(
        (
            status_line(status),
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % len(body),
            connection,
            defaults,
            CRLF,
            body,
        )
    )


def escape(text: str) -> str:
    """Make untrusted text safe for a log line: control characters become escapes."""
    return text.translate(_CONTROL_ESCAPES)


_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), 127)}

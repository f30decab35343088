"""HTTP/2 header blocks (RFC 9113 §8.2, §8.3): a request's pseudo-header and field rules, and
a response's fields as the application sent them.

A malformed request raises `Malformed`, which resets only its stream (PROTOCOL_ERROR, RFC 9113
§8.1.1): it is a stream error, not a connection error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fulmen.protocols.fields import (
    CONNECTION,
    CONTENT_LENGTH,
    ORDINARY,
    SERVER_OR_DATE,
    TRANSFER_ENCODING,
    Kind,
    check,
)
from fulmen.protocols.fields import content_length as app_content_length
from fulmen.protocols.h2frames import ConnectionFailure, ErrorCode
from fulmen.protocols.hpack import Decoder, HeaderListTooLarge, HPACKError, encode_field

# RFC 9113 §8.2.1: lower-case tokens only; values without NUL, CR, LF or edge whitespace.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
# §8.2.2: fields that only make sense on one HTTP/1.1 connection.
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_FORWARDING = frozenset(
    (
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
    )
)
STATUS_BYTES = {status: b"%d" % status for status in range(100, 600)}
# Never sent in HTTP/2 (or HTTP/3) responses: the connection-specific fields, and `te`
# (request-only).
NOT_SENT = _CONNECTION_SPECIFIC | {b"te"}
_SPACE = (32, 9)  # SP, HTAB
_KEPT_BLOCKS = 64  # decoded requests kept per connection (see `HeaderBlocks`)
_KEPT_BLOCK_SIZE = 1024  # larger blocks are rare, and would hold memory per connection


def field_value(value: bytes) -> bytes:
    """A response field value without the edge whitespace HTTP/2 forbids (RFC 9113 §8.2.1;
    HTTP/1.1 strips it when parsing, so nothing is lost)."""
    if value and (value[0] in _SPACE or value[-1] in _SPACE):
        return value.strip(b" \t")
    return value


class Malformed(Exception):
    """A request that breaks RFC 9113 §8: its stream is reset with PROTOCOL_ERROR."""


class Request:
    """The parts of a request's header block the server acts on."""

    __slots__ = (
        "authority",
        "expect",
        "forwarded",
        "headers",
        "method",
        "path",
        "protocol",
        "scheme",
        "te_trailers",
    )

    def __init__(self) -> None:
        self.method = self.scheme = self.authority = self.path = self.protocol = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.forwarded = False  # proxy headers to apply, if the peer is trusted
        self.te_trailers = False  # `te: trailers`: the client reads response trailers
        self.expect = False  # `expect: 100-continue`


def parse_request(block: Iterable[tuple[bytes, bytes]], connect_protocol: bool) -> Request:
    """Check a request's header block (§8.3.1); `connect_protocol`: extended CONNECT (RFC 8441)
    was offered. The regular fields keep their order; `:authority` becomes `host` when the
    request has none (as an HTTP/1.1 request would carry it)."""
    request = Request()
    headers = request.headers
    host: bytes | None = None
    cookie: int | None = None  # where the cookie field is
    seen: set[bytes] = set()
    for name, value in block:
        if _BAD_VALUE.search(value) is not None:
            raise Malformed(f"invalid value of {name!r}")
        if name[:1] == b":":
            if headers or name not in _PSEUDO or name in seen:
                raise Malformed(f"misplaced, unknown or repeated pseudo-header {name!r}")
            seen.add(name)
            setattr(request, name[1:].decode(), value)
            continue
        if _NAME.fullmatch(name) is None:
            raise Malformed(f"invalid field name {name!r}")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise Malformed(f"connection-specific field {name!r}")
        if name == b"host":
            if host is not None:
                raise Malformed("repeated host")
            host = value
        elif name == b"te":
            request.te_trailers = True
        elif name == b"cookie":
            # §8.2.3: crumbs sent as separate fields are one field for the application.
            if cookie is not None:
                headers[cookie] = (name, headers[cookie][1] + b"; " + value)
                continue
            cookie = len(headers)
        else:
            _note(request, name, value)
        headers.append((name, value))
    _check_pseudo(request, seen, connect_protocol)
    if request.authority:
        if host is None:
            headers.append((b"host", request.authority))
        elif host != request.authority:  # §8.3.1: they must name the same origin
            raise Malformed("host differs from :authority")
    return request


def _note(request: Request, name: bytes, value: bytes) -> None:
    if name in _FORWARDING:
        request.forwarded = True
    elif name == b"expect":
        request.expect = value.lower() == b"100-continue"


def trailers_valid(block: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's trailer section is well formed: fields as in its header section,
    and no pseudo-header (RFC 9113 §8.1)."""
    return all(
        _NAME.fullmatch(name) is not None and _BAD_VALUE.search(value) is None
        for name, value in block
    )


class HeaderBlocks:
    """The header blocks one connection receives: decoded with its HPACK table (RFC 7541), and
    the requests among them kept by their octets while the table holds still, since a client
    sends the same few blocks over and over (after its first request, a block is typically a
    few one-octet references to the table)."""

    __slots__ = ("connect_protocol", "decoder", "requests")

    def __init__(self, max_list_size: int, connect_protocol: bool) -> None:
        self.decoder = Decoder(max_list_size)
        self.connect_protocol = connect_protocol  # extended CONNECT offered (RFC 8441)
        self.requests: dict[bytes, Request] = {}

    def fields(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of `block`. One that cannot be decoded is a connection error (RFC 9113
        §4.3), as is a header list over the limit: the client is abusing the table (an "HPACK
        bomb"). A block that changes the table makes the kept requests stale: the same octets
        may mean other fields now."""
        decoder = self.decoder
        changes = decoder.changes
        try:
            fields = decoder.decode(block)
        except HeaderListTooLarge as exc:
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from exc
        except HPACKError as exc:
            raise ConnectionFailure(ErrorCode.COMPRESSION_ERROR, str(exc)) from exc
        if decoder.changes != changes:
            self.requests.clear()
        return fields

    def request(self, block: bytes) -> Request:
        """The request of `block` (as `fields`; Malformed, a stream error), kept if the table
        held still. The caller looks in `requests` first."""
        changes = self.decoder.changes
        request = parse_request(self.fields(block), self.connect_protocol)
        requests = self.requests
        if self.decoder.changes == changes and len(block) <= _KEPT_BLOCK_SIZE:
            if len(requests) >= _KEPT_BLOCKS:
                requests.clear()
            requests[block] = request
        return request


def from_http1(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    """The request of an HTTP/1.1 `Upgrade: h2c` (RFC 7540 §3.2), answered on stream 1,
    without the fields that belonged to its HTTP/1.1 connection."""
    request = Request()
    request.method = method
    request.path = target
    for name, value in headers:
        if name in _CONNECTION_SPECIFIC or name == b"http2-settings":
            continue
        if name == b"te":
            request.te_trailers = b"trailers" in value.lower()
            continue
        _note(request, name, value)
        request.headers.append((name, value))
    return request


def _check_pseudo(request: Request, seen: set[bytes], connect_protocol: bool) -> None:
    if not request.method:
        raise Malformed("no :method")
    if request.method == b"CONNECT":
        if not request.protocol:  # §8.5: a tunnel to :authority, nothing else
            if seen != {b":method", b":authority"}:
                raise Malformed("CONNECT with pseudo-headers besides :authority")
            return
        if not connect_protocol:
            raise Malformed(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
        if not request.authority:  # RFC 8441 §4: :scheme and :path as well, below
            raise Malformed("extended CONNECT without :authority")
    elif request.protocol:
        raise Malformed(":protocol on a method other than CONNECT")
    path = request.path
    if not request.scheme or not path:
        raise Malformed("no :scheme or :path")
    if path[:1] != b"/" and not (path == b"*" and request.method == b"OPTIONS"):
        raise Malformed("invalid :path")


# What a response field becomes, by the (name, value) pair the application sent (when it is a
# tuple: a list is checked every time): its HPACK octets (empty if HTTP/2 drops it), its kind,
# its lower-case name, and the Content-Length value for that kind. Bounded as HTTP/1.1's lines.
_Entry = tuple[bytes, Kind, bytes, int]
_ENTRIES: dict[tuple[bytes, bytes], _Entry] = {}
_ENTRIES_MAX = 1024
_STATUS_FIELDS = {status: encode_field(b":status", value) for status, value in STATUS_BYTES.items()}
_DEFAULTS: tuple[object, bytes] = (None, b"")  # the last `defaults` list, and its octets


def _entry(header: tuple[bytes, bytes]) -> _Entry:
    """Check a response field (`fields.check`, as for HTTP/1.1) and encode it, cached."""
    lname, kind = check(header)
    value = header[1]
    length = app_content_length(value) if kind is CONTENT_LENGTH else 0
    dropped = kind is TRANSFER_ENCODING or kind is CONNECTION or lname in NOT_SENT
    entry = (b"" if dropped else encode_field(lname, field_value(value)), kind, lname, length)
    if isinstance(header, tuple):
        if len(_ENTRIES) >= _ENTRIES_MAX:
            _ENTRIES.clear()
        _ENTRIES[header] = entry
    return entry


def response_fields(
    status: int, headers: Iterable[tuple[bytes, bytes]], defaults: list[tuple[bytes, bytes]]
) -> tuple[list[bytes], int | None]:
    """The encoded fields of a response's header block, and the application's Content-Length
    (None if it sent none). Names are checked and lower-cased as for HTTP/1.1; connection-
    specific fields, which HTTP/2 forbids (§8.2.2), are dropped, and so is a Content-Length on a
    204 (RFC 9110 §8.6); `defaults` (server, date, --header) are added unless the application
    sent the same names."""
    global _DEFAULTS
    block = [_STATUS_FIELDS.get(status) or encode_field(b":status", b"%d" % status)]
    append = block.append
    length: int | None = None
    own: set[bytes] | None = None
    get = _ENTRIES.get
    for header in headers:
        try:
            entry = get(header) or _entry(header)
        except TypeError:  # a list: unhashable
            entry = _entry(header)
        kind = entry[1]
        if kind is CONTENT_LENGTH:
            if status == 204:  # RFC 9110 §8.6: never on a 204
                continue
            length = entry[3]
        elif kind is SERVER_OR_DATE:
            own = {entry[2]} if own is None else own | {entry[2]}
        append(entry[0])
    if own is not None:
        block.extend(encode_field(*pair) for pair in defaults if pair[0] not in own)
    elif _DEFAULTS[0] is defaults:
        append(_DEFAULTS[1])
    else:  # a new second: a new date
        _DEFAULTS = (defaults, b"".join(encode_field(*pair) for pair in defaults))
        append(_DEFAULTS[1])
    return block, length


def trailer_pairs(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A trailer section's fields, lower-cased: checked, none of them framing or connection
    fields (RFC 9110 §6.5.1)."""
    pairs: list[tuple[bytes, bytes]] = []
    for header in headers:
        lname, kind = check(header)
        if (kind is not ORDINARY and kind is not SERVER_OR_DATE) or lname in NOT_SENT:
            raise RuntimeError(f"Header {header[0]!r} is not allowed in trailers")
        pairs.append((lname, field_value(header[1])))
    return pairs


def trailer_fields(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """A trailer section, encoded (`trailer_pairs`)."""
    return [encode_field(*pair) for pair in trailer_pairs(headers)]


def interim_fields(status: int, headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """An informational response's block (100 Continue, 103 Early Hints), encoded."""
    return [
        _STATUS_FIELDS[status],
        *(encode_field(check(h)[0], field_value(h[1])) for h in headers),
    ]

"""HTTP/3 response fields (RFC 9114 §4.2, §4.3): the rules are HTTP/2's, checked by the same
code (`fulmen.protocols.h2fields`); only the encoding differs, QPACK instead of HPACK, so the
fields are kept as (name, value) pairs for the connection's QPACK encoder."""

from __future__ import annotations

from collections.abc import Iterable

from fulmen.protocols.fields import (
    CONNECTION,
    CONTENT_LENGTH,
    SERVER_OR_DATE,
    TRANSFER_ENCODING,
    check,
)
from fulmen.protocols.fields import content_length as app_content_length
from fulmen.protocols.h2fields import NOT_SENT, STATUS_BYTES, field_value

Pairs = list[tuple[bytes, bytes]]


def response_pairs(
    status: int, headers: Iterable[tuple[bytes, bytes]], defaults: Pairs
) -> tuple[Pairs, int | None]:
    """A response's fields and the application's Content-Length (None if it sent none): names
    checked and lower-cased, connection-specific fields dropped (and a Content-Length on a 204,
    RFC 9110 §8.6), and `defaults` (server, date, --header) added unless the application sent
    the same names."""
    pairs = [(b":status", STATUS_BYTES.get(status) or b"%d" % status)]
    length: int | None = None
    own: set[bytes] = set()
    for header in headers:
        lname, kind = check(header)
        if kind is CONTENT_LENGTH:
            if status == 204:  # RFC 9110 §8.6: never on a 204
                continue
            length = app_content_length(header[1])
        elif kind is SERVER_OR_DATE:
            own.add(lname)
        elif kind is TRANSFER_ENCODING or kind is CONNECTION or lname in NOT_SENT:
            continue
        pairs.append((lname, field_value(header[1])))
    if own:
        pairs.extend(pair for pair in defaults if pair[0] not in own)
    else:
        pairs += defaults
    return pairs, length


def interim_pairs(status: int, headers: Iterable[tuple[bytes, bytes]]) -> Pairs:
    """An informational response's fields (100 Continue, 103 Early Hints)."""
    return [
        (b":status", STATUS_BYTES[status]),
        *((check(h)[0], field_value(h[1])) for h in headers),
    ]

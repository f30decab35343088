"""Response header fields as the application sends them, checked the same way for every
protocol (RFC 9110 §5): HTTP/1.1 renders the checked pairs as lines, HTTP/2 and HTTP/3 encode
them lower-cased, and none of them lets a bad name or value through."""

from __future__ import annotations

import enum
import re

# RFC 9110 §5.6.2: a field name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: no CR, LF or NUL in a field value (response splitting).
_BAD_VALUE = re.compile(rb"[\x00\r\n]")


class Kind(enum.Enum):
    """What a response writer must notice about a header, by its lower-case name."""

    ORDINARY = enum.auto()
    CONTENT_LENGTH = enum.auto()
    TRANSFER_ENCODING = enum.auto()
    CONNECTION = enum.auto()
    SERVER_OR_DATE = enum.auto()  # the server adds its own unless the app sent one


ORDINARY = Kind.ORDINARY
CONTENT_LENGTH = Kind.CONTENT_LENGTH
TRANSFER_ENCODING = Kind.TRANSFER_ENCODING
CONNECTION = Kind.CONNECTION
SERVER_OR_DATE = Kind.SERVER_OR_DATE

_KINDS = {
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"server": SERVER_OR_DATE,
    b"date": SERVER_OR_DATE,
}


def check(header: tuple[bytes, bytes]) -> tuple[bytes, Kind]:
    """The lower-case name and kind of a valid (name, value) pair; RuntimeError otherwise."""
    name, value = header
    if not isinstance(name, bytes) or _TOKEN.fullmatch(name) is None:
        raise RuntimeError(f"Invalid HTTP header name {name!r}")
    if not isinstance(value, bytes) or _BAD_VALUE.search(value) is not None:
        raise RuntimeError(f"Invalid HTTP header value {value!r}")
    lname = name.lower()
    return lname, _KINDS.get(lname, ORDINARY)


def content_length(value: bytes) -> int:
    """An application's Content-Length value (digits only)."""
    if not value.isdigit():
        raise RuntimeError(f"Invalid Content-Length {value!r}")
    return int(value)

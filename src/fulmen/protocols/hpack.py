"""HPACK, the header compression of HTTP/2 (RFC 7541): a complete decoder and a stateless encoder.

The decoder runs once per request on the server's hot path. Once a client has put its fields
in the dynamic table, each request's block is a few one-octet references (RFC 7541 §6.1), so
the static and dynamic tables live in one list indexed directly by the HPACK index (0 is
invalid, 1-61 static, 62 on the dynamic entries, newest first), beside a list of entry sizes
(§4.1) for the header list limit; the loop over a block keeps everything in local variables.

The encoder never inserts into the dynamic table (§6.2.2 literals only), so a field always
encodes to the same octets: they are cached per field, and only a size update to 0 (§6.3) is
ever owed to the peer's decoder when it changes SETTINGS_HEADER_TABLE_SIZE.
"""

from __future__ import annotations

from collections.abc import Iterable

from fulmen.protocols import huffman


class HPACKError(Exception):
    """A header block that cannot be decoded: the connection ends with COMPRESSION_ERROR
    (RFC 9113 §4.3)."""


class HeaderListTooLarge(Exception):
    """The decoded header list exceeds the limit (name + value + 32 per field, RFC 9113
    §6.5.2)."""


# RFC 7541 Appendix A: the static table, indices 1 to 61.
_STATIC: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    *((b":status", status) for status in b"200 204 206 304 400 404 500".split()),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    *(
        (name, b"")
        for name in b"""accept-language accept-ranges accept access-control-allow-origin age
        allow authorization cache-control content-disposition content-encoding content-language
        content-length content-location content-range content-type cookie date etag expect
        expires from host if-match if-modified-since if-none-match if-range if-unmodified-since
        last-modified link location max-forwards proxy-authenticate proxy-authorization range
        referer refresh retry-after server set-cookie strict-transport-security
        transfer-encoding user-agent vary via www-authenticate""".split()
    ),
)
_ENTRY_OVERHEAD = 32  # §4.1: an entry's size is its name's and value's lengths plus 32
_FIRST_DYNAMIC = len(_STATIC) + 1  # §2.3.3: the dynamic table's indices follow the static one's
# A decoder's first table: index 0 holds a placeholder that is never returned.
_TABLE = ((b"", b""), *_STATIC)
_SIZES = (0, *(len(name) + len(value) + _ENTRY_OVERHEAD for name, value in _STATIC))
# The octets that are each a whole indexed field (§6.1): 0x81-0xFE, indices 1 to 126.
_ONE_OCTET_INDEXED = bytes(range(0x81, 0xFF))
# RFC 9113 §4.3.1: both ends start with a 4,096-octet table, whatever was advertised.
_INITIAL_TABLE_SIZE = 4096
# §5.1 integers have no bound: larger ones are refused as an implementation limit.
_MAX_INTEGER = 1 << 32
_MAX_CONTINUATIONS = 5  # enough octets for any integer below _MAX_INTEGER


def _integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
    """The integer (§5.1) whose first octet, at `pos`, has the prefix `mask` (2**N - 1), and
    the position after it."""
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    for shift in range(0, 7 * _MAX_CONTINUATIONS, 7):
        if pos >= len(block):
            raise HPACKError("truncated integer")
        octet = block[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if octet < 0x80:
            if value > _MAX_INTEGER:
                break
            return value, pos
    raise HPACKError("integer too large")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """The string literal (§5.2) at `pos`, Huffman-decoded if flagged, and the position after."""
    if pos >= len(block):
        raise HPACKError("truncated field")
    huffman_coded = block[pos] & 0x80
    length, pos = _integer(block, pos, 0x7F)
    end = pos + length
    if end > len(block):
        raise HPACKError("truncated string")
    if not huffman_coded:
        return block[pos:end], end
    try:
        return huffman.decode(block[pos:end]), end
    except huffman.HuffmanError as exc:
        raise HPACKError(str(exc)) from None


class Decoder:
    """The decoding context of one connection: its dynamic table (§2.3.2) and limits."""

    __slots__ = (
        "_capacity",
        "_entries",
        "_size",
        "_sizes",
        "changes",
        "max_list_size",
        "max_table_size",
    )

    def __init__(self, max_list_size: int, max_table_size: int = 4096) -> None:
        self.max_list_size = max_list_size
        # The SETTINGS_HEADER_TABLE_SIZE the server advertised: the most a size update may ask.
        self.max_table_size = max_table_size
        # Bumped whenever decoding changes the dynamic table, so equal blocks decoded at equal
        # counts give equal fields (the caller's cache).
        self.changes = 0
        self._entries = list(_TABLE)
        self._sizes = list(_SIZES)
        self._size = 0  # §4.1: the dynamic entries' sizes summed
        self._capacity = _INITIAL_TABLE_SIZE  # §4.2: the maximum size the encoder set

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of a header block, in order, as (name, value) pairs.

        HPACKError if the block is malformed; HeaderListTooLarge if the fields add up to more
        than `max_list_size`. Fields stop being collected as soon as the limit is passed, but
        the rest of the block is still read, so that the dynamic table stays as the peer's
        encoder has it: the block "MUST be processed to ensure a consistent connection state,
        unless the connection is closed" (RFC 9113 §10.5.1).
        """
        if block.translate(None, _ONE_OCTET_INDEXED):
            return self._decode(block)
        # The steady state: every octet is an indexed field (§6.1) below 127.
        entries = self._entries
        sizes = self._sizes
        limit = self.max_list_size
        count = len(entries)
        fields: list[tuple[bytes, bytes]] = []
        append = fields.append
        total = 0
        for octet in block:
            index = octet & 0x7F
            if index >= count:
                raise HPACKError(f"field index {index} is not in the tables")
            total += sizes[index]
            if total <= limit:
                append(entries[index])
        if total > limit:
            raise HeaderListTooLarge(f"header list of {total} octets, over {limit}")
        return fields

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """`decode` for any block."""
        entries = self._entries
        sizes = self._sizes
        limit = self.max_list_size
        fields: list[tuple[bytes, bytes]] = []
        append = fields.append
        total = 0
        pos = 0
        end = len(block)
        # §4.2: size updates may only open a block.
        while pos < end and block[pos] & 0xE0 == 0x20:
            capacity, pos = _integer(block, pos, 0x1F)
            self._resize(capacity)
        while pos < end:
            octet = block[pos]
            if octet & 0x80:  # §6.1 indexed field
                index, pos = _integer(block, pos, 0x7F)
                if not 0 < index < len(entries):
                    raise HPACKError(f"field index {index} is not in the tables")
                total += sizes[index]
                if total <= limit:
                    append(entries[index])
                continue
            if octet & 0x40:  # §6.2.1 literal with incremental indexing
                index, pos = _integer(block, pos, 0x3F)
            elif octet & 0x20:
                raise HPACKError("dynamic table size update after the first field (RFC 7541 §4.2)")
            else:  # §6.2.2 without indexing, §6.2.3 never indexed
                index, pos = _integer(block, pos, 0x0F)
            if not index:
                name, pos = _string(block, pos)
            elif index < len(entries):
                name = entries[index][0]
            else:
                raise HPACKError(f"name index {index} is not in the tables")
            value, pos = _string(block, pos)
            field = (name, value)
            size = len(name) + len(value) + _ENTRY_OVERHEAD
            total += size
            if total <= limit:
                append(field)
            if octet & 0x40:
                self._insert(field, size)
        if total > limit:
            raise HeaderListTooLarge(f"header list of {total} octets, over {limit}")
        return fields

    def _insert(self, field: tuple[bytes, bytes], size: int) -> None:
        """Add an entry (§4.4): the oldest ones go to make room, all of them (and the entry)
        if it is larger than the table."""
        self._entries.insert(_FIRST_DYNAMIC, field)
        self._sizes.insert(_FIRST_DYNAMIC, size)
        self._size += size
        self._evict()
        self.changes += 1

    def _resize(self, capacity: int) -> None:
        """A dynamic table size update (§6.3), within the advertised maximum (§4.2)."""
        if capacity > self.max_table_size:
            raise HPACKError(f"table size update to {capacity}, over {self.max_table_size}")
        self._capacity = capacity
        self._evict()
        self.changes += 1

    def _evict(self) -> None:
        """Drop the oldest entries until the table fits its maximum size (§4.3)."""
        while self._size > self._capacity:
            self._entries.pop()
            self._size -= self._sizes.pop()


# The encoder's view of the static table: the first index of each field and each name.
_FIELD_INDEX = {field: index for index, field in enumerate(_STATIC, 1)}
_NAME_INDEX = {name: index for index, (name, _) in reversed(list(enumerate(_STATIC, 1)))}
_CACHE: dict[tuple[bytes, bytes], bytes] = {}
_CACHE_ENTRIES = 4096  # cleared when full, a cheap bound against ever-new values
_CACHE_VALUE = 1024  # longer values gain little from the cache: copying them is the cost


def _encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """`value` as a §5.1 integer with an N-bit prefix, `flags` in the first octet's high bits."""
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(data: bytes) -> bytes:
    """A raw-octet string literal (§5.2, H clear)."""
    return _encode_integer(len(data), 7, 0) + data


def _represent(name: bytes, value: bytes) -> bytes:
    """A field as an indexed field (§6.1) if it is in the static table, else as a literal
    without indexing (§6.2.2) naming a static entry where it can."""
    index = _FIELD_INDEX.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))
    index = _NAME_INDEX.get(name)
    if index is not None:
        return _encode_integer(index, 4, 0) + _encode_string(value)
    return b"\x00" + _encode_string(name) + _encode_string(value)


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field's representation; the same for every block, as the encoder keeps no state."""
    key = (name, value)
    encoded = _CACHE.get(key)
    if encoded is None:
        encoded = _represent(name, value)
        if len(value) <= _CACHE_VALUE:
            if len(_CACHE) >= _CACHE_ENTRIES:
                _CACHE.clear()
            _CACHE[key] = encoded
    return encoded


class Encoder:
    """The encoding context of one connection; it owes at most a size update (§6.3)."""

    __slots__ = ("_size_update",)

    def __init__(self) -> None:
        self._size_update = False

    def encode(self, fields: Iterable[tuple[bytes, bytes]]) -> bytes:
        """A header block for `fields` (lower-case names, in order)."""
        get = _CACHE.get
        return self.block([get(field) or encode_field(*field) for field in fields])

    def block(self, parts: list[bytes]) -> bytes:
        """A header block of fields each encoded by `encode_field`, in order."""
        if self._size_update:
            # §4.2: the first block after a SETTINGS_HEADER_TABLE_SIZE change opens with a size
            # update; 0 suits any new maximum, the table being unused.
            self._size_update = False
            return b"\x20" + b"".join(parts)
        return b"".join(parts)

    def table_size_changed(self) -> None:
        """The peer changed SETTINGS_HEADER_TABLE_SIZE: the next block starts with a size update."""
        self._size_update = True

"""The HPACK codec (fulmen.protocols.hpack, .huffman): the RFC 7541 Appendix C examples, round
trips against the `hpack` package both ways, every malformed block, the header list limit, and
the Huffman code octet by octet."""

from __future__ import annotations

import random
import subprocess
import sys
import tracemalloc

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

from fulmen.protocols import hpack as ours
from fulmen.protocols import huffman
from fulmen.protocols.hpack import Decoder, Encoder, HeaderListTooLarge, HPACKError, encode_field

Fields = list[tuple[bytes, bytes]]
LIMIT = 1 << 20


def huffman_encode(data: bytes) -> bytes:
    """`data` Huffman-coded (RFC 7541 §5.2), padded with the high bits of EOS."""
    bits = count = 0
    for octet in data:
        code, length = huffman.CODES[octet]
        bits = bits << length | code
        count += length
    padding = -count % 8
    return (bits << padding | (1 << padding) - 1).to_bytes((count + padding) // 8, "big")


def integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """`value` as a §5.1 integer, written out here independently of the module's encoder."""
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = [flags | mask]
    value -= mask
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def table(decoder: Decoder) -> Fields:
    """The decoder's dynamic table, newest entry first."""
    return decoder._entries[62:]


def table_size(decoder: Decoder) -> int:
    size = sum(len(name) + len(value) + 32 for name, value in table(decoder))
    assert decoder._size == size
    return size


# The tables


def test_static_table_is_rfc_7541_appendix_a() -> None:
    assert ours._STATIC == HeaderTable.STATIC_TABLE
    assert len(ours._STATIC) == 61


def test_huffman_code_is_rfc_7541_appendix_b() -> None:
    assert list(huffman.CODES) == list(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True))
    assert huffman.CODES[huffman.EOS] == (0x3FFFFFFF, 30)


# RFC 7541 Appendix C


@pytest.mark.parametrize(
    ("block", "field", "indexed"),
    [
        # C.2.1 literal with indexing, C.2.2 without, C.2.3 never indexed, C.2.4 indexed
        (
            "400a637573746f6d2d6b65790d637573746f6d2d686561646572",
            (b"custom-key", b"custom-header"),
            True,
        ),
        ("040c2f73616d706c652f70617468", (b":path", b"/sample/path"), False),
        ("100870617373776f726406736563726574", (b"password", b"secret"), False),
        ("82", (b":method", b"GET"), False),
    ],
)
def test_rfc_c2_representations(block: str, field: tuple[bytes, bytes], indexed: bool) -> None:
    decoder = Decoder(LIMIT)
    assert decoder.decode(bytes.fromhex(block)) == [field]
    assert table(decoder) == ([field] if indexed else [])
    assert table_size(decoder) == (55 if indexed else 0)
    assert decoder.changes == int(indexed)


REQUESTS: list[Fields] = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html")],
]
REQUESTS[0].append((b":authority", b"www.example.com"))
REQUESTS[1] += [(b":authority", b"www.example.com"), (b"cache-control", b"no-cache")]
REQUESTS[2] += [(b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]
REQUEST_TABLES = [
    ([REQUESTS[0][3]], 57),
    ([REQUESTS[1][4], REQUESTS[0][3]], 110),
    ([REQUESTS[2][4], REQUESTS[1][4], REQUESTS[0][3]], 164),
]
C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]

DATE1 = (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT")
DATE2 = (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT")
LOCATION = (b"location", b"https://www.example.com")
PRIVATE = (b"cache-control", b"private")
COOKIE = (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
GZIP = (b"content-encoding", b"gzip")
RESPONSES: list[Fields] = [
    [(b":status", b"302"), PRIVATE, DATE1, LOCATION],
    [(b":status", b"307"), PRIVATE, DATE1, LOCATION],
    [(b":status", b"200"), PRIVATE, DATE2, LOCATION, GZIP, COOKIE],
]
RESPONSE_TABLES = [
    ([LOCATION, DATE1, PRIVATE, (b":status", b"302")], 222),
    ([(b":status", b"307"), LOCATION, DATE1, PRIVATE], 222),
    ([COOKIE, GZIP, DATE2], 215),
]
C5 = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
    "6e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f"
    "3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076"
    "657273696f6e3d31",
]
C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f"
    "0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335df"
    "dfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


@pytest.mark.parametrize(
    ("blocks", "lists", "tables", "table_max"),
    [
        pytest.param(C3, REQUESTS, REQUEST_TABLES, 4096, id="C.3"),
        pytest.param(C4, REQUESTS, REQUEST_TABLES, 4096, id="C.4 Huffman"),
        pytest.param(C5, RESPONSES, RESPONSE_TABLES, 256, id="C.5 eviction"),
        pytest.param(C6, RESPONSES, RESPONSE_TABLES, 256, id="C.6 eviction Huffman"),
    ],
)
def test_rfc_c3_to_c6_sequences(
    blocks: list[str], lists: list[Fields], tables: list[tuple[Fields, int]], table_max: int
) -> None:
    decoder = Decoder(LIMIT, max_table_size=table_max)
    if table_max != 4096:
        # Appendix C starts both ends at 256; HTTP/2 starts them at 4,096 (RFC 9113 §4.3.1), so
        # an encoder set to 256 says so first with a size update (§6.3).
        decoder.decode(integer(table_max, 5, 0x20))
    for block, fields, (entries, size) in zip(blocks, lists, tables, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == fields
        assert table(decoder) == entries
        assert table_size(decoder) == size


# The header list limit


def test_hpack_bomb_raises_quickly_and_keeps_the_table() -> None:
    decoder = Decoder(max_list_size=16384)
    big = (b"x", b"a" * 3000)
    decoder.decode(b"\x40\x01x" + integer(3000, 7) + big[1])
    bomb = b"\xbe" * 1000  # 3 MB of fields from 1,000 octets
    assert len(bomb) < 1024
    with pytest.raises(HeaderListTooLarge):
        decoder.decode(bomb)  # once untraced first, so that a coverage tracer has settled
    tracemalloc.start()
    try:
        with pytest.raises(HeaderListTooLarge):
            decoder.decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000  # no copies of the value, no list of a thousand fields
    # The same through the general path, a literal inserting after the limit was passed: the
    # table still follows the encoder's.
    changes = decoder.changes
    with pytest.raises(HeaderListTooLarge, match="over 16384"):
        decoder.decode(bomb + b"\x40\x04late\x01!")
    assert decoder.changes == changes + 1
    assert decoder.decode(b"\xbe\xbf") == [(b"late", b"!"), big]


def test_header_list_limit_counts_name_value_and_32() -> None:
    fields = [(b":method", b"GET"), (b"custom", b"value")]  # 42 + 43
    block = b"\x82\x00\x06custom\x05value"
    assert Decoder(85).decode(block) == fields
    with pytest.raises(HeaderListTooLarge):
        Decoder(84).decode(block)
    assert Decoder(42).decode(b"\x82") == fields[:1]
    with pytest.raises(HeaderListTooLarge):
        Decoder(41).decode(b"\x82")


# Malformed blocks


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\x80", "index 0"),
        (b"\x82\xbe", "index 62"),  # past the tables: the dynamic table is empty
        (b"\xff\x00", "index 127"),
        (b"\x7e\x01v", "name index 62"),
        (b"\x0f\x30\x01v", "name index 63"),
        (b"\xff", "truncated integer"),
        (b"\x82\xff\x80", "truncated integer"),
        (b"\xff\x80\x80\x80\x80\x80\x01", "integer too large"),  # too many continuation octets
        (b"\xff" + integer(2**32 + 1, 7)[1:], "integer too large"),
        (b"\x40", "truncated field"),
        (b"\x41", "truncated field"),
        (b"\x40\x05abc", "truncated string"),
        (b"\x41\x85\xff", "truncated string"),
        (b"\x82\x20", "size update after"),
        (b"\x82\x3f\xe1\x01", "size update after"),
        (integer(4097, 5, 0x20), "over 4096"),
        (b"\x41\x81\x18", "Huffman"),  # 'a' padded with zeros
        (b"\x41\x82\x1f\xff", "Huffman"),  # 'a' padded with 11 ones
        (b"\x41\x81\xff", "Huffman"),  # eight ones of padding
        (b"\x41\x84\xff\xff\xff\xff", "Huffman"),  # EOS, then two bits
        (b"\x41\x85" + (3 << 35 | 0x3FFFFFFF << 5 | 3).to_bytes(5, "big"), "Huffman"),  # a EOS a
    ],
)
def test_malformed_blocks_raise_hpack_error(block: bytes, message: str) -> None:
    with pytest.raises(HPACKError, match=message):
        Decoder(LIMIT).decode(block)


def test_size_update_above_the_advertised_maximum() -> None:
    decoder = Decoder(LIMIT, max_table_size=100)
    decoder.decode(integer(100, 5, 0x20))
    with pytest.raises(HPACKError, match="over 100"):
        decoder.decode(integer(101, 5, 0x20))


def test_random_corruption_raises_only_hpack_errors() -> None:
    rng = random.Random(7541)
    encoder = hpack.Encoder()
    blocks = [encoder.encode(random_fields(rng), huffman=rng.random() < 0.5) for _ in range(30)]
    outcomes = set()
    for _ in range(3000):
        decoder = Decoder(rng.choice((200, LIMIT)))
        block = bytearray(rng.choice(blocks))
        for _ in range(rng.randint(1, 4)):
            block[rng.randrange(len(block))] = rng.randrange(256)
        cut = bytes(block[: rng.randint(1, len(block))])
        try:
            decoder.decode(cut)
            outcomes.add("decoded")
        except (HPACKError, HeaderListTooLarge) as exc:
            outcomes.add(type(exc).__name__)
    assert outcomes == {"decoded", "HPACKError", "HeaderListTooLarge"}


# The dynamic table


def test_changes_move_exactly_when_the_table_changes() -> None:
    decoder = Decoder(LIMIT)
    assert decoder.changes == 0
    decoder.decode(b"")
    decoder.decode(b"\x82\x86\x84")  # indexed, static
    decoder.decode(b"\x04\x02/a\x10\x01x\x01y")  # without indexing, never indexed
    assert decoder.changes == 0
    decoder.decode(b"\x44\x02/b")  # with indexing
    assert decoder.changes == 1
    decoder.decode(b"\xbe\xbe\x82")  # indexed, dynamic
    assert decoder.changes == 1
    decoder.decode(b"\x3f\xe1\x1f\x82")  # a size update (to 4096)
    assert decoder.changes == 2
    decoder.decode(b"\x20\x3f\xe1\x1f\x44\x02/c\x44\x02/d")  # two updates, two insertions
    assert decoder.changes == 6
    assert table(decoder) == [(b":path", b"/d"), (b":path", b"/c")]


def test_eviction_and_oversized_entries() -> None:
    decoder = Decoder(LIMIT)
    decoder.decode(integer(100, 5, 0x20) + b"\x40\x01a\x01b" + b"\x40\x01c\x01d")
    assert table(decoder) == [(b"c", b"d"), (b"a", b"b")]
    assert table_size(decoder) == 68
    decoder.decode(b"\x40\x01e\x01f")  # 102 octets with the new one: the oldest goes
    assert table(decoder) == [(b"e", b"f"), (b"c", b"d")]
    # An entry larger than the table empties it, and is not added (RFC 7541 §4.4).
    too_big = (b"n", b"v" * 70)
    assert decoder.decode(b"\x40\x01n\x46" + too_big[1]) == [too_big]
    assert table(decoder) == []
    assert table_size(decoder) == 0
    decoder.decode(b"\x40\x01a\x01b")
    assert decoder.decode(b"\xbe") == [(b"a", b"b")]
    with pytest.raises(HPACKError):
        decoder.decode(b"\x20\xbe")  # the size update to 0 dropped it
    assert decoder.changes == 7


def test_multi_octet_indices() -> None:
    decoder = Decoder(LIMIT)
    decoder.decode(
        b"".join(b"\x40\x01n" + integer(len(b"%d" % i), 7) + b"%d" % i for i in range(70))
    )
    assert len(table(decoder)) == 70
    # Index 128 (127 and a continuation octet of 1) is the 67th entry from the newest.
    assert decoder.decode(b"\xff\x01\xbe") == [(b"n", b"%d" % 3), (b"n", b"69")]
    assert decoder.decode(b"\x7f\x00\x01x") == [(b"n", b"x")]  # name index 63 + 0


def test_a_new_list_every_call() -> None:
    decoder = Decoder(LIMIT)
    first = decoder.decode(b"\x82\x84")
    second = decoder.decode(b"\x82\x84")
    assert first == second == [(b":method", b"GET"), (b":path", b"/")]
    assert first is not second
    first.append((b"x", b"y"))
    assert decoder.decode(b"\x82\x84") == second


def test_names_are_not_lowercased_nor_checked() -> None:
    block = b"\x00\x04X-Up\x00\x00\x03\x00\r\n\x00"
    assert Decoder(LIMIT).decode(block) == [(b"X-Up", b""), (b"\x00\r\n", b"")]


# Round trips with the `hpack` package


NAMES = [b":path", b":authority", b"user-agent", b"cookie", b"accept", b"x-request-id", b"te"]


def random_fields(rng: random.Random) -> Fields:
    """A header list of random-ish fields: static ones, static names, new names, odd octets."""
    fields = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.2:
            fields.append(rng.choice(HeaderTable.STATIC_TABLE))
            continue
        if kind < 0.6:
            name = rng.choice(NAMES)
        else:
            name = bytes(
                rng.choices(b"abcdefghijklmnopqrstuvwxyz-0123456789", k=rng.randint(1, 20))
            )
        size = rng.choice((0, 1, 5, 20, 100, 300))
        value = bytes(rng.randrange(256) for _ in range(rng.randint(0, size)))
        fields.append((name, value))
    return fields


@pytest.mark.parametrize("use_huffman", [True, False])
def test_hpack_encoder_to_our_decoder(use_huffman: bool) -> None:
    rng = random.Random(use_huffman)
    encoder = hpack.Encoder()
    decoder = Decoder(LIMIT)
    reference = hpack.Decoder(LIMIT)
    for _ in range(300):
        if rng.random() < 0.1:
            encoder.header_table_size = rng.choice((0, 64, 256, 1000, 4096))
        fields = random_fields(rng)
        sensitive = [
            hpack.NeverIndexedHeaderTuple(*field) if rng.random() < 0.1 else field
            for field in fields
        ]
        block = encoder.encode(sensitive, huffman=use_huffman)
        assert decoder.decode(block) == fields
        assert reference.decode(block, raw=True) == fields
        assert decoder._capacity == reference.header_table.maxsize
        assert table(decoder) == list(reference.header_table.dynamic_entries)


def test_our_encoder_to_hpack_decoder() -> None:
    rng = random.Random(2)
    encoder = Encoder()
    reference = hpack.Decoder(LIMIT)
    decoder = Decoder(LIMIT)
    for round_ in range(200):
        if round_ % 50 == 25:
            # The peer lowers its table size: the next block must start with a size update.
            reference.max_allowed_table_size = 0
            encoder.table_size_changed()
        fields = random_fields(rng)
        block = encoder.encode(fields)
        assert reference.decode(block, raw=True) == fields
        assert decoder.decode(block) == fields
        assert block.startswith(b"\x20") == (round_ % 50 == 25)
        assert not reference.header_table.dynamic_entries
        assert decoder.changes == (round_ + 25) // 50  # the size updates
    assert reference.header_table.maxsize == 0


def test_our_encoder_without_the_size_update_fails_a_lowered_hpack_decoder() -> None:
    reference = hpack.Decoder()
    reference.max_allowed_table_size = 0
    with pytest.raises(hpack.InvalidTableSizeError):
        reference.decode(Encoder().encode([(b":status", b"200")]))


# Our encoder


@pytest.mark.parametrize(
    ("field", "encoded"),
    [
        ((b":status", b"200"), b"\x88"),
        ((b"www-authenticate", b""), b"\xbd"),
        ((b":status", b"201"), b"\x08\x03201"),  # static name, value without indexing (§6.2.2)
        ((b"content-type", b"text/plain"), b"\x0f\x10\x0atext/plain"),  # index 31: 15 + 16
        ((b"x-id", b"7"), b"\x00\x04x-id\x017"),
        ((b"x", b"v" * 200), b"\x00\x01x\x7f\x49" + b"v" * 200),  # 127 + 73
    ],
)
def test_encode_field(field: tuple[bytes, bytes], encoded: bytes) -> None:
    assert encode_field(*field) == encoded
    assert Decoder(LIMIT).decode(encoded) == [field]


def test_encoder_joins_fields_and_sends_one_size_update() -> None:
    encoder = Encoder()
    fields = [(b":status", b"200"), (b"server", b"fulmen"), (b"x-a", b"b")]
    block = b"".join(encode_field(*field) for field in fields)
    assert encoder.encode(fields) == block
    encoder.table_size_changed()
    encoder.table_size_changed()
    assert encoder.encode(iter(fields)) == b"\x20" + block
    assert encoder.encode(fields) == block
    assert encoder.encode([]) == b""


def test_encode_field_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ours, "_CACHE", {})
    monkeypatch.setattr(ours, "_CACHE_ENTRIES", 3)
    first = encode_field(b"x-a", b"1")
    assert encode_field(b"x-a", b"1") is first
    assert Encoder().encode([(b"x-a", b"1")]) is first
    for value in (b"2", b"3"):
        encode_field(b"x-a", value)
    assert len(ours._CACHE) == 3
    encode_field(b"x-a", b"4")
    assert list(ours._CACHE) == [(b"x-a", b"4")]
    encode_field(b"x-a", b"v" * 1025)  # long values are not kept
    assert list(ours._CACHE) == [(b"x-a", b"4")]


# Huffman


def test_every_octet_round_trips_through_huffman() -> None:
    reference = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for octet in range(256):
        for data in (bytes((octet,)), bytes((octet,)) * 3, b"a" + bytes((octet,))):
            assert huffman_encode(data) == reference.encode(data)
            assert huffman.decode(huffman_encode(data)) == data
    everything = bytes(range(256))
    assert huffman.decode(reference.encode(everything)) == everything
    assert huffman.decode(reference.encode(everything[::-1] * 2)) == everything[::-1] * 2
    assert huffman.decode(b"") == b""


def test_huffman_padding_and_eos() -> None:
    assert huffman.decode(b"\x1f") == b"a"  # 5 bits and 3 of padding
    assert huffman.decode(huffman_encode(b"0")) == b"0"  # 5 + 3, padding of ones
    with pytest.raises(huffman.HuffmanError):
        huffman.decode(b"\x1f\xff")  # 11 bits of padding
    with pytest.raises(huffman.HuffmanError):
        huffman.decode(b"\x1e")  # padding ending in a zero
    with pytest.raises(huffman.HuffmanError):
        huffman.decode(b"\xff\xff\xff\xfc")  # EOS exactly, then two zero bits
    with pytest.raises(huffman.HuffmanError):
        huffman.decode(b"\xff\xff\xff\xff")
    longest = huffman_encode(b"\x0a")  # a 30-bit code: 2 bits of padding
    assert huffman.decode(longest) == b"\x0a"


def test_import_builds_no_huffman_table() -> None:
    code = "import fulmen.protocols.hpack as h; print(h.huffman._machine is None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout == b"True\n"


def test_huffman_matches_hpack_on_random_strings() -> None:
    rng = random.Random(5)
    reference = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for _ in range(500):
        text = bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz/-.=;, ", k=rng.randint(0, 60)))
        data = text if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in text)
        assert huffman.decode(reference.encode(data)) == data

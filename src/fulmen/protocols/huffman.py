"""The Huffman code of HPACK (RFC 7541 §5.2, Appendix B) and a fast pure-Python decoder.

Browsers and curl Huffman-encode every literal they send, so the first header block of each
connection is mostly Huffman text; walking the code tree bit by bit in Python would cost several
hundred nanoseconds per octet. Instead the tree is turned once into a state machine that consumes
a whole octet per step: a state is an inner node of the tree (a partial code), and for each state
and input octet a table gives the next state and the symbols completed on the way (zero, one or
two). The table (257 rows of 256, about 2 MB) is built on the first decode, in under 10 ms, by
doubling the one-bit steps of the tree three times, so importing this module costs nothing.

Nothing here encodes: fulmen's encoder sends raw octets (see `fulmen.protocols.hpack`).
"""

from __future__ import annotations

# RFC 7541 Appendix B: the (code, bit length) of each symbol, the octets 0-255 then EOS (256),
# four a line; the comment is the first symbol of the line.
# fmt: off
CODES: tuple[tuple[int, int], ...] = (
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28),             # 0x00
    (0xfffffe4, 28), (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28),         # 0x04
    (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),         # 0x08
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28),        # 0x0c
    (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),         # 0x10
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),        # 0x14
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28),         # 0x18
    (0xffffff8, 28), (0xffffff9, 28), (0xffffffa, 28), (0xffffffb, 28),         # 0x1c
    (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),                           # 0x20
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),                            # 0x24
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11),                           # 0x28
    (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),                                 # 0x2c
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6),                                    # 0x30
    (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6),                                 # 0x34
    (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),                                 # 0x38
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10),                          # 0x3c
    (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7),                              # 0x40
    (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),                                 # 0x44
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7),                                 # 0x48
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),                                 # 0x4c
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),                                 # 0x50
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7),                                 # 0x54
    (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13),                              # 0x58
    (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),                       # 0x5c
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),                                # 0x60
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6),                                  # 0x64
    (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),                                  # 0x68
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5),                                  # 0x6c
    (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5),                                  # 0x70
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),                                  # 0x74
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15),                              # 0x78
    (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28),                   # 0x7c
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),                # 0x80
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23),             # 0x84
    (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),             # 0x88
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),             # 0x8c
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23),             # 0x90
    (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23),             # 0x94
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),             # 0x98
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),             # 0x9c
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22),              # 0xa0
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),             # 0xa4
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24),             # 0xa8
    (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23),             # 0xac
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),             # 0xb0
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23),             # 0xb4
    (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22),              # 0xb8
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),             # 0xbc
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19),             # 0xc0
    (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),            # 0xc4
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),         # 0xc8
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25),          # 0xcc
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27),            # 0xd0
    (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),          # 0xd4
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),           # 0xd8
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27),         # 0xdc
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),               # 0xe0
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23),             # 0xe4
    (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25), (0x1ffffef, 25),           # 0xe8
    (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),            # 0xec
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26),         # 0xf0
    (0x7ffffe7, 27), (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27),         # 0xf4
    (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),         # 0xf8
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26),         # 0xfc
    (0x3fffffff, 30),                                                           # 0x100
)
# fmt: on
EOS = 256
_ROOT = 0
# §5.2: a string ends with at most 7 bits of padding, the high bits of EOS (all ones).
_MAX_PADDING = 7

_Rows = list[list[int]]
_Outputs = list[list[bytes]]
# (next state, symbols emitted, accepting end states) of the octet-wise machine, built lazily.
_machine: tuple[_Rows, _Outputs, frozenset[int]] | None = None


class HuffmanError(ValueError):
    """A Huffman string that RFC 7541 §5.2 forbids: EOS inside it, or bad padding."""


def _tree() -> list[list[int]]:
    """The code tree: node 0 is the root, `kids[node][bit]` is an inner node's number, or
    `~symbol` for a leaf (always negative)."""
    kids = [[0, 0]]  # 0 is never a child (it is the root), so it marks a branch not yet made
    for symbol, (code, length) in enumerate(CODES):
        node = _ROOT
        for shift in range(length - 1, 0, -1):
            bit = code >> shift & 1
            if not kids[node][bit]:
                kids[node][bit] = len(kids)
                kids.append([0, 0])
            node = kids[node][bit]
        kids[node][code & 1] = ~symbol
    return kids


def _bit_steps(kids: list[list[int]]) -> tuple[_Rows, _Outputs]:
    """The one-bit machine: from each inner node, per bit, the next state and the octet emitted
    when the bit ends a code. EOS leads to an extra state, a trap that never accepts."""
    fail = len(kids)
    rows: _Rows = []
    outputs: _Outputs = []
    for children in kids:
        row = []
        out = []
        for child in children:
            if child >= 0:
                row.append(child)
                out.append(b"")
            elif child == ~EOS:
                row.append(fail)
                out.append(b"")
            else:
                row.append(_ROOT)
                out.append(bytes((~child,)))
        rows.append(row)
        outputs.append(out)
    rows.append([fail, fail])
    outputs.append([b"", b""])
    return rows, outputs


def _double(rows: _Rows, outputs: _Outputs) -> tuple[_Rows, _Outputs]:
    """The machine taking 2k bits a step from the one taking k: the high k bits, then the low."""
    shared: dict[bytes, bytes] = {}  # one object per distinct output, to keep the table small
    doubled = [[last for first in row for last in rows[first]] for row in rows]
    emitted = [
        [
            shared.setdefault(both, both)
            for both in [
                head + tail for head, first in zip(out, row, strict=True) for tail in outputs[first]
            ]
        ]
        for row, out in zip(rows, outputs, strict=True)
    ]
    return doubled, emitted


def _build() -> tuple[_Rows, _Outputs, frozenset[int]]:
    """Build the octet-wise machine (1 bit -> 2 -> 4 -> 8) and keep it for later calls."""
    global _machine
    kids = _tree()
    rows, outputs = _bit_steps(kids)
    for _ in range(3):
        rows, outputs = _double(rows, outputs)
    # A string may end inside a code only on a prefix of EOS of at most 7 bits (§5.2).
    accepting = {_ROOT}
    node = _ROOT
    for _ in range(_MAX_PADDING):
        node = kids[node][1]
        accepting.add(node)
    _machine = rows, outputs, frozenset(accepting)
    return _machine


def decode(data: bytes) -> bytes:
    """The octets a Huffman string encodes; HuffmanError if it holds EOS or its padding is longer
    than 7 bits or not all ones (RFC 7541 §5.2)."""
    rows, outputs, accepting = _machine or _build()
    state = _ROOT
    parts: list[bytes] = []
    append = parts.append
    for octet in data:
        append(outputs[state][octet])
        state = rows[state][octet]
    if state not in accepting:
        raise HuffmanError("invalid Huffman padding or EOS in a Huffman string")
    return b"".join(parts)

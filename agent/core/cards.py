"""Card frames and card keys.

Every read and every card in the access list reduces to one integer *key* at
the site's key width (24 bits by default: what a 26-bit Wiegand reader sends
and what the EM-Marine print shows). This module holds:

- the access-list card strings and their display forms
  (``parse_card_string``, ``format_key``);
- the frame decoders: Wiegand bit strings (``decode_wiegand``), RDM6300
  serial frames (``decode_rdm6300``) and line-oriented EM-Marine readers
  (``decode_em_line``), all returning one result shape (``CardResult``);
- encoders for the same frames (tests and the simulator build reads with
  them).

Key widths wider than 24 bits (allowed 24..64): a frame's key is its data
bits (the bits between the parity bits) masked to the key width, and a serial
read's key is the 40-bit EM4100 value masked to the key width. So at width 32
a W34 read and an RDM6300 read of one EM-Marine card agree (both give the 32
data bits). The list string "fac,card" always means ``(fac << 16) | card``
with card 0..65535 and facility filling the remaining ``key_width - 16``
bits: the split of W26 (8+16) and W34 (16+16). Cards read as W35 or W37
(whose card number is 20 or 19 bits) are listed in the ``hex:`` or decimal
form instead.

Pure: standard library only, no clocks, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .events import CardRead, Keypad, ReaderError

MIN_KEY_WIDTH = 24
MAX_KEY_WIDTH = 64

# Accepted list forms, quoted in every CardFormatError.
ACCEPTED_FORMS = (
    'accepted forms: "facility,card" (e.g. "100,60179"), the decimal EM-Marine '
    'print of up to 10 digits (e.g. "0006613779"), or "hex:" with the card UID '
    '(e.g. "hex:0A008EC793")'
)


class CardFormatError(ValueError):
    """A card string or number that cannot be turned into a key."""


def check_key_width(key_width: int) -> int:
    """Return key_width if it is a supported width, else raise ValueError."""
    if not isinstance(key_width, int) or isinstance(key_width, bool):
        raise TypeError(
            f"key_width must be an integer from {MIN_KEY_WIDTH} to {MAX_KEY_WIDTH}, got {key_width!r}"
        )
    if not MIN_KEY_WIDTH <= key_width <= MAX_KEY_WIDTH:
        raise ValueError(
            f"key_width {key_width} is out of range: set the site's key width to a value "
            f"from {MIN_KEY_WIDTH} to {MAX_KEY_WIDTH} (24 for 26-bit readers)"
        )
    return key_width


def key_mask(key_width: int) -> int:
    return (1 << check_key_width(key_width)) - 1


# --- access-list strings ------------------------------------------------------

_FAC_CARD = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$")
_DECIMAL = re.compile(r"^\d{1,10}$")
_HEX = re.compile(r"^hex:([0-9a-f]{1,16})$", re.IGNORECASE)


def parse_card_string(text: str, key_width: int = 24) -> int:
    """The key of an access-list card string.

    "100,60179": (facility << 16) | card; card 0..65535, facility
    0..2**(key_width-16)-1 (0..255 at width 24).
    "0006613779": the decimal EM-Marine print (1 to 10 digits), masked to
    key_width (the print is the decimal of the low 24 bits; a 32-bit decimal
    reduces to the same key).
    "hex:0A008EC793": the card UID in hex (up to 16 digits), masked to
    key_width.
    """
    mask = key_mask(key_width)
    if not isinstance(text, str):
        raise CardFormatError(f"card {text!r} is not a string; {ACCEPTED_FORMS}")
    s = text.strip()
    m = _FAC_CARD.match(s)
    if m:
        facility, card = int(m.group(1)), int(m.group(2))
        fac_max = (1 << (key_width - 16)) - 1
        if card > 0xFFFF:
            raise CardFormatError(
                f"card {text!r}: card number {card} is over 65535; for a wider card number "
                f"use the hex: form; {ACCEPTED_FORMS}"
            )
        if facility > fac_max:
            raise CardFormatError(
                f"card {text!r}: facility {facility} is over {fac_max} for key width "
                f"{key_width}; {ACCEPTED_FORMS}"
            )
        return (facility << 16) | card
    if _DECIMAL.match(s):
        return int(s, 10) & mask
    m = _HEX.match(s)
    if m:
        return int(m.group(1), 16) & mask
    raise CardFormatError(f"card {text!r} is not a card string; {ACCEPTED_FORMS}")


def format_key(key: int, key_width: int = 24) -> dict:
    """All display forms of a key: each parses back to the same key.

    {"key": 9357203, "facility_card": "142,51091", "em_print": "0009357203",
    "hex": "hex:8EC793"}. em_print is None when the key has more than 10
    decimal digits (widths over 33 bits).
    """
    mask = key_mask(key_width)
    if not isinstance(key, int) or key < 0 or key > mask:
        raise CardFormatError(f"key {key!r} does not fit key width {key_width} (0..{mask})")
    digits = (key_width + 3) // 4
    return {
        "key": key,
        "facility_card": f"{key >> 16},{key & 0xFFFF}",
        "em_print": f"{key:010d}" if key < 10**10 else None,
        "hex": f"hex:{key:0{digits}X}",
    }


# --- one result shape for every decoder ------------------------------------------


@dataclass(frozen=True)
class CardResult:
    """What a frame decoder found.

    ok: a card (kind "card") or keypad burst (kind "keypad") that passed its
    checks. kind: "card", "keypad", or "raw" (a frame of no known format,
    kept for the log, never a card). format: "w26", "w34", "w35", "w37",
    "keypad4", "keypad8", "raw", "rdm6300", "emline". error: None or the
    reader.error kind ("parity", "length", "checksum", "glitch", "garbage");
    detail says what was wrong. raw: the frame as read (bits, or hex of the
    bytes, or the line).
    """

    ok: bool
    kind: str
    format: str
    key: int | None = None
    facility: int | None = None
    card: int | None = None
    keys: str | None = None
    error: str | None = None
    detail: str = ""
    raw: str = ""

    def as_event(self, reader: str) -> CardRead | Keypad | ReaderError:
        """The core event for this result, read by the named reader."""
        if self.error is not None:
            return ReaderError(reader=reader, kind=self.error, detail=self.detail, raw=self.raw)
        if self.kind == "keypad":
            return Keypad(reader=reader, keys=self.keys or "")
        return CardRead(reader=reader, key=self.key, format=self.format, raw=self.raw)


def _error(kind: str, fmt: str, error: str, detail: str, raw: str) -> CardResult:
    return CardResult(ok=False, kind=kind, format=fmt, error=error, detail=detail, raw=raw)


# --- Wiegand ----------------------------------------------------------------------


def _parity(value: int) -> int:
    return value.bit_count() & 1


def _bits_at(v: int, n: int, positions: Sequence[int]) -> int:
    """Pack the bits at the given positions (0 = first bit sent) of an n-bit frame."""
    out = 0
    for p in positions:
        out = (out << 1) | ((v >> (n - 1 - p)) & 1)
    return out


def _field(v: int, n: int, start: int, length: int) -> int:
    """length bits from position start (0 = first bit sent) of an n-bit frame."""
    return (v >> (n - start - length)) & ((1 << length) - 1)


# Parity checks per format, in the order an encoder sets them (a later group
# may cover an earlier parity bit): (parity bit position, covered positions
# including the parity bit, wanted parity of their sum: 0 even, 1 odd).
# Positions count from 0 = the first bit sent.
_PARITY: dict[int, list[tuple[int, list[int], int]]] = {
    26: [(0, list(range(13)), 0), (25, list(range(13, 26)), 1)],
    34: [(0, list(range(17)), 0), (33, list(range(17, 34)), 1)],
    # HID Corporate 1000: bit 1 even and bit 34 odd over interleaved 2-of-3
    # groups, then bit 0 odd over the whole frame.
    35: [
        (1, [1] + [i for i in range(2, 34) if i % 3 != 1], 0),
        (34, [i for i in range(1, 33) if i % 3 != 0] + [34], 1),
        (0, list(range(35)), 1),
    ],
    # H10304: even over 1..18, odd over 18..35 (the halves share bit 18).
    37: [(0, list(range(19)), 0), (36, list(range(18, 37)), 1)],
}

# (format, data start, data length, facility length) per frame length.
_LAYOUT = {
    26: ("w26", 1, 24, 8),
    34: ("w34", 1, 32, 16),
    35: ("w35", 2, 32, 12),
    37: ("w37", 1, 35, 16),
}

_KEYPAD_CHARS = "0123456789*#"


def _bit_string(bits: str | Sequence[int]) -> str:
    if isinstance(bits, str):
        s = bits
    else:
        s = "".join("1" if b else "0" for b in bits)
    if s and set(s) - {"0", "1"}:
        raise ValueError(f"Wiegand bits must be a string of 0 and 1, got {bits!r}")
    return s


def decode_wiegand(bits: str | Sequence[int], key_width: int = 24) -> CardResult:
    """Decode one Wiegand frame (first bit sent first).

    26/34/35/37 bits: a card, checked by its parity bits; the key is the data
    bits masked to key_width. 4 bits: one keypad key (0-9, 10 = "*", 11 = "#").
    8 bits: one key whose high nibble is the complement of the low nibble.
    Any other length: kind "raw", error "length", never a card.
    """
    mask = key_mask(key_width)
    raw = _bit_string(bits)
    n = len(raw)
    if n in _LAYOUT:
        fmt, start, length, fac_len = _LAYOUT[n]
        v = int(raw, 2)
        for _pbit, positions, want in _PARITY[n]:
            if _parity(_bits_at(v, n, positions)) != want:
                return _error("card", fmt, "parity", f"{n}-bit frame failed its parity check", raw)
        data = _field(v, n, start, length)
        card_len = length - fac_len
        return CardResult(
            ok=True,
            kind="card",
            format=fmt,
            key=data & mask,
            facility=data >> card_len,
            card=data & ((1 << card_len) - 1),
            raw=raw,
        )
    if n == 4:
        value = int(raw, 2)
        if value >= len(_KEYPAD_CHARS):
            return _error("keypad", "keypad4", "garbage", f"keypad value {value} is no key", raw)
        return CardResult(
            ok=True, kind="keypad", format="keypad4", keys=_KEYPAD_CHARS[value], raw=raw
        )
    if n == 8:
        high, low = int(raw[:4], 2), int(raw[4:], 2)
        if high != (~low & 0xF):
            return _error(
                "keypad",
                "keypad8",
                "parity",
                "8-bit keypad: high nibble is not the complement of the low",
                raw,
            )
        if low >= len(_KEYPAD_CHARS):
            return _error("keypad", "keypad8", "garbage", f"keypad value {low} is no key", raw)
        return CardResult(
            ok=True, kind="keypad", format="keypad8", keys=_KEYPAD_CHARS[low], raw=raw
        )
    return _error(
        "raw", "raw", "length", f"{n}-bit frame is no known format (26, 34, 35, 37, 4, 8)", raw
    )


def _encode(n: int, fields: list[tuple[int, int, int]]) -> str:
    """An n-bit frame with its fields (value, start, length) and parity bits set."""
    v = 0
    for value, start, length in fields:
        if not 0 <= value < (1 << length):
            raise ValueError(f"value {value} does not fit {length} bits")
        v |= value << (n - start - length)
    for pbit, positions, want in _PARITY[n]:
        if _parity(_bits_at(v, n, positions)) != want:
            v |= 1 << (n - 1 - pbit)
    return format(v, f"0{n}b")


def encode_w26(facility: int, card: int) -> str:
    """26-bit frame: even parity, 8-bit facility, 16-bit card, odd parity."""
    return _encode(26, [(facility, 1, 8), (card, 9, 16)])


def encode_w34(facility: int, card: int) -> str:
    """34-bit frame: even parity, 16-bit facility, 16-bit card, odd parity."""
    return _encode(34, [(facility, 1, 16), (card, 17, 16)])


def encode_w35(company: int, card: int) -> str:
    """35-bit HID Corporate 1000: 12-bit company, 20-bit card, three parity bits."""
    return _encode(35, [(company, 2, 12), (card, 14, 20)])


def encode_w37(facility: int, card: int) -> str:
    """37-bit HID H10304: 16-bit facility, 19-bit card, even/odd parity."""
    return _encode(37, [(facility, 1, 16), (card, 17, 19)])


def encode_keypad(key: str, bits: int = 4) -> str:
    """A 4-bit or 8-bit keypad burst for one key ("0"-"9", "*", "#")."""
    value = _KEYPAD_CHARS.index(key)
    if bits == 4:
        return format(value, "04b")
    if bits == 8:
        return format(((~value & 0xF) << 4) | value, "08b")
    raise ValueError("keypad bursts are 4 or 8 bits")


# --- RDM6300 and EM-Marine line readers -------------------------------------------

STX = 0x02
ETX = 0x03
RDM6300_FRAME_LEN = 14
_HEXDIGITS = frozenset(b"0123456789ABCDEFabcdef")


def decode_rdm6300(frame: bytes, key_width: int = 24) -> CardResult:
    """Decode one RDM6300 frame: 0x02, 10 hex digits (version + tag), 2 hex
    digits of checksum (XOR of the five bytes), 0x03.

    The key is the 40-bit value masked to key_width (the low 24 bits at the
    default width, the same key a W26 reader gives for the card).
    """
    mask = key_mask(key_width)
    frame = bytes(frame)
    raw = frame.hex().upper()  # garbage is logged as hex; a well-formed frame as its 12 characters
    if len(frame) != RDM6300_FRAME_LEN:
        return _error(
            "card", "rdm6300", "garbage", f"frame of {len(frame)} bytes, expected 14", raw
        )
    if frame[0] != STX or frame[-1] != ETX:
        return _error(
            "card", "rdm6300", "garbage", "frame does not start with 0x02 and end with 0x03", raw
        )
    body = frame[1:13]
    if not set(body) <= _HEXDIGITS:
        return _error("card", "rdm6300", "garbage", "non-hex characters inside the frame", raw)
    raw = body.decode("ascii")
    payload = bytes.fromhex(raw[:10])
    given = int(body[10:12], 16)
    computed = 0
    for b in payload:
        computed ^= b
    if given != computed:
        return _error(
            "card",
            "rdm6300",
            "checksum",
            f"checksum {given:02X} but the bytes give {computed:02X}",
            raw,
        )
    value = int.from_bytes(payload, "big")
    if value & 0xFFFFFFFF == 0:
        return _error("card", "rdm6300", "garbage", "all-zero tag", raw)
    return CardResult(ok=True, kind="card", format="rdm6300", key=value & mask, raw=raw)


def encode_rdm6300(tag40: int) -> bytes:
    """The RDM6300 frame for a 40-bit EM4100 value (version byte + 32-bit tag)."""
    if not 0 <= tag40 < (1 << 40):
        raise ValueError(f"tag {tag40!r} does not fit 40 bits")
    payload = tag40.to_bytes(5, "big")
    checksum = 0
    for b in payload:
        checksum ^= b
    return bytes([STX]) + f"{tag40:010X}{checksum:02X}".encode("ascii") + bytes([ETX])


_EM_DEC = re.compile(r"^\d{10}$")
_EM_HEX = re.compile(r"^(?:[0-9A-Fa-f]{8}|[0-9A-Fa-f]{10})$")


def decode_em_line(line: str | bytes, key_width: int = 24, number: str = "auto") -> CardResult:
    """Decode one line of a line-oriented EM-Marine reader.

    number="auto": a 10-digit all-decimal line is the print (decimal), else 8
    or 10 hex digits are the tag (a 10-character line of decimal digits is
    read as decimal; set number="hex" for a reader that sends hex only, or
    "dec" for decimal only). CR, LF and spaces are stripped. The value is
    masked to key_width. Anything else, or an all-zero tag, is "garbage".
    """
    mask = key_mask(key_width)
    if number not in ("auto", "dec", "hex"):
        raise ValueError(f'number must be "auto", "dec" or "hex", got {number!r}')
    if isinstance(line, (bytes, bytearray)):
        text = bytes(line).decode("ascii", "replace")
    else:
        text = line
    s = "".join(text.split())  # drops CR, LF, spaces and tabs anywhere
    raw = s
    value: int | None = None
    if number in ("auto", "dec") and _EM_DEC.match(s):
        value = int(s, 10)
    elif number in ("auto", "hex") and _EM_HEX.match(s):
        value = int(s, 16)
    if value is None:
        want = {
            "auto": "10 decimal digits or 8/10 hex digits",
            "dec": "10 decimal digits",
            "hex": "8 or 10 hex digits",
        }
        return _error("card", "emline", "garbage", f"line is not {want[number]}", raw)
    if value == 0:
        return _error("card", "emline", "garbage", "all-zero tag", raw)
    return CardResult(ok=True, kind="card", format="emline", key=value & mask, raw=raw)

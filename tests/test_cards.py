"""Card keys, list strings and frame decoders (agent.core.cards)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.cards import (
    CardFormatError,
    CardResult,
    decode_em_line,
    decode_rdm6300,
    decode_wiegand,
    encode_keypad,
    encode_rdm6300,
    encode_w26,
    encode_w34,
    encode_w35,
    encode_w37,
    format_key,
    parse_card_string,
)
from agent.core.events import CardRead, Keypad, ReaderError

pytestmark = pytest.mark.core

# The RDM6300 example of docs/design.md#em-marine-cards-and-the-rdm6300, byte for byte.
DESIGN_FRAME = b"\x02" + b"14008EC793" + b"CE" + b"\x03"


def flip(bits: str, i: int) -> str:
    return bits[:i] + ("1" if bits[i] == "0" else "0") + bits[i + 1 :]


# --- list strings ---------------------------------------------------------------


def test_printed_pair_gives_one_key():
    # An EM-Marine card printed "0006613779" and "100,60179".
    assert parse_card_string("0006613779") == parse_card_string("100,60179")


def test_design_example_all_forms_agree():
    key = decode_rdm6300(DESIGN_FRAME).key
    assert key == parse_card_string("142,51091")
    assert key == parse_card_string("0009357203")
    assert key == parse_card_string("hex:14008EC793")
    assert key == parse_card_string("hex:8ec793")
    assert key == 0x8EC793


def test_facility_card_is_facility_shifted_by_16():
    assert parse_card_string("1,0") == 65536
    assert parse_card_string("0,65535") == 65535
    assert parse_card_string(" 255 , 65535 ") == (1 << 24) - 1


def test_hex_keeps_low_bits_of_the_key_width():
    assert parse_card_string("hex:0A008EC793", key_width=24) == 0x8EC793
    assert parse_card_string("hex:0A008EC793", key_width=32) == 0x008EC793
    assert parse_card_string("hex:0A008EC793", key_width=40) == 0x0A008EC793


def test_decimal_print_is_masked_to_key_width():
    # A 32-bit decimal of the same card reduces to the 24-bit key.
    full32 = 0x018EC793
    assert parse_card_string(f"{full32:010d}") == 0x8EC793
    assert parse_card_string(f"{full32:010d}", key_width=32) == full32


def test_wider_width_allows_16_bit_facility():
    assert parse_card_string("1000,5000", key_width=32) == (1000 << 16) | 5000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "256,1",
        "1,65536",
        "12345678901",
        "hex:",
        "hex:xyz",
        "0x8EC793",
        "1,2,3",
        "-1,5",
        "hex:12345678901234567",
    ],
)
def test_bad_card_strings_raise_with_the_string_and_forms(text):
    with pytest.raises(CardFormatError) as info:
        parse_card_string(text)
    assert isinstance(info.value, ValueError)
    assert repr(text) in str(info.value)
    assert "accepted forms" in str(info.value)


@pytest.mark.parametrize("width", [0, 16, 23, 65, 128])
def test_key_width_out_of_range_is_refused(width):
    with pytest.raises(ValueError, match="key_width"):
        parse_card_string("1,1", key_width=width)


def test_format_key_design_example():
    forms = format_key(parse_card_string("0009357203"))
    assert forms["facility_card"] == "142,51091"
    assert forms["em_print"] == "0009357203"
    assert forms["hex"].lower().startswith("hex:")
    assert int(forms["hex"][4:], 16) == 0x8EC793


@given(st.integers(24, 64).flatmap(lambda w: st.tuples(st.just(w), st.integers(0, (1 << w) - 1))))
def test_every_display_form_parses_back(width_key):
    width, key = width_key
    forms = format_key(key, width)
    assert forms["key"] == key
    for name in ("facility_card", "em_print", "hex"):
        if forms[name] is not None:
            assert parse_card_string(forms[name], width) == key, name


def test_format_key_refuses_key_wider_than_width():
    with pytest.raises(CardFormatError):
        format_key(1 << 24, 24)


# --- Wiegand ----------------------------------------------------------------------


def test_w26_frame_worked_by_hand():
    # facility 100 = 01100100, card 60179 = 1110101100010011.
    # First 12 data bits 011001001110 hold six ones: even parity bit 0.
    # Last 12 data bits 101100010011 hold six ones: odd parity bit 1.
    frame = "0" + "01100100" + "1110101100010011" + "1"
    assert encode_w26(100, 60179) == frame
    r = decode_wiegand(frame)
    assert r.ok and r.kind == "card" and r.format == "w26" and r.error is None
    assert (r.facility, r.card) == (100, 60179)
    assert r.key == parse_card_string("0006613779")
    assert r.raw == frame


def test_w26_accepts_a_sequence_of_ints():
    frame = encode_w26(142, 51091)
    assert decode_wiegand([int(c) for c in frame]).key == decode_wiegand(frame).key


@given(st.integers(0, 255), st.integers(0, 65535))
def test_w26_roundtrip(fac, card):
    r = decode_wiegand(encode_w26(fac, card))
    assert r.ok and (r.facility, r.card) == (fac, card)
    assert r.key == parse_card_string(f"{fac},{card}")


@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(24, 64))
def test_w34_roundtrip_key_is_data_masked(fac, card, width):
    r = decode_wiegand(encode_w34(fac, card), key_width=width)
    assert r.ok and r.format == "w34" and (r.facility, r.card) == (fac, card)
    assert r.key == ((fac << 16) | card) & ((1 << width) - 1)


@given(st.integers(0, 4095), st.integers(0, (1 << 20) - 1))
def test_w35_roundtrip(company, card):
    r = decode_wiegand(encode_w35(company, card), key_width=32)
    assert r.ok and r.format == "w35" and (r.facility, r.card) == (company, card)
    assert r.key == (company << 20) | card


@given(st.integers(0, 65535), st.integers(0, (1 << 19) - 1))
def test_w37_roundtrip(fac, card):
    r = decode_wiegand(encode_w37(fac, card), key_width=40)
    assert r.ok and r.format == "w37" and (r.facility, r.card) == (fac, card)
    assert r.key == (fac << 19) | card
    assert decode_wiegand(encode_w37(fac, card)).key == ((fac << 19) | card) & 0xFFFFFF


def _c1k35_parity_ok(bits: str) -> bool:
    """Independent reference for HID Corporate 1000 (35 bits), written with
    the masks public decoders use: value bit j counted from the last bit
    sent; bits 32..34 are the top three."""
    v = int(bits, 2)
    bot, mid = v & 0xFFFFFFFF, v >> 32

    def par(x: int) -> int:
        return x.bit_count() & 1

    p_even = par(mid & 1) ^ par(bot & 0xB6DB6DB6)
    p_odd = par(mid & 3) ^ par(bot & 0x6DB6DB6C)
    p_all = par(mid & 3) ^ par(bot)
    return p_even == (mid >> 1) & 1 and (1 - p_odd) == bot & 1 and (1 - p_all) == (mid >> 2) & 1


@given(st.integers(0, 4095), st.integers(0, (1 << 20) - 1))
def test_w35_parity_matches_reference_masks(company, card):
    frame = encode_w35(company, card)
    assert _c1k35_parity_ok(frame)
    v = int(frame, 2)
    # Company in bits 2..13 and card in 14..33 counted from the first bit sent.
    assert (v >> 21) & 0xFFF == company and (v >> 1) & 0xFFFFF == card


@given(st.integers(0, (1 << 35) - 1))
def test_w35_decoder_agrees_with_reference_on_any_frame(v):
    frame = format(v, "035b")
    assert decode_wiegand(frame).ok == _c1k35_parity_ok(frame)


@pytest.mark.parametrize(
    "frame",
    [
        encode_w26(100, 60179),
        encode_w34(4660, 22136),
        encode_w35(1234, 567890),
        encode_w37(4660, 300000),
    ],
    ids=["w26", "w34", "w35", "w37"],
)
def test_any_single_bit_error_is_a_parity_error(frame):
    for i in range(len(frame)):
        r = decode_wiegand(flip(frame, i))
        assert not r.ok and r.error == "parity" and r.kind == "card", i
        assert r.key is None


@pytest.mark.parametrize("key", list("0123456789*#"))
def test_keypad_bursts(key):
    r4 = decode_wiegand(encode_keypad(key, 4))
    r8 = decode_wiegand(encode_keypad(key, 8))
    for r, fmt in ((r4, "keypad4"), (r8, "keypad8")):
        assert r.ok and r.kind == "keypad" and r.format == fmt and r.keys == key and r.key is None


def test_keypad_values_by_hand():
    assert decode_wiegand("1010").keys == "*"
    assert decode_wiegand("1011").keys == "#"
    assert decode_wiegand("11000011").keys == "3"


def test_keypad8_nibble_check():
    r = decode_wiegand("00000011")
    assert not r.ok and r.error == "parity" and r.kind == "keypad"


def test_keypad4_value_without_a_key_is_an_error():
    r = decode_wiegand("1111")
    assert not r.ok and r.error is not None and r.keys is None


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 9, 24, 25, 27, 32, 33, 36, 38, 64])
def test_other_lengths_are_raw_length_errors_never_cards(n):
    bits = ("10" * n)[:n]
    r = decode_wiegand(bits)
    assert not r.ok and r.kind == "raw" and r.format == "raw" and r.error == "length"
    assert r.key is None and r.raw == bits


def test_non_binary_bits_are_refused():
    with pytest.raises(ValueError):
        decode_wiegand("0120")


# --- RDM6300 and EM lines ------------------------------------------------------------


def test_rdm6300_design_example():
    r = decode_rdm6300(DESIGN_FRAME)
    assert r.ok and r.kind == "card" and r.format == "rdm6300" and r.error is None
    assert r.key == parse_card_string("0009357203")
    assert encode_rdm6300(0x14008EC793) == DESIGN_FRAME


def test_rdm6300_key_width_keeps_more_bits():
    assert decode_rdm6300(DESIGN_FRAME, key_width=32).key == 0x008EC793
    assert decode_rdm6300(DESIGN_FRAME, key_width=40).key == 0x14008EC793


def test_rdm6300_accepts_lowercase_hex():
    assert decode_rdm6300(DESIGN_FRAME.lower()).key == 0x8EC793


def test_rdm6300_bad_checksum():
    r = decode_rdm6300(b"\x02" + b"14008EC793" + b"CF" + b"\x03")
    assert not r.ok and r.error == "checksum" and r.key is None


@pytest.mark.parametrize(
    "frame",
    [
        b"\x03" + DESIGN_FRAME[1:],  # no start
        DESIGN_FRAME[:-1] + b"\x02",  # no stop
        b"\x02" + b"14008EC79G" + b"CE" + b"\x03",  # non-hex
        DESIGN_FRAME[:-2] + b"\x03",  # short
        DESIGN_FRAME[:-1] + b"0\x03",  # long
        b"",
    ],
)
def test_rdm6300_malformed_is_garbage(frame):
    r = decode_rdm6300(frame)
    assert not r.ok and r.error == "garbage" and r.key is None


def test_rdm6300_all_zero_tag_is_refused():
    for tag40 in (0, 0x1400000000):
        r = decode_rdm6300(encode_rdm6300(tag40))
        assert not r.ok and r.error == "garbage" and "all-zero" in r.detail


@pytest.mark.parametrize("line", ["0006613779", "0006613779\r\n", " 000 661 3779 \n"])
def test_em_line_decimal_print(line):
    r = decode_em_line(line)
    assert r.ok and r.format == "emline" and r.key == parse_card_string("100,60179")


@pytest.mark.parametrize("line", ["14008EC793\r\n", "008ec793", "008EC793\n"])
def test_em_line_hex(line):
    assert decode_em_line(line).key == decode_rdm6300(DESIGN_FRAME).key


def test_em_line_hex_mode_reads_digits_as_hex():
    assert decode_em_line("0100123456", number="hex").key == 0x0100123456 & 0xFFFFFF
    assert decode_em_line("0100123456").key == 100123456 & 0xFFFFFF


@pytest.mark.parametrize(
    "line", ["", "\r\n", "12345", "ZZZZZZZZZZ", "000661377", "123456789", "0000000000", "00000000"]
)
def test_em_line_garbage(line):
    r = decode_em_line(line)
    assert not r.ok and r.error == "garbage" and r.key is None


# --- one card, one key -----------------------------------------------------------------


@given(st.integers(0, (1 << 40) - 1).filter(lambda v: v & 0xFFFFFF))
def test_same_card_same_key_across_readers(tag40):
    key = decode_rdm6300(encode_rdm6300(tag40)).key
    low24 = tag40 & 0xFFFFFF
    # A W26 reader sends the low 24 bits: facility = bits 16..23, card = bits 0..15.
    assert decode_wiegand(encode_w26(low24 >> 16, low24 & 0xFFFF)).key == key
    assert parse_card_string(f"{low24:010d}") == key
    assert parse_card_string(f"{low24 >> 16},{low24 & 0xFFFF}") == key
    assert parse_card_string(f"hex:{tag40:010X}") == key
    assert decode_em_line(f"{tag40:010X}\r\n", number="hex").key == key
    # At width 32, W34 sends the 32 data bits and agrees with the serial read.
    low32 = tag40 & 0xFFFFFFFF
    assert (
        decode_wiegand(encode_w34(low32 >> 16, low32 & 0xFFFF), 32).key
        == decode_rdm6300(encode_rdm6300(tag40), 32).key
    )


# --- results as core events --------------------------------------------------------------


def test_results_become_core_events():
    result = decode_wiegand(encode_w26(100, 60179))
    assert isinstance(result, CardResult)  # what every decoder returns
    card = result.as_event("entry")
    assert isinstance(card, CardRead) and card.reader == "entry" and card.format == "w26"
    assert card.key == parse_card_string("100,60179")
    err = decode_wiegand(flip(encode_w26(100, 60179), 3)).as_event("entry")
    assert isinstance(err, ReaderError) and err.kind == "parity"
    key = decode_wiegand("1011").as_event("exit")
    assert isinstance(key, Keypad) and key.keys == "#"
    raw = decode_wiegand("101").as_event("exit")
    assert isinstance(raw, ReaderError) and raw.kind == "length"
    chk = decode_rdm6300(b"\x02" + b"14008EC793" + b"00" + b"\x03").as_event("entry")
    assert isinstance(chk, ReaderError) and chk.kind == "checksum"

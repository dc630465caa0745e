"""UECP codec: golden vector, round trips, stuffing, and a stream decoder that survives anything."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers import uecp
from device_drivers.uecp import (
    PI,
    PS,
    Ack,
    Pty,
    RadioText,
    TaTp,
    Tdc,
    UecpDecoder,
    UecpError,
    Unknown,
    decode_frame,
    encode_frame,
    to_rds_ascii,
)


def test_golden_pty_alarm_frame():
    wire = encode_frame([Pty(31)], site=0, encoder=0, sqc=0)
    assert wire == bytes.fromhex("FE 00 00 00 04 07 00 00 1F F5 34 FF")
    f = decode_frame(wire)
    assert f.elements == (Pty(31),) and f.site == 0 and f.encoder == 0


def test_address_bits_site_and_encoder():
    wire = encode_frame([Pty(0)], site=0x3FF, encoder=0x3F, sqc=9)
    assert wire[1:5] == bytes.fromhex("FD 02 FD 02")  # ADD FF FF, stuffed
    f = decode_frame(wire)
    assert (f.site, f.encoder, f.sqc) == (0x3FF, 0x3F, 9)
    f = decode_frame(encode_frame([Pty(0)], site=5, encoder=2))
    assert (f.site, f.encoder) == (5, 2)


ELEMENTS = [
    PI(0xC2B1), PS("BINH LU"), TaTp(ta=True, tp=True), TaTp(ta=False, tp=True), Pty(31),
    RadioText("Bao dang den, ba con chu y", ab=True, transmissions=3), RadioText(""),
    Tdc(5, b"LX*101#"), Ack(0), Ack(1, sqc=42), PI(0xFEFF, dsn=0xFD, psn=0xFE),
]


@pytest.mark.parametrize("el", ELEMENTS, ids=lambda e: type(e).__name__)
def test_each_element_round_trips(el):
    wire = encode_frame([el], site=12, encoder=3, sqc=200)
    assert decode_frame(wire).elements == (el,)


def test_several_elements_in_one_frame():
    els = [PI(0x1234), PS("LOA XA"), Pty(31), TaTp(True, True), RadioText("Canh bao", ab=False)]
    f = decode_frame(encode_frame(els))
    assert list(f.elements) == [PI(0x1234), PS("LOA XA"), Pty(31), TaTp(True, True), RadioText("Canh bao")]


def test_stuffing_keeps_fe_ff_off_the_wire():
    wire = encode_frame([PI(0xFEFF, dsn=0xFD, psn=0xFF)])
    inner = wire[1:-1]
    assert 0xFE not in inner and 0xFF not in inner
    assert b"\xfd\x01" in inner and b"\xfd\x02" in inner and b"\xfd\x00" in inner


def test_unknown_mec_kept_verbatim():
    f = decode_frame(encode_frame(bytes([0x2D, 1, 2, 3])))
    assert f.elements == (Unknown(0x2D, b"\x01\x02\x03"),)


def test_radiotext_bits_and_limits():
    assert RadioText("AB", ab=True, transmissions=2, buffer=2).encode() == bytes([0x0A, 0, 0, 3, 0b0100_0101]) + b"AB"
    with pytest.raises(UecpError, match="at most 64"):
        RadioText("x" * 65).encode()
    with pytest.raises(UecpError, match="at most 8"):
        PS("TOO LONG PS").encode()
    with pytest.raises(UecpError, match="to_rds_ascii"):
        PS("Bình Lư").encode()
    with pytest.raises(UecpError, match="PTY"):
        Pty(32).encode()


def test_vietnamese_to_rds_ascii():
    assert to_rds_ascii("Bão đang đến Đà Nẵng") == "Bao dang den Da Nang"
    assert to_rds_ascii("Bình Lư\tỞ") == "Binh Lu O"
    assert to_rds_ascii("giá €5") == "gia ?5"


def test_ack_encode_decode():
    assert Ack(0).encode() == b"\x18\x00"
    assert Ack(1, 7).encode() == b"\x18\x01\x07"
    a = decode_frame(encode_frame([Ack(1, 7)], sqc=7)).elements[0]
    assert not a.ok and a.reason == "crc_error" and a.sqc == 7


def test_strict_decode_errors_say_what():
    good = encode_frame([Pty(3)])
    bad_crc = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]
    with pytest.raises(UecpError, match="CRC"):
        decode_frame(bad_crc)
    with pytest.raises(UecpError, match="MFL"):
        decode_frame(bytes.fromhex("FE 00 00 00 09 07 00 00 1F F5 34 FF"))
    with pytest.raises(UecpError, match="stuffing"):
        decode_frame(bytes.fromhex("FE 00 00 00 FD 07 FF"))


def test_stream_decoder_resyncs_and_counts():
    f1 = encode_frame([Pty(31)], sqc=1)
    f2 = encode_frame([Tdc(5, b"LX*000#")], sqc=2)
    f3 = encode_frame([PS("BINH LU")], sqc=3)
    bad_crc = bytearray(encode_frame([Pty(1)], sqc=4))
    bad_crc[-2] ^= 0x01
    stream = (b"hello\r\n" + f1 + f2[:6] + f3 + bytes(bad_crc)
              + bytes.fromhex("FE 00 00 FD 07 FF") + b"\x00" * 3 + f2)
    d = UecpDecoder()
    got = []
    for b in stream:  # byte by byte: frames may be split anywhere
        got += d.feed(bytes([b]))
    assert [f.sqc for f in got] == [1, 3, 2]
    assert got[2].elements == (Tdc(5, b"LX*000#"),)
    s = d.stats
    assert (s["frames"], s["garbage_bytes"], s["truncated"], s["bad_crc"], s["bad_stuffing"]) == (3, 10, 1, 1, 1)


def test_stream_decoder_drops_oversize_and_recovers():
    d = UecpDecoder()
    assert d.feed(b"\xfe" + b"\x01" * 5000) == []
    assert d.stats["oversize"] == 1
    assert len(d._buf) <= uecp.MAX_WIRE_FRAME
    assert [f.elements for f in d.feed(encode_frame([Pty(2)]))] == [(Pty(2),)]


def test_malformed_element_still_delivers_frame():
    d = UecpDecoder()
    got = d.feed(encode_frame(bytes([0x07, 0, 0])))  # PTY cut short
    assert len(got) == 1 and d.stats["bad_element"] == 1
    assert isinstance(got[0].elements[0], Unknown)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=700), max_size=20))
def test_fuzz_decoder_never_raises_and_stays_bounded(chunks):
    d = UecpDecoder()
    for c in chunks:
        for f in d.feed(c):
            assert isinstance(f, uecp.Frame)
        assert len(d._buf) <= uecp.MAX_WIRE_FRAME


element_st = st.one_of(
    st.builds(PI, st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255)),
    st.builds(Pty, st.integers(0, 31)),
    st.builds(Tdc, st.integers(0, 31), st.binary(max_size=60)),
    st.builds(RadioText, st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64),
              st.booleans()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40), element_st, st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(1, 64))
def test_fuzz_frames_between_garbage_all_recovered(items, chunk):
    stream = b""
    for garbage, el, sqc in items:
        stream += garbage + encode_frame([el], sqc=sqc)
    d = UecpDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += d.feed(stream[i:i + chunk])
    assert [(f.sqc, f.elements) for f in got] == [(sqc, (el,)) for _, el, sqc in items]

"""Framing: line and STX/ETX decoders resynchronise past anything and count what they drop."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers import uecp
from device_drivers.framing import BinaryFramer, BinarySpec, CrcSpec, LineFramer, drops
from device_drivers.profiles import load_profile

CHECK = b"123456789"
UECP_GOLDEN = bytes.fromhex("FE 00 00 00 04 07 00 00 1F F5 34 FF")


def test_crc_catalogue_check_values():
    # published check values of the CRC catalogue, computed over "123456789"
    assert CrcSpec(16, 0x1021, 0xFFFF).compute(CHECK) == 0x29B1                     # CCITT-FALSE
    assert CrcSpec(16, 0x1021, 0xFFFF, 0xFFFF).compute(CHECK) == 0xD64E             # GENIBUS (UECP)
    assert CrcSpec(16, 0x8005, 0xFFFF, 0, True, True).compute(CHECK) == 0x4B37      # MODBUS
    assert CrcSpec(16, 0x1021, 0xFFFF, 0xFFFF, True, True).compute(CHECK) == 0x906E
    assert CrcSpec(32, 0x04C11DB7, 0xFFFFFFFF, 0xFFFFFFFF, True, True).compute(CHECK) == 0xCBF43926
    assert CrcSpec(8, 0x07).compute(CHECK) == 0xF4
    assert CrcSpec(16, 0x8005, 0xFFFF, 0, True, True, "little").to_bytes(CHECK) == b"\x37\x4B"


def test_lines_across_chunks_and_noise():
    f = LineFramer(b"\r\n", max_length=32)
    assert f.feed(b"TX.FREQ=9") == []
    assert f.feed(b"8.5\r") == []
    assert f.feed(b"\nOK\r\n\r\n") == [b"TX.FREQ=98.5", b"OK"]
    assert f.feed(b"\x00\xffOK\r\nOK\r\n") == [b"OK"]        # a half-noise line is not half-parsed
    assert f.stats["garbage_lines"] == 1 and f.stats["empty"] == 1
    assert f.feed(b"x" * 100 + b"\r\nTX.PLL=LOCK\r\n") == [b"TX.PLL=LOCK"]
    assert f.stats["overlong"] == 1 and f.stats["frames"] == 4
    assert f.encode(b"TX.FREQ?") == b"TX.FREQ?\r\n"


def uecp_framer() -> BinaryFramer:
    return load_profile("uecp-encoder").transport.decoder()


def test_uecp_profile_framing_matches_the_uecp_codec():
    """The profile's generic description (own CRC code) agrees with device_drivers/uecp.py."""
    f = uecp_framer()
    assert f.encode(UECP_GOLDEN[1:-3]) == UECP_GOLDEN
    assert f.feed(b"\x00\x13" + UECP_GOLDEN[:6] + UECP_GOLDEN) == [UECP_GOLDEN[1:-3]]
    assert f.stats["truncated"] == 1 and f.stats["garbage_bytes"] == 2 + 5
    # bytes needing stuffing (FD/FE/FF in SQC and data) round-trip through both implementations
    wire = uecp.encode_frame(b"\x26\x04\x05\xfd\xfe\xff", sqc=0xFE)
    assert f.feed(wire) == [uecp.unstuff(wire[1:-1])[:-2]]
    assert f.encode(uecp.unstuff(wire[1:-1])[:-2]) == wire


def test_binary_drops_are_counted_not_raised():
    f = uecp_framer()
    bad_crc = UECP_GOLDEN[:-2] + b"\x00\xff"
    bad_escape = b"\xfe\x00\xfd\x07\xff"
    assert f.feed(bad_crc + bad_escape + b"\xfe\x01\xff" + UECP_GOLDEN) == [UECP_GOLDEN[1:-3]]
    assert (f.stats["bad_crc"], f.stats["bad_escape"], f.stats["too_short"]) == (1, 1, 1)
    assert drops(f.stats) == 3


def test_xor_escaping_and_shared_flag_byte():
    hdlc = BinaryFramer(BinarySpec(0x7E, 0x7E, 0x7D, "xor", crc=CrcSpec(16, 0x1021, 0xFFFF, 0xFFFF,
                                                                      True, True, "little")))
    body = bytes([0x01, 0x7E, 0x7D, 0x02])
    wire = hdlc.encode(body)
    assert wire.count(0x7E) == 2 and b"\x7d\x5e" in wire
    assert hdlc.feed(wire + wire[1:]) == [body, body]   # one flag closes a frame and opens the next


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=400), line=st.from_regex(rb"\A[ -~]{1,40}\Z"),
       cuts=st.lists(st.integers(0, 500), max_size=6))
def test_line_resync_fuzz(garbage, line, cuts):
    f = LineFramer(b"\r\n", max_length=64)
    stream = garbage + b"\r\n" + line + b"\r\n"
    out = []
    for chunk in _chunks(stream, cuts):
        out += f.feed(chunk)
        assert f.pending() <= 64 + 2
    assert out[-1] == line


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=700), body=st.binary(max_size=60),
       cuts=st.lists(st.integers(0, 900), max_size=6))
def test_binary_resync_fuzz(garbage, body, cuts):
    f = BinaryFramer(BinarySpec(0xFE, 0xFF, 0xFD, "index", (0xFD, 0xFE, 0xFF),
                                crc=CrcSpec(16, 0x1021, 0xFFFF, 0xFFFF), max_length=300))
    out = []
    for chunk in _chunks(garbage + f.encode(body), cuts):
        out += f.feed(chunk)
        assert f.pending() <= 300
    assert out[-1] == body


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]

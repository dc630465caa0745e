"""UECP (EBU/RDS Forum SPB 490) codec: the byte format RDS encoders accept on their serial port.

Frame: ``FE | ADD(2, MSB first: site 10 bits, encoder 6 bits) | SQC | MFL | message | CRC | FF``.
The CRC is CRC-16/CCITT (poly 0x1021, init 0xFFFF, final XOR 0xFFFF, sent MSB first) over
ADD..last message byte.  After the CRC is added, FD/FE/FF between start and stop are
stuffed as FD 00 / FD 01 / FD 02, so FE and FF only ever mark frame edges on the wire and a
receiver can resynchronise on them after garbage.

Data channel for addressing the FM receivers: **TDC, MEC 0x26** (transparent data channel,
RDS group 5A/5B).  Why not the others: free-format groups (0x24) make us pick an RDS group
type and block layout ourselves and collide with whatever else the encoder schedules;
ODA (0x40/0x42/0x46) needs a registered AID and a group allocation per encoder; TDC is the
one channel RDS set aside exactly for private point-to-multipoint data, receivers filter it
by its 5-bit channel number, and even the cheap encoders that ignore most MECs support it.
Layout used (SPB 490 §3.3.x): ``26 | MEL | addr | data…`` with MEL = 1 + len(data),
addr bits 4-0 = channel number, bits 6-5 = buffer configuration (00 = send once).

Message acknowledgement (MEC 0x18): ``18 | code`` for OK, ``18 | code | SQC`` otherwise —
many encoders never send it (the driver must not wait for it forever).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

START, STOP, STUFF = 0xFE, 0xFF, 0xFD
MAX_MFL = 255
# stuffed worst case: every byte of ADD..CRC doubled, plus FE/FF
MAX_WIRE_FRAME = 2 + 2 * (2 + 1 + 1 + MAX_MFL + 2)

MEC_PI, MEC_PS, MEC_TA_TP, MEC_PTY, MEC_RT, MEC_ACK, MEC_TDC = 0x01, 0x02, 0x03, 0x07, 0x0A, 0x18, 0x26
PTY_ALARM_TEST, PTY_ALARM = 30, 31

ACK_CODES = {
    0: "ok", 1: "crc_error", 2: "message_not_received", 3: "message_unknown", 4: "dsn_error",
    5: "psn_error", 6: "parameter_out_of_range", 7: "element_length_error",
    8: "field_length_error", 9: "message_not_acceptable", 10: "end_message_missing",
    11: "buffer_overflow", 12: "bad_stuffing", 13: "unexpected_end_of_message",
}


class UecpError(ValueError):
    """A frame or message element that does not follow SPB 490 (the text says what)."""


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc ^ 0xFFFF


def stuff(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b >= STUFF:
            out += bytes((STUFF, b - STUFF))
        else:
            out.append(b)
    return bytes(out)


def unstuff(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == STUFF:
            nxt = next(it, None)
            if nxt is None or nxt > 2:
                raise UecpError(f"bad stuffing: FD followed by {'end' if nxt is None else f'{nxt:02X}'}")
            out.append(STUFF + nxt)
        elif b in (START, STOP):
            raise UecpError(f"unstuffed {b:02X} inside a frame")
        else:
            out.append(b)
    return bytes(out)


def to_rds_ascii(text: str) -> str:
    """Vietnamese (or any) text as plain ASCII for PS/RT: 'Bão đang đến' -> 'Bao dang den'.

    RDS receivers only show the basic RDS character set; without this, diacritics arrive
    as garbage.  Unmappable characters become '?'.
    """
    text = text.replace("đ", "d").replace("Đ", "D")
    out = []
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.combining(ch):
            continue
        if ch in "\t\n\r":
            ch = " "
        out.append(ch if 0x20 <= ord(ch) < 0x7F else "?")
    return "".join(out)


def _ascii(text: str, what: str, maxlen: int) -> bytes:
    if len(text) > maxlen:
        raise UecpError(f"{what} is {len(text)} characters; at most {maxlen} allowed")
    try:
        return text.encode("ascii")
    except UnicodeEncodeError as e:
        raise UecpError(f"{what} {text!r} is not ASCII; pass it through to_rds_ascii() first") from e


def _byte(v: int, what: str, hi: int = 255) -> int:
    if not isinstance(v, int) or not 0 <= v <= hi:
        raise UecpError(f"{what} must be an integer 0..{hi} (got {v!r})")
    return v


# ----- message elements ----------------------------------------------------------------

@dataclass(frozen=True)
class PI:
    pi: int
    dsn: int = 0
    psn: int = 0
    MEC = MEC_PI

    def encode(self) -> bytes:
        _byte(self.pi, "PI", 0xFFFF)
        return bytes((self.MEC, _byte(self.dsn, "DSN"), _byte(self.psn, "PSN"), self.pi >> 8, self.pi & 0xFF))


@dataclass(frozen=True)
class PS:
    ps: str
    dsn: int = 0
    psn: int = 0
    MEC = MEC_PS

    def encode(self) -> bytes:
        text = _ascii(self.ps, "PS", 8).ljust(8)
        return bytes((self.MEC, _byte(self.dsn, "DSN"), _byte(self.psn, "PSN"))) + text


@dataclass(frozen=True)
class TaTp:
    ta: bool
    tp: bool
    dsn: int = 0
    psn: int = 0
    MEC = MEC_TA_TP

    def encode(self) -> bytes:
        return bytes((self.MEC, _byte(self.dsn, "DSN"), _byte(self.psn, "PSN"),
                      (int(bool(self.tp)) << 1) | int(bool(self.ta))))


@dataclass(frozen=True)
class Pty:
    pty: int
    dsn: int = 0
    psn: int = 0
    MEC = MEC_PTY

    def encode(self) -> bytes:
        return bytes((self.MEC, _byte(self.dsn, "DSN"), _byte(self.psn, "PSN"), _byte(self.pty, "PTY", 31)))


@dataclass(frozen=True)
class RadioText:
    """RT up to 64 chars; toggling `ab` tells receivers to clear the old text."""
    text: str
    ab: bool = False
    transmissions: int = 0  # 0 = repeat forever
    buffer: int = 0         # 0 = replace the buffer, 2 = append
    dsn: int = 0
    psn: int = 0
    MEC = MEC_RT

    def encode(self) -> bytes:
        head = bytes((self.MEC, _byte(self.dsn, "DSN"), _byte(self.psn, "PSN")))
        if not self.text and self.buffer == 0:
            return head + b"\x00"  # MEL 0: clear the RT buffer
        body = _ascii(self.text, "RT", 64)
        cfg = (_byte(self.buffer, "RT buffer configuration", 3) << 5) \
            | (_byte(self.transmissions, "RT transmissions", 15) << 1) | int(bool(self.ab))
        return head + bytes((1 + len(body), cfg)) + body


@dataclass(frozen=True)
class Tdc:
    """Transparent data channel payload (the receivers' addressing codes ride here)."""
    channel: int
    data: bytes
    buffer: int = 0
    MEC = MEC_TDC

    def encode(self) -> bytes:
        if len(self.data) > 254:
            raise UecpError(f"TDC data is {len(self.data)} bytes; at most 254 allowed")
        addr = (_byte(self.buffer, "TDC buffer configuration", 3) << 5) | _byte(self.channel, "TDC channel", 31)
        return bytes((self.MEC, 1 + len(self.data), addr)) + bytes(self.data)


@dataclass(frozen=True)
class Ack:
    code: int = 0
    sqc: int = 0
    MEC = MEC_ACK

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def reason(self) -> str:
        return ACK_CODES.get(self.code, f"code_{self.code}")

    def encode(self) -> bytes:
        if self.code == 0:
            return bytes((self.MEC, 0))
        return bytes((self.MEC, _byte(self.code, "ACK code"), _byte(self.sqc, "SQC")))


@dataclass(frozen=True)
class Unknown:
    """An element this codec does not parse: the rest of the message field, kept verbatim."""
    mec: int
    data: bytes = b""

    def encode(self) -> bytes:
        return bytes((self.mec,)) + self.data


Element = PI | PS | TaTp | Pty | RadioText | Tdc | Ack | Unknown


def _need(mf: bytes, i: int, n: int, what: str) -> None:
    if i + n > len(mf):
        raise UecpError(f"{what} needs {n} bytes at offset {i}, only {len(mf) - i} left")


def decode_elements(mf: bytes) -> list[Element]:
    """Split a message field into elements; an unknown MEC swallows the rest (its length is unknowable)."""
    out: list[Element] = []
    i = 0
    while i < len(mf):
        mec = mf[i]
        if mec == MEC_PI:
            _need(mf, i, 5, "PI")
            out.append(PI((mf[i + 3] << 8) | mf[i + 4], mf[i + 1], mf[i + 2]))
            i += 5
        elif mec == MEC_PS:
            _need(mf, i, 11, "PS")
            out.append(PS(mf[i + 3:i + 11].decode("latin-1").rstrip(" "), mf[i + 1], mf[i + 2]))
            i += 11
        elif mec in (MEC_TA_TP, MEC_PTY):
            _need(mf, i, 4, "TA/TP" if mec == MEC_TA_TP else "PTY")
            v = mf[i + 3]
            if mec == MEC_PTY and v > 31:
                raise UecpError(f"PTY {v} out of range 0..31")
            out.append(TaTp(bool(v & 1), bool(v & 2), mf[i + 1], mf[i + 2]) if mec == MEC_TA_TP
                       else Pty(v, mf[i + 1], mf[i + 2]))
            i += 4
        elif mec == MEC_RT:
            _need(mf, i, 4, "RT")
            mel = mf[i + 3]
            _need(mf, i + 4, mel, "RT text")
            if mel == 0:
                out.append(RadioText("", dsn=mf[i + 1], psn=mf[i + 2]))
            else:
                cfg = mf[i + 4]
                out.append(RadioText(mf[i + 5:i + 4 + mel].decode("latin-1"), bool(cfg & 1),
                                     (cfg >> 1) & 0x0F, (cfg >> 5) & 0x03, mf[i + 1], mf[i + 2]))
            i += 4 + mel
        elif mec == MEC_TDC:
            _need(mf, i, 3, "TDC")
            mel = mf[i + 1]
            if mel < 1:
                raise UecpError("TDC with MEL 0 has no channel byte")
            _need(mf, i + 2, mel, "TDC data")
            addr = mf[i + 2]
            out.append(Tdc(addr & 0x1F, bytes(mf[i + 3:i + 2 + mel]), (addr >> 5) & 0x03))
            i += 2 + mel
        elif mec == MEC_ACK:
            _need(mf, i, 2, "ACK")
            code = mf[i + 1]
            if code == 0:
                out.append(Ack(0))
                i += 2
            else:
                _need(mf, i, 3, "ACK")
                out.append(Ack(code, mf[i + 2]))
                i += 3
        else:
            out.append(Unknown(mec, bytes(mf[i + 1:])))
            break
    return out


# ----- frames -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    site: int
    encoder: int
    sqc: int
    elements: tuple[Element, ...]
    message: bytes  # the raw message field (MFL bytes)


def encode_frame(elements: list[Element] | tuple[Element, ...] | bytes, *, site: int = 0,
                 encoder: int = 0, sqc: int = 0) -> bytes:
    mf = bytes(elements) if isinstance(elements, bytes | bytearray) else b"".join(e.encode() for e in elements)
    if len(mf) > MAX_MFL:
        raise UecpError(f"message field is {len(mf)} bytes; at most {MAX_MFL} fit in one frame")
    _byte(site, "site address", 1023)
    _byte(encoder, "encoder address", 63)
    add = (site << 6) | encoder
    body = bytes((add >> 8, add & 0xFF, _byte(sqc, "SQC"), len(mf))) + mf
    crc = crc16(body)
    return bytes((START,)) + stuff(body + bytes((crc >> 8, crc & 0xFF))) + bytes((STOP,))


def _parse_body(body: bytes) -> Frame:
    if len(body) < 6:
        raise UecpError(f"frame too short ({len(body)} bytes between FE and FF)")
    mfl = body[3]
    if len(body) != 6 + mfl:
        raise UecpError(f"MFL says {mfl} message bytes but the frame holds {len(body) - 6}")
    got, want = (body[-2] << 8) | body[-1], crc16(body[:-2])
    if got != want:
        raise _CrcError(f"CRC {got:04X} != computed {want:04X}")
    add = (body[0] << 8) | body[1]
    mf = bytes(body[4:4 + mfl])
    return Frame(add >> 6, add & 0x3F, body[2], (), mf)


class _CrcError(UecpError):
    pass


def decode_frame(wire: bytes) -> Frame:
    """Strictly decode exactly one frame (FE … FF); raise UecpError saying what is wrong."""
    if len(wire) < 2 or wire[0] != START or wire[-1] != STOP:
        raise UecpError("a frame starts with FE and ends with FF")
    f = _parse_body(unstuff(wire[1:-1]))
    return Frame(f.site, f.encoder, f.sqc, tuple(decode_elements(f.message)), f.message)


class UecpDecoder:
    """Stream decoder: feed arbitrary chunks, get whole valid frames; never raises.

    `stats` counts garbage bytes outside frames, truncated frames (a new FE before FF),
    oversize frames, stuffing errors, length errors, CRC errors and frames whose message
    elements could not be parsed (those are still returned, with an Unknown element).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_frame = False
        self._in_garbage = False
        self._quiet = False  # a bad burst was logged; stay quiet until a good frame
        self.stats: dict[str, int] = dict.fromkeys(
            ("frames", "garbage_bytes", "truncated", "oversize", "bad_stuffing", "bad_length",
             "bad_crc", "bad_element"), 0)

    def _count(self, kind: str, n: int = 1, **kw) -> None:
        self.stats[kind] += n
        if kind != "garbage_bytes" and not self._quiet:  # once per burst: noise has many FE bytes
            self._quiet = True
            log.warning("uecp_frame_dropped", reason=kind, **kw)

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        for b in bytes(data):
            if b == START:
                if self._in_frame:
                    self._count("truncated")
                self._in_frame, self._in_garbage = True, False
                self._buf.clear()
            elif not self._in_frame:
                self.stats["garbage_bytes"] += 1
                if not self._in_garbage:  # log once per burst
                    self._in_garbage = True
                    if not self._quiet:
                        self._quiet = True
                        log.warning("uecp_garbage")
            elif b == STOP:
                self._in_frame = False
                f = self._finish(bytes(self._buf))
                self._buf.clear()
                if f is not None:
                    frames.append(f)
            else:
                self._buf.append(b)
                if len(self._buf) > MAX_WIRE_FRAME:
                    self._count("oversize")
                    self._in_frame = False
                    self._buf.clear()
        return frames

    def _finish(self, stuffed: bytes) -> Frame | None:
        try:
            body = unstuff(stuffed)
        except UecpError as e:
            self._count("bad_stuffing", detail=str(e))
            return None
        try:
            f = _parse_body(body)
        except _CrcError as e:
            self._count("bad_crc", detail=str(e))
            return None
        except UecpError as e:
            self._count("bad_length", detail=str(e))
            return None
        try:
            elements = tuple(decode_elements(f.message))
        except UecpError as e:
            self._count("bad_element", detail=str(e))
            elements = (Unknown(f.message[0], f.message[1:]),) if f.message else ()
        self.stats["frames"] += 1
        self._quiet = False
        return Frame(f.site, f.encoder, f.sqc, elements, f.message)


@dataclass
class SqcCounter:
    """Sequence counter for outgoing frames: 1..255, wrapping (0 means 'no sequence')."""
    value: int = field(default=0)

    def next(self) -> int:
        self.value = self.value % 255 + 1
        return self.value

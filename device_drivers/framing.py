"""Turning a serial byte stream into frames, as a firmware profile describes it.

Serial lines pick up noise (lightning, a loose connector, a device rebooting mid-reply),
so both decoders are incremental, resynchronise on the next terminator or start byte,
count what they drop in ``stats`` and never raise: a corrupt frame is a statistic, not an
exception in the daemon.  Convention shared with ``uecp.UecpDecoder``: ``stats["frames"]``
counts good frames; every other key counts a kind of dropped input, so a transport can
tell "garbage arrived" without knowing the framing.

Pure code: no I/O, no clock.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

# --------------------------------------------------------------------------------- CRC


def _reflect(v: int, width: int) -> int:
    out = 0
    for _ in range(width):
        out = (out << 1) | (v & 1)
        v >>= 1
    return out


@dataclass(frozen=True)
class CrcSpec:
    """A CRC in the usual parameter model (width/poly/init/refin/refout/xorout).

    ``span`` says which bytes are covered: ``body`` = between STX and the CRC,
    ``with_stx`` = the STX byte too.  ``byte_order`` is how the CRC is sent.
    """

    width: Literal[8, 16, 32]
    poly: int
    init: int = 0
    xorout: int = 0
    refin: bool = False
    refout: bool = False
    byte_order: Literal["big", "little"] = "big"
    span: Literal["body", "with_stx"] = "body"

    @property
    def nbytes(self) -> int:
        return self.width // 8

    @cached_property
    def _table(self) -> list[int]:
        top, mask = 1 << (self.width - 1), (1 << self.width) - 1
        table = []
        for b in range(256):
            crc = b << (self.width - 8)
            for _ in range(8):
                crc = ((crc << 1) ^ self.poly) & mask if crc & top else (crc << 1) & mask
            table.append(crc)
        return table

    def compute(self, data: bytes) -> int:
        mask, shift, table = (1 << self.width) - 1, self.width - 8, self._table
        crc = self.init & mask
        for b in data:
            if self.refin:
                b = _reflect(b, 8)
            crc = ((crc << 8) & mask) ^ table[((crc >> shift) ^ b) & 0xFF]
        if self.refout:
            crc = _reflect(crc, self.width)
        return (crc ^ self.xorout) & mask

    def to_bytes(self, data: bytes) -> bytes:
        return self.compute(data).to_bytes(self.nbytes, self.byte_order)


# ------------------------------------------------------------------------------- lines


class LineFramer:
    """Text lines ending in ``terminator``.

    A line longer than ``max_length`` is dropped up to its terminator ("overlong"); with
    ``printable_only`` a line holding control or non-ASCII bytes is dropped ("garbage_lines")
    because line noise rarely looks like a valid reply and a half-noise line must not be
    half-parsed.  Empty lines are ignored ("empty").
    """

    def __init__(self, terminator: bytes = b"\r\n", max_length: int = 256,
                 printable_only: bool = True) -> None:
        if not terminator:
            raise ValueError("line framing needs a terminator")
        self.terminator = bytes(terminator)
        self.max_length = max_length
        self.printable_only = printable_only
        self._buf = bytearray()
        self._skipping = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("frames", "garbage_lines", "garbage_bytes", "overlong", "empty"), 0)

    def encode(self, payload: bytes) -> bytes:
        return bytes(payload) + self.terminator

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self._buf += data
        term = self.terminator
        while True:
            i = self._buf.find(term)
            if i < 0:
                break
            line = bytes(self._buf[:i])
            del self._buf[: i + len(term)]
            if self._skipping:
                self._skipping = False
                self.stats["garbage_bytes"] += len(line)
                continue
            self._accept(line, out)
        if len(self._buf) > self.max_length:
            # keep a possible partial terminator at the end so the resync point is not lost
            keep = len(term) - 1
            dropped = len(self._buf) - keep
            if not self._skipping:
                self.stats["overlong"] += 1
                self._skipping = True
            self.stats["garbage_bytes"] += dropped
            del self._buf[:dropped]
        return out

    def _accept(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            self.stats["empty"] += 1
        elif len(line) > self.max_length:
            self.stats["overlong"] += 1
            self.stats["garbage_bytes"] += len(line)
        elif self.printable_only and not all(0x20 <= b < 0x7F or b == 0x09 for b in line):
            self.stats["garbage_lines"] += 1
            self.stats["garbage_bytes"] += len(line)
        else:
            self.stats["frames"] += 1
            out.append(line)

    def pending(self) -> int:
        return len(self._buf)


# ------------------------------------------------------------------------------ binary


@dataclass(frozen=True)
class BinarySpec:
    """STX ... ETX framing with byte stuffing and an optional CRC.

    Escape schemes: ``none``; ``index`` = ESC then the byte's index in ``escaped``
    (UECP: FD/FE/FF -> FD 00/01/02); ``xor`` = ESC then byte ^ ``xor_mask`` (HDLC/PPP).
    The CRC is computed on the unstuffed body and stuffed with it.
    """

    stx: int
    etx: int
    escape: int | None = None
    escape_scheme: Literal["none", "index", "xor"] = "none"
    escaped: tuple[int, ...] = ()
    xor_mask: int = 0x20
    crc: CrcSpec | None = None
    max_length: int = 1024
    min_length: int = 0

    def special(self) -> tuple[int, ...]:
        if self.escaped:
            return tuple(self.escaped)
        out = [self.stx, self.etx]
        if self.escape is not None:
            out.insert(0, self.escape)
        return tuple(out)


class BinaryFramer:
    """Incremental decoder and encoder for a `BinarySpec`; frames are bodies without the CRC."""

    def __init__(self, spec: BinarySpec) -> None:
        if spec.escape_scheme != "none" and spec.escape is None:
            raise ValueError(f"escape scheme {spec.escape_scheme!r} needs an escape byte")
        self.spec = spec
        self._special = spec.special()
        self._buf = bytearray()
        self._in_frame = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("frames", "garbage_bytes", "truncated", "oversize", "bad_escape", "bad_crc",
             "too_short"), 0)

    # ---- encoding ------------------------------------------------------------------
    def _stuff(self, data: bytes) -> bytes:
        s = self.spec
        if s.escape_scheme == "none":
            return data
        out = bytearray()
        for b in data:
            if b in self._special:
                out.append(s.escape)  # type: ignore[arg-type]
                out.append(self._special.index(b) if s.escape_scheme == "index" else b ^ s.xor_mask)
            else:
                out.append(b)
        return bytes(out)

    def encode(self, body: bytes) -> bytes:
        s = self.spec
        crc = b""
        if s.crc is not None:
            covered = (bytes((s.stx,)) if s.crc.span == "with_stx" else b"") + bytes(body)
            crc = s.crc.to_bytes(covered)
        return bytes((s.stx,)) + self._stuff(bytes(body) + crc) + bytes((s.etx,))

    # ---- decoding ------------------------------------------------------------------
    def feed(self, data: bytes) -> list[bytes]:
        s, out = self.spec, []
        for b in bytes(data):
            if b == s.etx and self._in_frame and (s.stx != s.etx or self._buf):
                # with STX == ETX (HDLC-style flags) one flag ends a frame and opens the next
                self._in_frame = s.stx == s.etx
                body = self._finish(bytes(self._buf))
                self._buf.clear()
                if body is not None:
                    out.append(body)
            elif b == s.stx:
                if self._in_frame and self._buf:
                    self.stats["truncated"] += 1
                    self.stats["garbage_bytes"] += len(self._buf)
                self._in_frame = True
                self._buf.clear()
            elif not self._in_frame:
                self.stats["garbage_bytes"] += 1
            else:
                self._buf.append(b)
                if len(self._buf) > s.max_length:
                    self.stats["oversize"] += 1
                    self.stats["garbage_bytes"] += len(self._buf)
                    self._in_frame = False
                    self._buf.clear()
        return out

    def _unstuff(self, data: bytes) -> bytes | None:
        s = self.spec
        if s.escape_scheme == "none":
            return data
        out = bytearray()
        it = iter(data)
        for b in it:
            if b != s.escape:
                out.append(b)
                continue
            nxt = next(it, None)
            if nxt is None:
                return None
            if s.escape_scheme == "index":
                if nxt >= len(self._special):
                    return None
                out.append(self._special[nxt])
            else:
                out.append(nxt ^ s.xor_mask)
        return bytes(out)

    def _finish(self, raw: bytes) -> bytes | None:
        s = self.spec
        data = self._unstuff(raw)
        if data is None:
            self.stats["bad_escape"] += 1
            self.stats["garbage_bytes"] += len(raw)
            return None
        n = s.crc.nbytes if s.crc else 0
        if len(data) < n + s.min_length:
            self.stats["too_short"] += 1
            self.stats["garbage_bytes"] += len(raw)
            return None
        body = data[: len(data) - n]
        if s.crc is not None:
            covered = (bytes((s.stx,)) if s.crc.span == "with_stx" else b"") + body
            if s.crc.to_bytes(covered) != data[len(data) - n:]:
                self.stats["bad_crc"] += 1
                self.stats["garbage_bytes"] += len(raw)
                return None
        self.stats["frames"] += 1
        return body

    def pending(self) -> int:
        return len(self._buf)


Framer = LineFramer | BinaryFramer


def drops(stats: dict[str, int]) -> int:
    """Everything a decoder dropped, for any decoder following the stats convention."""
    return sum(v for k, v in stats.items() if k not in ("frames", "garbage_bytes", "empty"))

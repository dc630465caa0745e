"""Driver for a UECP RDS encoder: PI, PS, PTY, TA/TP, RadioText and the data channel.

Frames are built by device_drivers/uecp.py.  Most encoders never acknowledge (the profile
says `acks: false`): a frame hit by line noise would be lost silently, so each one is
sent `repeat` times, `repeat_gap_ms` apart.  An encoder that does acknowledge gets a
sequence counter, and the driver waits for its ACK with the profile's timeout/retries
(a NACK raises RdsRejected with the reason).

Data channel: the FM receivers' addressing codes travel as transparent data channel
(TDC, MEC 0x26) messages; see uecp.py for why that channel.  fm_signalling already
repeats codes (interleaved), so it should call `send_element(msg.element, repeat=1)`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from device_drivers import uecp
from device_drivers.profiles import Profile, load_profile
from device_drivers.serial_port import NoReply, PortUnavailable, SerialDevice

log = structlog.get_logger(__name__)

EventCb = Callable[[str, dict[str, Any]], None]


class RdsRejected(Exception):
    """The encoder answered with a negative acknowledgement."""


class RdsUnreachable(ConnectionError):
    """No ACK after every retry, or the port is gone."""


class RdsEncoderDriver(SerialDevice):
    device_name = "rds"

    def __init__(self, port_url: str, profile: Profile | str | Path, site_address: int | None = None,
                 encoder_address: int | None = None, *, baud: int | None = None,
                 on_event: EventCb | None = None):
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        if self.profile.kind != "rds_encoder" or self.profile.uecp is None:
            raise ValueError(f"profile {self.profile.name!r} is a {self.profile.kind} profile, "
                             "not an rds_encoder")
        u, t, to = self.profile.uecp, self.profile.transport, self.profile.timeouts
        assert t is not None
        self.site = u.site_address if site_address is None else site_address
        self.encoder = u.encoder_address if encoder_address is None else encoder_address
        uecp.encode_frame(b"", site=self.site, encoder=self.encoder)  # range check now, not later
        self.acks, self.repeat, self.gap_s = u.acks, u.repeat, u.repeat_gap_ms / 1000
        self.timeout_s, self.retries = to.command_timeout_s, to.retries
        self.on_event = on_event
        self.reachable: bool | None = None
        self._sqc = uecp.SqcCounter()
        self._rt_ab = False
        self._rt_last: str | None = None
        self.sent_frames = 0
        self._open(port_url, self.profile, uecp.UecpDecoder(), baud, on_frame=self._unsolicited)

    def _unsolicited(self, frame: uecp.Frame) -> None:
        log.debug("rds_unsolicited_frame", sqc=frame.sqc, elements=len(frame.elements))

    def _set_reachable(self, ok: bool, detail: str = "") -> None:
        if self.reachable is not ok:
            was, self.reachable = self.reachable, ok
            if was is not None or not ok:
                self._emit("reachable" if ok else "unreachable", {"detail": detail})

    # ---- sending ---------------------------------------------------------------------------
    async def send_element(self, element: uecp.Element, *, repeat: int | None = None) -> None:
        await self.send([element], repeat=repeat)

    async def send(self, elements: list[uecp.Element], *, repeat: int | None = None) -> None:
        """One frame holding `elements`; ACKed if the encoder ACKs, else sent `repeat` times."""
        try:
            if self.acks:
                await self._send_acked(elements)
            else:
                frame = uecp.encode_frame(elements, site=self.site, encoder=self.encoder)
                n = self.repeat if repeat is None else max(1, repeat)
                for i in range(n):
                    if i:
                        await asyncio.sleep(self.gap_s)
                    await self.transport.transact(frame, None)
                    self.sent_frames += 1
        except PortUnavailable as e:
            self._set_reachable(False, str(e))
            raise RdsUnreachable(str(e)) from None

    async def _send_acked(self, elements: list[uecp.Element]) -> None:
        sqc = self._sqc.next()
        frame = uecp.encode_frame(elements, site=self.site, encoder=self.encoder, sqc=sqc)

        def is_ack(f: uecp.Frame) -> bool:
            return any(isinstance(e, uecp.Ack) and (f.sqc == sqc or e.sqc == sqc) for e in f.elements)
        try:
            reply = await self.transport.transact(frame, is_ack, timeout=self.timeout_s,
                                                  retries=self.retries)
        except NoReply as e:
            self._set_reachable(False, str(e))
            raise RdsUnreachable(str(e)) from None
        self.sent_frames += 1
        self._set_reachable(True)
        ack = next(e for e in reply.elements if isinstance(e, uecp.Ack))
        if not ack.ok:
            raise RdsRejected(f"encoder rejected frame {sqc}: {ack.reason}")

    # ---- RDS features ----------------------------------------------------------------------
    async def set_pi(self, pi: int | str) -> None:
        await self.send([uecp.PI(int(pi, 16) if isinstance(pi, str) else int(pi))])

    async def set_ps(self, text: str) -> None:
        """Programme service name, up to 8 characters; Vietnamese is sent without diacritics."""
        await self.send([uecp.PS(uecp.to_rds_ascii(text))])

    async def set_pty(self, pty: int) -> None:
        await self.send([uecp.Pty(int(pty))])

    async def set_ta_tp(self, ta: bool, tp: bool) -> None:
        await self.send([uecp.TaTp(bool(ta), bool(tp))])

    async def set_rt(self, text: str) -> None:
        """RadioText up to 64 characters; a new text toggles A/B so receivers clear the old one."""
        text = uecp.to_rds_ascii(text)
        if text != self._rt_last:
            self._rt_ab, self._rt_last = not self._rt_ab, text
        await self.send([uecp.RadioText(text, ab=self._rt_ab)])

    async def send_data(self, payload: bytes, channel: int = 0, *, repeat: int | None = None) -> None:
        """Bytes on the transparent data channel (TDC) `channel` (0-31)."""
        await self.send([uecp.Tdc(channel, bytes(payload))], repeat=repeat)

    def frame_for(self, elements: list[uecp.Element]) -> bytes:
        """The exact bytes `send` puts on the wire without ACKs (test vectors, diagnostics)."""
        return uecp.encode_frame(elements, site=self.site, encoder=self.encoder)

"""FM transmitter driver: executes profile commands and polls profile points over serial.

It carries out what the controller decides (carrier, frequency, power, foldback) and
reports what it reads; it never decides policy.  Alarm conditions from the profile are
evaluated on a reading and handed back as data (`evaluate_alarms`); acting on them is the
controller's job (controller/transmitter_guard.py).

Reachability: a command or poll that gets no valid reply after the profile's retries
makes the transmitter `unreachable` (event once), the next valid reply makes it
`reachable` again.  Port events from the transport are passed through.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from device_drivers.profile_codec import AlarmState, DeviceError, ProfileCodec
from device_drivers.profiles import Profile, load_profile
from device_drivers.serial_port import NoReply, PortUnavailable, SerialDevice

log = structlog.get_logger(__name__)

EventCb = Callable[[str, dict[str, Any]], None]
__all__ = ["AlarmState", "DeviceError", "TransmitterDriver", "Unreachable"]


class Unreachable(ConnectionError):
    """The transmitter did not answer (after retries) or its port is gone."""


def _profile(p: Profile | str | Path) -> Profile:
    return p if isinstance(p, Profile) else load_profile(p)


class TransmitterDriver(SerialDevice):
    device_name = "transmitter"

    def __init__(self, port_url: str, profile: Profile | str | Path, baud: int | None = None, *,
                 on_event: EventCb | None = None):
        self.profile = _profile(profile)
        if self.profile.kind != "transmitter":
            raise ValueError(f"profile {self.profile.name!r} is a {self.profile.kind} profile, "
                             "not a transmitter")
        self.codec = ProfileCodec(self.profile)
        t = self.profile.transport
        assert t is not None
        self.on_event = on_event
        self.reachable: bool | None = None  # None until the first exchange
        self.last_error: str | None = None
        self.stats = {"commands": 0, "polls": 0, "no_reply": 0, "device_errors": 0,
                      "parse_errors": 0}
        self._open(port_url, self.profile, t.decoder(), baud, on_port_event=self._port_event)

    @property
    def port_open(self) -> bool:
        return self.transport.connected

    # ---- events ----------------------------------------------------------------------------
    def _port_event(self, kind: str, details: dict[str, Any]) -> None:
        self._emit(kind, details)
        if kind == "port_lost":
            self._set_reachable(False, f"port lost: {details.get('error', '')}")

    def _set_reachable(self, ok: bool, detail: str | None = None) -> None:
        if ok:
            self.last_error = None
        else:
            self.last_error = detail
        if self.reachable is ok:
            return
        first = self.reachable is None
        self.reachable = ok
        if ok and first:
            return  # the first good answer is not news
        log.log(20 if ok else 30, "transmitter_reachable" if ok else "transmitter_unreachable",
                detail=detail)
        self._emit("reachable" if ok else "unreachable", {"detail": detail} if detail else {})

    # ---- commands ------------------------------------------------------------------------
    async def command(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Run a profile command; ValueError for bad arguments (nothing sent), DeviceError
        when the transmitter refuses, Unreachable when it does not answer."""
        wire_args = self.codec.command_args(name, *args, **kwargs)
        payload = self.profile.commands[name].send.format(**wire_args).encode(self.codec.encoding)
        spec, to = self.profile.commands[name], self.profile.timeouts
        self.stats["commands"] += 1
        frame = await self._transact(payload, self.codec.reply_matcher(name, wire_args),
                                     spec.timeout_s or to.command_timeout_s,
                                     to.retries if spec.retries is None else spec.retries)
        if frame is not None:
            try:
                self.codec.check_reply(name, frame)
            except DeviceError as e:
                self.stats["device_errors"] += 1
                log.warning("transmitter_refused", command=name, reply=e.reply, meaning=e.meaning)
                raise

    async def _transact(self, payload: bytes, match: Callable | None, timeout: float,
                        retries: int) -> Any:
        wire = self.transport.decoder.encode(payload)  # type: ignore[attr-defined]
        try:
            frame = await self.transport.transact(wire, match, timeout=timeout, retries=retries)
        except NoReply as e:
            self.stats["no_reply"] += 1
            self._set_reachable(False, str(e))
            raise Unreachable(str(e)) from None
        except PortUnavailable as e:
            self._set_reachable(False, str(e))
            raise Unreachable(str(e)) from None
        if match is not None:
            self._set_reachable(True)
        return frame

    async def set_carrier(self, on: bool) -> None:
        await self.command("set_carrier", bool(on))

    async def set_frequency(self, mhz: float) -> None:
        await self.command("set_frequency", mhz)

    async def set_power(self, w: float) -> None:
        await self.command("set_power", w)

    # ---- telemetry -------------------------------------------------------------------------
    async def read(self, poll_class: str = "all") -> dict[str, Any]:
        """Point values of one poll class ('fast', 'slow', 'static' or 'all'), scaled per the
        profile, plus `reachable` (and `detail` when not).  A point whose reply did not parse
        is left out (counted in stats); an unanswered query makes the reading unreachable."""
        out: dict[str, Any] = {}
        to = self.profile.timeouts
        self.stats["polls"] += 1
        for query in self.codec.queries(poll_class):
            try:
                frame = await self._transact(query.encode(self.codec.encoding),
                                             self.codec.query_matcher(query),
                                             to.command_timeout_s, to.retries)
            except Unreachable as e:
                return {**out, "reachable": False, "detail": str(e)}
            text = self.codec._text(frame)
            if text in self.profile.errors:
                self.stats["device_errors"] += 1
                log.warning("transmitter_query_refused", query=query, reply=text)
                continue
            values, problems = self.codec.parse_points(query, frame)
            if problems:
                self.stats["parse_errors"] += len(problems)
                log.warning("transmitter_reply_unparsed", query=query, problems=problems)
            out.update({n: v for n, v in values.items()
                        if poll_class == "all" or self.profile.points[n].poll == poll_class})
        out["reachable"] = True
        return out

    def evaluate_alarms(self, readings: dict[str, Any]) -> list[AlarmState]:
        """The profile's alarm conditions on a reading: [(code, severity, active, detail)]."""
        return self.codec.evaluate_alarms(readings)

    def alarm_action(self, code: str) -> dict[str, Any] | None:
        """The protective action the profile recommends for an alarm code (data only)."""
        for a in self.profile.alarms:
            if a.code == code and a.action is not None:
                return a.action.model_dump(exclude_none=True)
        return None


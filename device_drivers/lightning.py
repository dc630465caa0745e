"""Lightning sensor driver: event lines from the sensor's serial bridge, per its profile.

The sensor only ever pushes; the driver turns `strike` lines into `Strike` records for
the controller's storm log (fault diagnosis blames lightning for damage that follows a
nearby storm).  Disturber/noise lines are counted and passed on as events; lines that
match no event are counted as unparsed (line noise, or a bridge with other firmware).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from device_drivers.profile_codec import ProfileCodec
from device_drivers.profiles import Profile, load_profile
from device_drivers.serial_port import SerialDevice

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Strike:
    ts: float                 # wall-clock time the line arrived (epoch seconds)
    distance_km: float | None  # None: the sensor saw it but cannot estimate (out of range)
    energy: int | None


class LightningSensorDriver(SerialDevice):
    device_name = "lightning"

    def __init__(self, port_url: str, profile: Profile | str | Path,
                 on_strike: Callable[[Strike], None], *, baud: int | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        if self.profile.kind != "lightning_sensor":
            raise ValueError(f"profile {self.profile.name!r} is a {self.profile.kind} profile, "
                             "not a lightning_sensor")
        self.codec = ProfileCodec(self.profile)
        self.on_strike, self.on_event, self.clock = on_strike, on_event, clock
        self.counts: dict[str, int] = {name: 0 for name in self.profile.events} | {"unparsed": 0}
        t = self.profile.transport
        assert t is not None
        self._open(port_url, self.profile, t.decoder(), baud, on_frame=self._on_line)

    def _on_line(self, line: bytes) -> None:
        try:
            parsed = self.codec.parse_event(line)
        except ValueError as e:
            parsed = None
            log.warning("lightning_line_bad_value", line=line[:80], error=str(e))
        if parsed is None:
            self.counts["unparsed"] += 1
            if self.counts["unparsed"] in (1, 10, 100) or self.counts["unparsed"] % 1000 == 0:
                log.warning("lightning_line_unparsed", line=line[:80], total=self.counts["unparsed"])
            return
        name, fields = parsed
        self.counts[name] += 1
        if name == "strike":
            energy = fields.get("energy")
            s = Strike(self.clock(), fields.get("distance_km"),
                       int(energy) if energy is not None else None)
            log.info("lightning_strike", distance_km=s.distance_km, energy=s.energy)
            try:
                self.on_strike(s)
            except Exception:
                log.exception("lightning_on_strike_failed")
        else:
            self._emit(name, fields)

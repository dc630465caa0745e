"""Lightning strikes grouped into storms, for correlating losses and faults with weather.

A storm is a run of strikes no more than `gap_s` apart; its id is also the incident id
of the alarms it explains, so one storm gives one incident however many clusters it
hits. The sensor (AS3935 class) reports distance to the storm front, not bearing, so
"near" means near the gateway: a commune is about the size of the default radius.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from controller.observations import Strike


def local_hm(ts: float, tz: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ts, tz).strftime("%H:%M")


def local_hms(ts: float, tz: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")


@dataclass
class Storm:
    id: str
    start: float
    end: float
    strikes: list[Strike]


class StormLog:
    """Recent storms in memory only (lost on restart; alarms keep what they concluded)."""

    def __init__(self, *, gap_s: float, retention_s: float, distance_km: float,
                 tz: ZoneInfo) -> None:
        self.gap_s, self.retention_s, self.distance_km, self.tz = gap_s, retention_s, \
            distance_km, tz
        self.storms: list[Storm] = []

    def add(self, s: Strike) -> None:
        keep = s.ts - self.retention_s
        self.storms = [st for st in self.storms if st.end >= keep]
        last = self.storms[-1] if self.storms else None
        if last and s.ts - last.end <= self.gap_s and s.ts >= last.start:
            last.strikes.append(s)
            last.end = max(last.end, s.ts)
        else:
            self.storms.append(Storm(f"inc-storm-{int(s.ts)}", s.ts, s.ts, [s]))

    def near(self, lo: float, hi: float) -> tuple[list[Strike], str | None]:
        """Strikes within `distance_km` between lo and hi, and the id of their storm."""
        out: list[Strike] = []
        sid = None
        for st in self.storms:
            if st.end < lo or st.start > hi:
                continue
            hits = [s for s in st.strikes if lo <= s.ts <= hi and s.distance_km <= self.distance_km]
            if hits and sid is None:
                sid = st.id
            out += hits
        return out, sid

    def text(self, strikes: list[Strike]) -> str:
        """Evidence line, e.g. 'storm: 6 strikes within 8 km, 14:02-14:09' (site time)."""
        n, far = len(strikes), math.ceil(max(s.distance_km for s in strikes))
        t0 = local_hm(min(s.ts for s in strikes), self.tz)
        t1 = local_hm(max(s.ts for s in strikes), self.tz)
        when = t0 if t0 == t1 else f"{t0}-{t1}"
        return f"storm: {n} strike{'s' if n > 1 else ''} within {far} km, {when}"

"""What the central operator sees: each cluster's state and the site's health snapshot.

Telemetry lives here in memory (the SD card is precious); only changes leave the
gateway, as retained `clusters/{id}/state` and `health` messages, rate-limited by
the uplink. FM clusters without a return channel are `unmonitored`, never offline.
"""
from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Any

from controller.config import SiteConfig
from controller.contract import rfc3339


class ClusterView:
    __slots__ = ("cfg", "online", "last_seen", "playing", "volume", "rssi_dbm", "telemetry", "faults")

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.online: bool | None = None  # None: never heard from
        self.last_seen: float | None = None
        self.playing: str | None = None
        self.volume: int | None = None
        self.rssi_dbm: float | None = None
        self.telemetry: dict[str, Any] = {}
        self.faults: list[str] = []

    @property
    def monitored(self) -> bool:
        return self.cfg.kind == "ip" or bool(self.cfg.monitored)

    def availability(self) -> str:
        if not self.cfg.enabled:
            return "disabled"
        if not self.monitored:
            return "unmonitored"
        return "online" if self.online else "offline"

    def days_left(self, today: dt.date) -> int | None:
        sub = self.cfg.subscription
        exp = (sub.expires_on if sub else None) or self.telemetry.get("sim_expires_on")
        if isinstance(exp, str):
            try:
                exp = dt.date.fromisoformat(exp)
            except ValueError:
                return None
        return (exp - today).days if exp else None

    def state(self, tz) -> dict:
        c = self.cfg
        today = dt.datetime.now(tz).date()
        sub = None
        if c.kind == "ip":
            exp = (c.subscription.expires_on if c.subscription else None) or self.telemetry.get("sim_expires_on")
            sub = {"expires_on": str(exp) if exp else None, "days_left": self.days_left(today)}
        return {
            "id": c.id, "kind": c.kind, "zone": c.zone, "lat": c.lat, "lon": c.lon,
            "availability": self.availability(),
            "last_seen": rfc3339(dt.datetime.fromtimestamp(self.last_seen, dt.UTC)) if self.last_seen else None,
            "playing": self.playing, "volume": self.volume, "rssi_dbm": self.rssi_dbm,
            "subscription": sub, "faults": sorted(set(self.faults)),
        }


class SiteState:
    def __init__(self, cfg: SiteConfig) -> None:
        self.started = time.monotonic()
        self.clusters: dict[str, ClusterView] = {}
        self.transmitter: dict[str, Any] = {"reachable": False}
        self.reload(cfg)

    def reload(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        from zoneinfo import ZoneInfo

        self.tz = ZoneInfo(cfg.site.timezone)
        old = self.clusters
        self.clusters = {}
        for c in cfg.clusters:
            v = old.get(c.id) or ClusterView(c)
            v.cfg = c
            self.clusters[c.id] = v

    def counts(self) -> dict:
        av = [v.availability() for v in self.clusters.values()]
        return {
            "clusters_total": len(av), "online": av.count("online"), "offline": av.count("offline"),
            "unmonitored": av.count("unmonitored"),
            "faulty": sum(1 for v in self.clusters.values() if v.faults),
        }

    def health(self, *, clock_synced: bool, outbox_depth: int, outbox_dropped: int) -> dict:
        return {
            "ts": rfc3339(),
            "gateway": {
                "uptime_s": round(time.monotonic() - self.started, 1),
                "cpu_temp_c": cpu_temp_c(),
                "disk_free_mb": disk_free_mb(self.cfg.storage.state_dir),
                "clock_synced": clock_synced, "outbox_depth": outbox_depth,
                "outbox_dropped": outbox_dropped,
            },
            "transmitter": {k: self.transmitter.get(k) for k in (
                "reachable", "on_air", "frequency_mhz", "forward_w", "reflected_w", "vswr",
                "temperature_c", "pll_locked")} | {"reachable": bool(self.transmitter.get("reachable"))},
            "counts": self.counts(),
        }


def cpu_temp_c() -> float | None:
    p = Path("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(p.read_text().strip()) / 1000, 1)
    except (OSError, ValueError):
        return None


def disk_free_mb(path: Path) -> float | None:
    try:
        return round(shutil.disk_usage(path).free / 1e6, 1)
    except OSError:
        return None

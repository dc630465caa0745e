"""What the daemon tells the diagnoser: small immutable facts, each stamped with wall time.

Drivers and the health monitor translate device-specific messages into these, so
diagnosis never sees a byte format and can be driven by a test with a fake clock.
All fields are keyword-only (``ClusterOnline(cluster_id="ip01", ts=t)``): the order of
fields is not part of the interface. Bad values raise ``ValueError`` at construction,
so a malformed report is rejected at the edge instead of confusing a later rule.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from controller.contract import CLUSTER_CAUSES as CAUSES

SIM_STATUSES = ("ok", "expired", "no_registration", "absent")
NOTE_STATUSES = ("damaged", "repaired", "note")

# Normalised telemetry fields and their types; drivers map firmware names onto these.
TELEMETRY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "amplifier_ok": bool,
    "line_impedance_ohm": (int, float),
    "surge_protector_ok": bool,
    "mains_ok": bool,
    "battery_v": (int, float),
    "sim_status": str,
    "sim_expires_on": (str, dt.date),
    "rssi_dbm": (int, float),
}


def _check_ts(ts: Any) -> None:
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"ts must be wall-clock seconds (got {ts!r})")


def _check_id(cluster_id: Any) -> None:
    if not isinstance(cluster_id, str) or not cluster_id:
        raise ValueError(f"cluster_id must be a non-empty string (got {cluster_id!r})")


@dataclass(frozen=True, kw_only=True)
class ClusterOnline:
    """The cluster said it is alive (birth message, heartbeat, 'online' status)."""

    cluster_id: str
    ts: float

    def __post_init__(self) -> None:
        _check_id(self.cluster_id)
        _check_ts(self.ts)


@dataclass(frozen=True, kw_only=True)
class ClusterOffline:
    """The cluster is gone. ``clean``: it said goodbye itself (orderly 'offline');
    False: the broker's last will or a lost session (it could not say goodbye)."""

    cluster_id: str
    ts: float
    clean: bool = False

    def __post_init__(self) -> None:
        _check_id(self.cluster_id)
        _check_ts(self.ts)
        if not isinstance(self.clean, bool):
            raise ValueError(f"clean must be true or false (got {self.clean!r})")


@dataclass(frozen=True, kw_only=True)
class ClusterTelemetry:
    """Normalised readings (see TELEMETRY_FIELDS); unknown keys are kept but ignored.
    Receiving telemetry also proves the cluster is alive."""

    cluster_id: str
    ts: float
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.cluster_id)
        _check_ts(self.ts)
        if not isinstance(self.fields, Mapping):
            raise ValueError(f"fields must be a mapping (got {type(self.fields).__name__})")
        clean = dict(self.fields)
        for key, want in TELEMETRY_FIELDS.items():
            if key not in clean or clean[key] is None:
                continue
            v = clean[key]
            if want is not bool and isinstance(v, bool):
                raise ValueError(f"telemetry {key}: expected a number (got {v!r})")
            if not isinstance(v, want):
                raise ValueError(f"telemetry {key}: wrong type (got {v!r})")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"telemetry {key}: not a finite number (got {v!r})")
        if clean.get("sim_status") is not None and clean["sim_status"] not in SIM_STATUSES:
            raise ValueError(f"telemetry sim_status: got {clean['sim_status']!r}; "
                             f"allowed {', '.join(SIM_STATUSES)}")
        exp = clean.get("sim_expires_on")
        if isinstance(exp, str):
            try:
                clean["sim_expires_on"] = dt.date.fromisoformat(exp)
            except ValueError:
                raise ValueError(f"telemetry sim_expires_on: not a YYYY-MM-DD date "
                                 f"(got {exp!r})") from None
        object.__setattr__(self, "fields", MappingProxyType(clean))


@dataclass(frozen=True, kw_only=True)
class Strike:
    """One lightning strike reported by the gateway's sensor (distance to the storm
    front from the sensor; AS3935-class sensors give no bearing)."""

    ts: float
    distance_km: float
    energy: float = 0.0

    def __post_init__(self) -> None:
        _check_ts(self.ts)
        d = self.distance_km
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1000:
            raise ValueError(f"distance_km must be a number 0..1000 (got {d!r})")


@dataclass(frozen=True, kw_only=True)
class TransmitterReading:
    """Transmitter telemetry: any of reachable, on_air, vswr, forward_w, reflected_w,
    temperature_c, pll_locked, detail (a short text, e.g. the serial port)."""

    ts: float
    values: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_ts(self.ts)
        if not isinstance(self.values, Mapping):
            raise ValueError("values must be a mapping")
        for key in ("vswr", "forward_w", "reflected_w", "temperature_c"):
            v = self.values.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not math.isfinite(v)):
                raise ValueError(f"transmitter {key}: expected a finite number (got {v!r})")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


@dataclass(frozen=True, kw_only=True)
class MaintenanceNote:
    """A technician's field note (`loaxa cluster note ...`)."""

    cluster_id: str
    ts: float
    status: str
    cause: str | None = None
    text: str = ""
    by: str = ""

    def __post_init__(self) -> None:
        _check_id(self.cluster_id)
        _check_ts(self.ts)
        if self.status not in NOTE_STATUSES:
            raise ValueError(f"status: got {self.status!r}; allowed {', '.join(NOTE_STATUSES)}")
        if self.cause is not None and self.cause not in CAUSES:
            raise ValueError(f"cause: got {self.cause!r}; allowed {', '.join(CAUSES)}")


@dataclass(frozen=True, kw_only=True)
class Tick:
    """Time passes: heartbeat timeouts, date-based subscription checks, hysteresis timers.
    ``clock_synced`` False suspends date-based rules (a Pi without RTC boots in 1970)."""

    ts: float
    clock_synced: bool = True

    def __post_init__(self) -> None:
        _check_ts(self.ts)


Observation = (ClusterOnline | ClusterOffline | ClusterTelemetry | Strike | TransmitterReading
               | MaintenanceNote | Tick)

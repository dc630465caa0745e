"""The `mqtt:` section of an ip_cluster firmware profile, and the template engine both the
driver and the simulator use, so that one YAML description drives both ends of the wire.

Templates: a payload template is either a string (sent as text) or a JSON-like mapping
(sent as compact JSON).  Inside templates `{name}` is a placeholder; a string that is exactly
one placeholder is replaced by the typed value (so `volume: "{volume}"` becomes a JSON number).
The same template is *matched* against incoming payloads: constants must be equal, placeholders
capture.  Known placeholders: url, volume, id, error, device_id, prefix.

Telemetry field maps go the other way: dotted JSON path -> normalised field, with
`value = raw * scale + offset`, optional enum mapping of raw values, and a type.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Template = str | dict[str, Any]

PLACEHOLDER_TYPES: dict[str, type] = {
    "url": str, "volume": int, "id": str, "error": str, "device_id": str, "prefix": str,
}

# Normalised telemetry: field -> python type after mapping.  `online` comes from the LWT only.
NORMALISED_FIELDS: dict[str, str] = {
    "playing": "bool", "playing_url": "str", "playing_id": "str", "volume": "int",
    "rssi_dbm": "int", "amplifier_ok": "bool", "line_impedance_ohm": "float",
    "surge_protector_ok": "bool", "mains_ok": "bool", "battery_v": "float",
    "sim_status": "str", "sim_expires_on": "date", "balance_vnd": "int", "uptime_s": "int",
}
SIM_STATUSES = ("ok", "expired", "no_registration", "absent")

_PH = re.compile(r"\{([a-z_]+)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommandSpec(_Strict):
    """One command: where it goes, what it looks like, and the replies the device sends."""
    topic: str
    payload: Template
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    replies: dict[Literal["ok", "error"], Template] = Field(default_factory=dict)


class LivenessSpec(_Strict):
    topic: str
    online: str
    offline: str
    retain: bool = True
    qos: Literal[0, 1, 2] = 1


class FieldMap(_Strict):
    """Where a normalised field lives in a telemetry payload and how to convert it."""
    path: str = Field(description="dotted path into the JSON object, e.g. SIM.Expiry")
    type: Literal["bool", "int", "float", "str", "date"]
    scale: float = 1.0
    offset: float = 0.0
    raw_type: Literal["bool", "int", "float", "str"] | None = Field(
        None, description="type on the wire when it differs from `type` (used by simulators)")
    enum: dict[str, Any] | None = Field(
        None, description="raw value (as text; booleans as true/false) -> normalised value")


class TelemetrySpec(_Strict):
    topic: str
    qos: Literal[0, 1, 2] = 0
    retain: bool = False
    fields: dict[str, FieldMap]

    @model_validator(mode="after")
    def _known_fields(self) -> TelemetrySpec:
        for name, fm in self.fields.items():
            if name not in NORMALISED_FIELDS:
                raise ValueError(f"unknown normalised field {name!r}; allowed "
                                 f"{', '.join(sorted(NORMALISED_FIELDS))}")
            want = NORMALISED_FIELDS[name]
            if fm.type != want:
                raise ValueError(f"field {name!r} must have type {want} (got {fm.type})")
            if name == "sim_status":
                bad = [v for v in (fm.enum or {}).values() if v not in SIM_STATUSES]
                if bad or fm.enum is None:
                    raise ValueError(f"sim_status needs an enum onto {SIM_STATUSES} (got {bad})")
        return self


class IpMqttSpec(_Strict):
    """Everything that differs between IP cluster firmwares, declared rather than coded."""
    prefix: str = "loa"
    ack_topic: str
    liveness: LivenessSpec
    commands: dict[Literal["play", "stop", "volume"], CommandSpec]
    telemetry: list[TelemetrySpec]
    ack_timeout_s: float = 10.0

    @model_validator(mode="after")
    def _placeholders(self) -> IpMqttSpec:
        missing = {"play", "stop", "volume"} - set(self.commands)
        if missing:
            raise ValueError(f"commands missing: {', '.join(sorted(missing))}")
        for name, cmd in self.commands.items():
            for t in [cmd.topic, cmd.payload, *cmd.replies.values()]:
                for ph in placeholders(t):
                    if ph not in PLACEHOLDER_TYPES:
                        raise ValueError(f"commands.{name}: unknown placeholder {{{ph}}}; "
                                         f"allowed {', '.join(PLACEHOLDER_TYPES)}")
        if "url" not in placeholders(self.commands["play"].payload):
            raise ValueError("commands.play.payload must contain {url}")
        return self

    def topic(self, template: str, device_id: str) -> str:
        return template.format(prefix=self.prefix, device_id=device_id)


# ---- template engine -------------------------------------------------------------------

def placeholders(t: Any) -> set[str]:
    if isinstance(t, str):
        return set(_PH.findall(t))
    if isinstance(t, dict):
        return set().union(*(placeholders(v) for v in t.values())) if t else set()
    if isinstance(t, list):
        return set().union(*(placeholders(v) for v in t)) if t else set()
    return set()


def _fill(t: Any, values: dict[str, Any]) -> Any:
    if isinstance(t, str):
        m = _PH.fullmatch(t)
        if m:
            return values.get(m.group(1))
        return _PH.sub(lambda m: str(values.get(m.group(1), "")), t)
    if isinstance(t, dict):
        return {k: _fill(v, values) for k, v in t.items()}
    if isinstance(t, list):
        return [_fill(v, values) for v in t]
    return t


def render(t: Template, values: dict[str, Any]) -> bytes:
    """Template -> wire bytes (text for string templates, compact JSON for mappings)."""
    if isinstance(t, str):
        return str(_fill(t, values)).encode()
    return json.dumps(_fill(t, values), separators=(",", ":"), ensure_ascii=False).encode()


def _conv(name: str, value: Any) -> Any:
    typ = PLACEHOLDER_TYPES.get(name, str)
    if typ is int:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    return value if isinstance(value, str) else str(value)


def _match_obj(t: Any, obj: Any, out: dict[str, Any]) -> bool:
    if isinstance(t, str):
        m = _PH.fullmatch(t)
        if m:
            try:
                out[m.group(1)] = _conv(m.group(1), obj)
            except (TypeError, ValueError, OverflowError):
                return False
            return True
        if _PH.search(t):
            return isinstance(obj, str) and _match_text(t, obj, out)
        return obj == t
    if isinstance(t, dict):
        return isinstance(obj, dict) and all(k in obj and _match_obj(v, obj[k], out)
                                             for k, v in t.items())
    return obj == t


def _match_text(t: str, text: str, out: dict[str, Any]) -> bool:
    pattern, pos = "", 0
    for m in _PH.finditer(t):
        pattern += re.escape(t[pos:m.start()]) + f"(?P<{m.group(1)}>.*?)"
        pos = m.end()
    m = re.fullmatch(pattern + re.escape(t[pos:]), text, re.S)
    if not m:
        return False
    try:
        out.update({k: _conv(k, v) for k, v in m.groupdict().items()})
    except ValueError:
        return False
    return True


def match(t: Template, payload: bytes) -> dict[str, Any] | None:
    """Wire bytes matched against a template: captured placeholder values, or None."""
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return None
    out: dict[str, Any] = {}
    if isinstance(t, str):
        return out if _match_text(t, text.strip(), out) else None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return out if _match_obj(t, obj, out) else None


# ---- telemetry field maps --------------------------------------------------------------

def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def set_path(obj: dict, path: str, value: Any) -> None:
    *heads, last = path.split(".")
    for part in heads:
        obj = obj.setdefault(part, {})
    obj[last] = value


def _raw_key(raw: Any) -> str:
    return ("true" if raw else "false") if isinstance(raw, bool) else str(raw)


def decode_field(fm: FieldMap, raw: Any) -> Any:
    """Raw wire value -> normalised value; raises ValueError/TypeError on nonsense."""
    if fm.enum is not None:
        key = _raw_key(raw)
        if key not in fm.enum:
            raise ValueError(f"{fm.path}: {raw!r} not one of {list(fm.enum)}")
        return fm.enum[key]
    if fm.type == "bool":
        if not isinstance(raw, bool):
            raise TypeError(f"{fm.path}: expected boolean, got {raw!r}")
        return raw
    if fm.type == "str":
        if not isinstance(raw, str):
            raise TypeError(f"{fm.path}: expected text, got {raw!r}")
        return raw
    if fm.type == "date":
        return dt.date.fromisoformat(str(raw))
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise TypeError(f"{fm.path}: expected number, got {raw!r}")
    v = raw * fm.scale + fm.offset
    if not math.isfinite(v):  # JSON from the device may say 1e999 or NaN; central must not see it
        raise ValueError(f"{fm.path}: {raw!r} is not a finite number")
    return round(v) if fm.type == "int" else round(v, 4)


def encode_field(fm: FieldMap, value: Any) -> Any:
    """Normalised value -> raw wire value (the simulator's direction)."""
    if fm.enum is not None:
        for k, v in fm.enum.items():
            if v == value:
                rt = fm.raw_type or "str"
                return {"true": True, "false": False}.get(k) if rt == "bool" else (
                    int(k) if rt == "int" else k)
        raise ValueError(f"{fm.path}: no raw value maps to {value!r}")
    if fm.type == "date":
        return value.isoformat() if isinstance(value, dt.date) else str(value)
    if fm.type in ("bool", "str"):
        return value
    raw = (value - fm.offset) / fm.scale
    return round(raw) if (fm.raw_type or fm.type) == "int" else round(raw, 4)

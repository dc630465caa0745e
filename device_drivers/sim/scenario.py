"""The scenario file (simulation.md): what happens to a simulated site, and when.

A scenario is written by people (testers, trainers, the demo), so it gets the same
treatment as a site file: every problem reported with FILE:LINE, unknown keys with a
"did you mean", and every cluster or zone id checked against the site it runs on.
Durations are written like `5s`, `2m`, `1.5s`, `500ms`, `1h` (a bare number = seconds).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from controller.yamlsrc import YamlError, dotted, line_for, load_model, load_yaml

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|sec|m|min|h)?\s*$")
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(v: Any) -> float:
    """'5s' / '2m' / '1.5s' / '500ms' / '1h' / 12 -> seconds (float)."""
    if isinstance(v, bool):
        raise ValueError("a duration looks like 5s, 2m, 1.5s or 500ms")
    if isinstance(v, int | float):
        if v < 0:
            raise ValueError("a duration cannot be negative")
        return float(v)
    if isinstance(v, str):
        m = _DUR.match(v)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError("a duration looks like 5s, 2m, 1.5s or 500ms")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Damage = Literal["surge_protector_tripped", "dead", "amplifier_fault", "speaker_line_fault"]
DAMAGE_KINDS: tuple[str, ...] = Damage.__args__  # type: ignore[attr-defined]


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TimingOverrides(_S):
    """Shorter timers so faults show up within a short scenario (site `timing:` keys + _s)."""
    heartbeat_timeout: Duration | None = None
    health_interval: Duration | None = None
    poll_fast: Duration | None = None
    poll_slow: Duration | None = None

    def site_keys(self) -> dict[str, float]:
        return {f"{k}_s": v for k, v in self.model_dump(exclude_none=True).items()}


class Lightning(_S):
    strikes: int = Field(0, ge=0, le=1000, description="strikes the gateway's sensor sees, if fitted")
    distance_km: float = Field(5.0, ge=0, le=100)
    near: list[str] = Field(default_factory=list, description="cluster or zone ids near the storm")
    damage: dict[str, list[Damage]] = Field(default_factory=dict, description="cluster id -> damage")


class ClusterRef(_S):
    cluster: str


class PowerCut(_S):
    clusters: list[str] = Field(min_length=1, description="cluster or zone ids on the cut feeder")
    duration: Duration


class LinkCut(_S):
    cluster: str
    duration: Duration


class TransmitterFault(_S):
    vswr: float | None = Field(None, ge=1.0, le=100)
    temperature_c: float | None = Field(None, ge=-40, le=200)
    pll_locked: bool | None = None
    unplugged: Duration | None = Field(None, description="the serial cable is out for this long")
    garbage: int | None = Field(None, ge=1, le=100000, description="bytes of line noise")

    @model_validator(mode="after")
    def _some(self) -> TransmitterFault:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one of vswr, temperature_c, pll_locked, unplugged, garbage")
        return self


class BrokerOutage(_S):
    duration: Duration


class Command(_S):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
    args: dict[str, Any] = Field(default_factory=dict)
    signed: Literal[True, False, "forged", "replay"] = True
    request_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="fixed request id (default: a fresh uuid)")
    replay_of: str | None = Field(None, description='with signed: "replay", the request_id to '
                                                    "resend (default: the latest signed command)")
    issued_ago: Duration = Field(0.0, description="backdate issued_at (a stale command)")


_JUMP = re.compile(r"^\s*([+-])\s*(.+)$")


def parse_jump(v: Any) -> float:
    """'+3h' / '-2h' / '+30m' / '+90s' -> signed seconds (the sign is required)."""
    m = _JUMP.match(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError('a clock jump is a signed duration like "+3h", "-2h" or "+30m"')
    try:
        s = parse_duration(m.group(2))
    except ValueError:
        raise ValueError('a clock jump is a signed duration like "+3h", "-2h" or "+30m"') from None
    if s == 0:
        raise ValueError("a clock jump of zero does nothing")
    return -s if m.group(1) == "-" else s


class ClockChange(_S):
    """The gateway's clock: NTP synchronisation lost/regained (the flag the daemon checks),
    or a step of the daemon's own wall clock (libfaketime; the machine's clock is untouched)."""
    synced: bool | None = Field(None, description="false: the clock is no longer synchronised")
    jump: Annotated[float, BeforeValidator(parse_jump)] | None = Field(
        None, description='step the daemon\'s wall clock: "+3h", "-2h", "+30m"')

    @model_validator(mode="after")
    def _one(self) -> ClockChange:
        if (self.synced is None) == (self.jump is None):
            raise ValueError("give exactly one of synced, jump")
        return self


class GatewayRestart(_S):
    hard: bool = Field(False, description="true: kill -9; false: SIGTERM and a clean stop")
    down: Duration = Field(0.0, description="how long the gateway stays down before it starts again")


EVENT_KINDS = ("lightning", "subscription_expired", "power_cut", "link_cut", "transmitter",
               "broker_outage", "command", "gateway_restart", "clock")


class Event(_S):
    at: Duration
    lightning: Lightning | None = None
    subscription_expired: ClusterRef | None = None
    power_cut: PowerCut | None = None
    link_cut: LinkCut | None = None
    transmitter: TransmitterFault | None = None
    broker_outage: BrokerOutage | None = None
    command: Command | None = None
    gateway_restart: GatewayRestart | None = None
    clock: ClockChange | None = None
    note: str | None = Field(None, description="free text shown in the record and the demo")

    @model_validator(mode="after")
    def _one(self) -> Event:
        given = [k for k in EVENT_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"an event needs exactly one of {', '.join(EVENT_KINDS)} "
                             f"(got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in EVENT_KINDS if getattr(self, k) is not None)

    @property
    def body(self) -> Any:
        return getattr(self, self.kind)

    def as_record(self) -> dict[str, Any]:
        """The event as it goes into the record: {at, <kind>: {...}, note?}."""
        out: dict[str, Any] = {"at": self.at,
                               self.kind: self.body.model_dump(mode="json", exclude_none=True)}
        if self.note:
            out["note"] = self.note
        return out


class Scenario(_S):
    duration: Duration = Field(description="wall-clock length of the run")
    title: str | None = None
    description: str | None = None
    timing: TimingOverrides = TimingOverrides()
    events: list[Event] = Field(default_factory=list)

    # filled by load_scenario: events in time order with their index in the file
    source_path: Path | None = Field(None, exclude=True)

    def ordered(self) -> list[tuple[int, Event]]:
        return sorted(enumerate(self.events), key=lambda ie: (ie[1].at, ie[0]))

    @property
    def jumps_clock(self) -> bool:
        """The daemon must run under libfaketime (only then: it is a preload into the daemon)."""
        return any(e.clock is not None and e.clock.jump is not None for e in self.events)


def resolve_scenario(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped scenario (`smoke`, `demo-day`)."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        return p
    return SCENARIO_DIR / f"{name_or_path}.yaml"


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(path: str | Path, site: Any | None = None) -> Scenario:
    """Load and check a scenario; with `site` (a SiteConfig) every id is checked against it.
    Raises YamlError listing every problem as FILE:LINE: path: message."""
    path = Path(path)
    sc = load_model(path, Scenario)
    _, lines = load_yaml(path)
    errs = cross_check(sc, site)
    if errs:
        raise YamlError([f"{path}:{line_for(lines, loc)}: {dotted(loc)}: {m}" for loc, m in errs])
    sc.source_path = path
    return sc


def cross_check(sc: Scenario, site: Any | None) -> list[tuple[tuple, str]]:
    errs: list[tuple[tuple, str]] = []
    for i, ev in enumerate(sc.events):
        if ev.at >= sc.duration:
            errs.append((("events", i, "at"), f"at {ev.at:g}s is not before the end of the "
                                              f"scenario (duration {sc.duration:g}s)"))
    _check_replays(sc, errs)
    if site is None:
        return errs
    clusters = {c.id: c for c in site.clusters}
    zones = [z.id for z in site.zones]
    cl_ids = list(clusters)

    def ref(loc: tuple, value: str, *, zones_ok: bool, kind: str | None = None) -> None:
        if value in clusters:
            if kind and clusters[value].kind != kind:
                errs.append((loc, f"{value} is an {clusters[value].kind.upper()} cluster; this "
                                  f"event needs an {kind.upper()} cluster "
                                  f"({_why.get(kind, '')})"))
            return
        if zones_ok and value in zones:
            return
        known = cl_ids + (zones if zones_ok else [])
        what = "cluster or zone" if zones_ok else "cluster"
        errs.append((loc, _ref_msg(value, known, what)))

    for i, ev in enumerate(sc.events):
        base: tuple = ("events", i, ev.kind)
        b = ev.body
        if ev.kind == "lightning":
            for j, n in enumerate(b.near):
                ref((*base, "near", j), n, zones_ok=True)
            for cid in b.damage:
                ref((*base, "damage", cid), cid, zones_ok=False)
        elif ev.kind == "subscription_expired":
            ref((*base, "cluster"), b.cluster, zones_ok=False, kind="ip")
        elif ev.kind == "power_cut":
            for j, c in enumerate(b.clusters):
                ref((*base, "clusters", j), c, zones_ok=True)
        elif ev.kind == "link_cut":
            ref((*base, "cluster"), b.cluster, zones_ok=False, kind="ip")
        elif ev.kind == "command":
            targets = b.args.get("targets")
            if isinstance(targets, list):
                for j, t in enumerate(targets):
                    if isinstance(t, str):
                        ref((*base, "args", "targets", j), t, zones_ok=True)
            cid = b.args.get("cluster_id")
            if isinstance(cid, str):
                ref((*base, "args", "cluster_id"), cid, zones_ok=False)
        elif ev.kind == "transmitter" and b.unplugged is not None and not site.transmitter.port:
            errs.append(((*base, "unplugged"), "the site has no transmitter port"))
    return errs


_why = {"ip": "only IP clusters have a SIM and a 4G link"}


def _check_replays(sc: Scenario, errs: list) -> None:
    """A replay resends an earlier request byte for byte: the latest validly signed one,
    or the one named by replay_of."""
    ids: list[str | None] = []
    signed_before = False
    for i, ev in sc.ordered():
        c = ev.command
        if c is None:
            continue
        if c.signed == "replay":
            if c.replay_of is not None:
                if c.replay_of not in ids:
                    errs.append((("events", i, "command", "replay_of"),
                                 f"no earlier command has request_id {c.replay_of!r}"))
            elif not signed_before:
                errs.append((("events", i, "command", "signed"),
                             "a replay needs an earlier signed command to resend"))
            continue
        if c.replay_of is not None:
            errs.append((("events", i, "command", "replay_of"),
                         'replay_of only goes with signed: "replay"'))
        ids.append(c.request_id)
        signed_before = signed_before or c.signed is True


def _ref_msg(value: str, known: list[str], what: str) -> str:
    import difflib

    hint = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    msg = f"no {what} with id {value!r} in the site file"
    if hint:
        msg += f" (did you mean {hint[0]!r}?)"
    return msg + f"; known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}"

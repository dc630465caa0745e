"""The site file: one YAML a technician edits, validated with line-accurate errors.

Models forbid unknown keys so a typo never silently disables something. Cross-
references (zones, targets, profiles, FM addresses) are checked after the shape,
with the same FILE:LINE: path: message format. Secrets only arrive via *_file paths.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.diagnosis import DiagnosisSettings
from controller.yamlsrc import YamlError, dotted, line_for, load_model, load_yaml

Id = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Priority = Literal["normal", "priority", "emergency"]
PRIORITY_RANK = {"normal": 0, "priority": 1, "emergency": 2}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteInfo(Strict):
    id: Id
    name: str
    timezone: str = "Asia/Ho_Chi_Minh"
    lat: float | None = Field(None, ge=-90, le=90)
    lon: float | None = Field(None, ge=-180, le=180)
    language: Literal["vi", "en"] = "vi"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as Asia/Ho_Chi_Minh") from None
        return v


class CentralKey(Strict):
    key_id: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        import base64
        import binascii

        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
        return v


def _broker_url(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(r"mqtts?://[^/\s:]+(:\d{1,5})?/?", v):
        raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
    return v


class Central(Strict):
    broker: str
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keys: list[CentralKey] = []
    max_command_age_s: float = Field(300, gt=0, le=3600)
    max_command_bytes: int = Field(65536, ge=1024, le=1048576)
    keepalive_s: int = Field(30, ge=5, le=600)

    _broker = field_validator("broker")(classmethod(lambda cls, v: _broker_url(v)))


class Rds(Strict):
    port: str = Field(description="serial port of the UECP RDS encoder")
    baud: int = 9600
    profile: str = "uecp-encoder"
    pi: str = Field("C201", pattern=r"^[0-9A-Fa-f]{4}$")
    ps: str = Field("LOA XA", max_length=8)
    pty: int = Field(0, ge=0, le=31)
    site_address: int = Field(0, ge=0, le=1023)
    encoder_address: int = Field(0, ge=0, le=63)


class Transmitter(Strict):
    port: str
    baud: int | None = None
    profile: str = "exciter-ascii-v2"
    frequency_mhz: float = Field(ge=87.5, le=108.0)
    power_w: float = Field(gt=0, le=5000)
    carrier: Literal["always", "on_demand"] = "on_demand"
    preroll_s: float = Field(2.0, ge=0, le=30)
    rds: Rds | None = None


class Audio(Strict):
    device: str | None = None
    sample_rate: int = Field(48000, ge=8000, le=192000)
    live_input: str | None = None
    loudness_lufs: float = Field(-16.0, ge=-40, le=-5)
    dead_air_dbfs: float = Field(-50.0, ge=-90, le=-10)
    dead_air_s: float = Field(10.0, gt=0, le=600)
    dead_air_fallback: Literal["release", "safe_file"] = "release"
    safe_file: Path | None = None
    tts_voice: str = "vi"
    tts_command: str | None = None


class Zone(Strict):
    id: Id
    name: str


class FmAddressing(Strict):
    address: str = Field(pattern=r"^\d{3}$")
    groups: list[str] = []


class IpDevice(Strict):
    device_id: str = Field(min_length=1, max_length=64)


class Subscription(Strict):
    provider: str | None = None
    msisdn: str | None = None
    iccid: str | None = None
    expires_on: dt.date | None = None


class Cluster(Strict):
    id: Id
    kind: Literal["ip", "fm"]
    zone: str
    name: str | None = None
    lat: float | None = Field(None, ge=-90, le=90)
    lon: float | None = Field(None, ge=-180, le=180)
    profile: str | None = None
    enabled: bool = True
    fm: FmAddressing | None = None
    ip: IpDevice | None = None
    subscription: Subscription | None = None
    power_feed: str | None = None
    impedance_ref_ohm: float | None = Field(None, gt=0)
    monitored: bool | None = Field(None, description="FM cluster with a monitoring module")

    @model_validator(mode="after")
    def _kind_fields(self) -> Cluster:
        if self.kind == "fm" and self.fm is None:
            raise ValueError("an FM cluster needs fm: {address: '001'}")
        if self.kind == "ip" and self.ip is None:
            raise ValueError("an IP cluster needs ip: {device_id: ...}")
        if self.kind == "fm" and self.ip is not None:
            raise ValueError("an FM cluster cannot have an ip: section")
        if self.kind == "ip" and self.fm is not None:
            raise ValueError("an IP cluster cannot have an fm: section")
        return self

    @property
    def profile_name(self) -> str:
        return self.profile or ("ip-json-v1" if self.kind == "ip" else "fm-receiver-dtmf")


class TtsSource(Strict):
    text: str = Field(min_length=1, max_length=5000)
    voice: str | None = None


class MediaSource(Strict):
    path: Path | None = None
    url: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one(self) -> MediaSource:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of path or url")
        if self.url is not None and self.sha256 is None:
            raise ValueError("media fetched by url needs its sha256")
        return self


class StreamSource(Strict):
    url: str = Field(pattern=r"^https?://")


class LiveSource(Strict):
    input: str | None = None


class Source(Strict):
    tts: TtsSource | None = None
    media: MediaSource | None = None
    stream: StreamSource | None = None
    live: LiveSource | None = None

    @model_validator(mode="after")
    def _one(self) -> Source:
        given = [k for k in ("tts", "media", "stream", "live") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one source of tts, media, stream, live (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("tts", "media", "stream", "live") if getattr(self, k) is not None)


class Schedule(Strict):
    cron: str | None = None
    at: list[dt.datetime] | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if len(v.split()) != 5:
            raise ValueError("cron needs 5 fields: minute hour day-of-month month day-of-week")
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(v, timezone="UTC")
        except ValueError as e:
            raise ValueError(f"invalid cron: {e}") from None
        return v

    @model_validator(mode="after")
    def _one(self) -> Schedule:
        if (self.cron is None) == (self.at is None):
            raise ValueError("give exactly one of cron or at")
        return self


class Programme(Strict):
    id: Id
    title: str
    priority: Priority = "normal"
    source: Source
    targets: Literal["all"] | list[str] = "all"
    schedule: Schedule | None = None
    max_duration_s: float = Field(1800, gt=0, le=6 * 3600)
    misfire_grace_s: float = Field(60, ge=1, le=3600)
    resume: Literal["none", "resume", "rerun"] = "none"
    volume: int | None = Field(None, ge=0, le=100)
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None


class Timing(Strict):
    heartbeat_timeout_s: float = Field(90, gt=0)
    health_interval_s: float = Field(300, ge=1)
    poll_fast_s: float = Field(2, gt=0)
    poll_slow_s: float = Field(30, gt=0)
    clock_jump_s: float = Field(30, gt=0)
    clock_check: str = Field("auto", pattern=r"^(auto|timesyncd|kernel|none|file:.+)$",
                             description="how to know the clock is synchronised: auto, timesyncd, kernel, none, file:PATH")


class Storage(Strict):
    state_dir: Path = Path("/var/lib/loaxa")
    min_free_mb: int = Field(50, ge=1)


class MediaServer(Strict):
    bind: str = "0.0.0.0"
    port: int = Field(8810, ge=0, le=65535)
    public_url: str | None = Field(None, pattern=r"^https?://")


class ClustersMqtt(Strict):
    broker: str | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None

    _broker = field_validator("broker")(classmethod(lambda cls, v: _broker_url(v)))


class Control(Strict):
    socket: Path = Path("/run/loaxa/control.sock")
    group: str | None = "loaxa"


class LightningSensor(Strict):
    port: str
    baud: int | None = None
    profile: str = "lightning-as3935-bridge"


class SiteConfig(Strict):
    site: SiteInfo
    central: Central
    transmitter: Transmitter
    audio: Audio = Audio()
    zones: list[Zone]
    clusters: list[Cluster]
    programmes: list[Programme] = []
    timing: Timing = Timing()
    storage: Storage = Storage()
    media_server: MediaServer = MediaServer()
    clusters_mqtt: ClustersMqtt = ClustersMqtt()
    control: Control = Control()
    lightning_sensor: LightningSensor | None = None
    diagnosis: DiagnosisSettings = Field(default_factory=DiagnosisSettings,
                                         description="thresholds of the fault diagnosis (docs/diagnosis.md)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # filled by load_site
    source_path: Path | None = Field(None, exclude=True)
    source_hash: str | None = Field(None, exclude=True)
    warnings: list[str] = Field(default_factory=list, exclude=True)

    def cluster(self, cid: str) -> Cluster:
        return next(c for c in self.clusters if c.id == cid)

    def resolve_targets(self, targets: str | list[str]) -> tuple[list[str], list[str]]:
        """(enabled cluster ids, skipped disabled ids) for 'all', zone ids and cluster ids."""
        ids: list[str] = []
        if targets == "all":
            ids = [c.id for c in self.clusters]
        else:
            zones = {z.id for z in self.zones}
            for t in targets:
                if t in zones:
                    ids += [c.id for c in self.clusters if c.zone == t]
                else:
                    ids.append(t)
        seen: dict[str, None] = dict.fromkeys(ids)
        enabled = [i for i in seen if self.cluster(i).enabled]
        return enabled, [i for i in seen if not self.cluster(i).enabled]


def cross_check(cfg: SiteConfig) -> tuple[list[tuple[tuple, str]], list[tuple[tuple, str]]]:
    """References between sections: (errors, warnings) as (location, message)."""
    errs: list[tuple[tuple, str]] = []
    warns: list[tuple[tuple, str]] = []
    zone_ids = [z.id for z in cfg.zones]
    _dupes(errs, "zones", zone_ids)
    cl_ids = [c.id for c in cfg.clusters]
    _dupes(errs, "clusters", cl_ids)
    _dupes(errs, "programmes", [p.id for p in cfg.programmes])
    overlap = set(zone_ids) & set(cl_ids)
    for i, c in enumerate(cfg.clusters):
        if c.id in overlap:
            errs.append((("clusters", i, "id"), f"{c.id!r} is also a zone id; targets would be ambiguous"))
        if c.zone not in zone_ids:
            errs.append((("clusters", i, "zone"), _ref_msg(c.zone, zone_ids, "zone")))
    seen_addr: dict[str, int] = {}
    seen_dev: dict[str, int] = {}
    for i, c in enumerate(cfg.clusters):
        if c.fm:
            if c.fm.address in seen_addr:
                errs.append((("clusters", i, "fm", "address"),
                             f"FM address {c.fm.address} is already used by {cfg.clusters[seen_addr[c.fm.address]].id}; "
                             "two receivers would wake on the same code"))
            else:
                seen_addr[c.fm.address] = i
            if c.fm.address == "000":
                errs.append((("clusters", i, "fm", "address"), "000 is the all-call code; use 001-999"))
        if c.ip:
            if c.ip.device_id in seen_dev:
                errs.append((("clusters", i, "ip", "device_id"),
                             f"device id {c.ip.device_id!r} is already used by {cfg.clusters[seen_dev[c.ip.device_id]].id}"))
            else:
                seen_dev[c.ip.device_id] = i
    _check_profiles(cfg, errs)
    known = set(zone_ids) | set(cl_ids)
    for i, p in enumerate(cfg.programmes):
        if p.targets == "all":
            continue
        for j, t in enumerate(p.targets):
            if t not in known:
                errs.append((("programmes", i, "targets", j),
                             _ref_msg(t, sorted(known), "zone or cluster")))
            elif t in cl_ids and not cfg.cluster(t).enabled:
                warns.append((("programmes", i, "targets", j),
                              f"cluster {t} is disabled; it will be skipped"))
    return errs, warns


def _check_profiles(cfg: SiteConfig, errs: list) -> None:
    try:
        from device_drivers.profiles import load_profile
    except ImportError:  # drivers not installed: shape checks only
        return
    wanted: list[tuple[tuple, str, str]] = [(("transmitter", "profile"), cfg.transmitter.profile, "transmitter")]
    if cfg.transmitter.rds:
        wanted.append((("transmitter", "rds", "profile"), cfg.transmitter.rds.profile, "rds_encoder"))
    if cfg.lightning_sensor:
        wanted.append((("lightning_sensor", "profile"), cfg.lightning_sensor.profile, "lightning_sensor"))
    for i, c in enumerate(cfg.clusters):
        wanted.append((("clusters", i, "profile"), c.profile_name,
                       "ip_cluster" if c.kind == "ip" else "fm_receiver"))
    cache: dict[str, object] = {}
    for loc, name, kind in wanted:
        if name not in cache:
            try:
                cache[name] = load_profile(name)
            except Exception as e:
                cache[name] = e
        prof = cache[name]
        if isinstance(prof, Exception):
            first = str(prof).splitlines()[0] if str(prof) else type(prof).__name__
            errs.append((loc, f"profile {name!r} cannot be used: {first}"))
        elif getattr(prof, "kind", kind) != kind:
            errs.append((loc, f"profile {name!r} is a {prof.kind} profile; a {kind} profile is needed"))
    # one FM carrier carries one code plan: every receiver must speak the same profile
    fm = [(i, c) for i, c in enumerate(cfg.clusters) if c.kind == "fm"]
    if fm:
        first_i, first = fm[0]
        for i, c in fm[1:]:
            if c.profile_name != first.profile_name:
                errs.append((("clusters", i, "profile"),
                             f"FM receivers must share one profile (the air carries one code plan): "
                             f"{first.id} uses {first.profile_name!r}, this one {c.profile_name!r}"))
        prof = cache.get(first.profile_name)
        spec = getattr(prof, "fm", None)
        if spec is not None:
            for i, c in fm:
                for problem in spec.check_addressing(c.fm.address, c.fm.groups):
                    errs.append((("clusters", i, "fm"), problem))


def _dupes(errs: list, section: str, ids: list[str]) -> None:
    first: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x in first:
            errs.append(((section, i, "id"), f"duplicate id {x!r} (first used at {section}[{first[x]}])"))
        else:
            first[x] = i


def _ref_msg(value: str, known: list[str], what: str) -> str:
    import difflib

    hint = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    msg = f"no {what} with id {value!r}"
    if hint:
        msg += f" (did you mean {hint[0]!r}?)"
    return msg + f"; known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}"


def load_site(path: str | Path, *, check_profiles: bool = True) -> SiteConfig:
    """Load a site file; raise YamlError listing every problem (shape first, then references)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise YamlError([f"{path}: cannot read: {e.strerror or e}"]) from None
    text = raw.decode("utf-8", errors="replace")
    cfg = load_model(path, SiteConfig, text=text)
    _, lines = load_yaml(path, text)
    errs, warns = cross_check(cfg) if check_profiles else ([], [])
    if errs:
        raise YamlError([f"{path}:{line_for(lines, loc)}: {dotted(loc)}: {m}" for loc, m in errs])
    cfg.source_path = path
    cfg.source_hash = hashlib.sha256(raw).hexdigest()
    cfg.warnings = [f"{path}:{line_for(lines, loc)}: {dotted(loc)}: {m}" for loc, m in warns]
    return cfg


def read_secret(path: Path | None) -> str | None:
    """Secrets live in files (mode 0600); the value is never logged."""
    if path is None:
        return None
    return Path(path).read_text(encoding="utf-8").strip()



"""Fault diagnosis: which cluster is down and *why*, with evidence a repair crew can use.

The commune's clusters die mostly from lapsed SIM plans and lightning, and there is no
money to send someone to look: a wrong cause wastes a trip, a flood of alarms teaches the
operator to stop reading. So a lost cluster is named only after a short settle time (to
see other clusters fall or strikes arrive); losses are correlated by zone, power feed
and storm; an area event gives one alarm per cluster tied by an incident id; causes are
refined in place. Pure logic over `controller.observations`: the daemon feeds it and
wires the returned transmitter actions to the driver. Rules and examples: docs/diagnosis.md.
"""
from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.alarms import AlarmManager, Hysteresis
from controller.diagnosis_score import score
from controller.observations import (
    ClusterOffline,
    ClusterOnline,
    ClusterTelemetry,
    MaintenanceNote,
    Strike,
    Tick,
    TransmitterReading,
)
from controller.storms import StormLog, local_hm, local_hms
from controller.transmitter_guard import TransmitterAction, TransmitterGuard

__all__ = ["ClusterInfo", "DiagnosisSettings", "Diagnoser", "SiteModel", "TransmitterAction",
           "score"]

log = structlog.get_logger(__name__)

SEVERITY = {
    "cluster.offline": "major", "cluster.amplifier_fault": "major",
    "cluster.speaker_line_fault": "major", "cluster.surge_protector_tripped": "major",
    "cluster.power_loss": "major", "cluster.subscription_expiring": "warning",
    "cluster.subscription_expired": "major", "transmitter.unreachable": "critical",
    "transmitter.vswr_high": "critical", "transmitter.over_temperature": "major",
    "transmitter.pll_unlocked": "critical",
}
# telemetry fault key -> alarm code
FAULT_CODES = {"amplifier": "cluster.amplifier_fault", "speaker_line": "cluster.speaker_line_fault",
               "surge": "cluster.surge_protector_tripped", "mains": "cluster.power_loss"}
FIELD_CODES = ("cluster.offline", *FAULT_CODES.values())  # what a technician note touches
# Causes that rest on evidence of the moment (a storm, a zone loss) and cannot be
# re-derived after a restart: a later "unknown" must not overwrite them.
_STICKY = ("lightning", "power_loss", "hardware", "vandalism_or_unknown", "link_loss",
           "subscription_expired")  # a modem's "SIM expired" report is not repeated after a restart
_ORDER = ("subscription_expired", "power_loss", "lightning", "hardware", "link_loss",
          "vandalism_or_unknown", "unknown")

DEFAULT_HYSTERESIS = {
    "cluster.offline": Hysteresis(raise_after_s=0, clear_after_s=120),
    "cluster.amplifier_fault": Hysteresis(raise_after_s=60, clear_after_s=300),
    "cluster.speaker_line_fault": Hysteresis(raise_after_s=60, clear_after_s=300),
    "cluster.surge_protector_tripped": Hysteresis(raise_after_s=0, clear_after_s=300),
    "cluster.power_loss": Hysteresis(raise_after_s=30, clear_after_s=300),
    "transmitter.vswr_high": Hysteresis(raise_after_s=0, clear_after_s=60),
    "transmitter.over_temperature": Hysteresis(raise_after_s=30, clear_after_s=120),
    "transmitter.pll_unlocked": Hysteresis(raise_after_s=5, clear_after_s=30),
    "transmitter.unreachable": Hysteresis(raise_after_s=10, clear_after_s=30),
}


class DiagnosisSettings(BaseModel):
    """Every threshold of docs/diagnosis.md; the daemon may fill transmitter limits from
    the firmware profile and `heartbeat_timeout_s` from the site's timing section."""

    model_config = ConfigDict(extra="forbid")
    heartbeat_timeout_s: float = Field(90, gt=0)
    settle_s: float = Field(60, ge=0)
    lightning_distance_km: float = Field(10, gt=0)
    storm_gap_s: float = Field(600, gt=0)
    lightning_window_s: float = Field(600, ge=0)
    fault_after_storm_s: float = Field(1800, ge=0)
    storm_retention_s: float = Field(86400, gt=0)
    zone_window_s: float = Field(120, ge=0)
    zone_min_clusters: int = Field(2, ge=2)
    feed_window_s: float = Field(120, ge=0)
    feed_min_clusters: int = Field(2, ge=2)
    sitewide_share: float = Field(0.8, gt=0, le=1)
    impedance_tolerance: float = Field(0.15, gt=0, lt=1)
    impedance_clear_tolerance: float = Field(0.10, gt=0, lt=1)
    subscription_warn_days: int = Field(14, ge=0)
    stale_expiry_grace_days: int = Field(2, ge=0)
    weak_rssi_dbm: float = -105
    presumed_damage_after_s: float = Field(86400, gt=0)
    vswr_foldback: float = Field(2.0, gt=1)
    vswr_carrier_off: float = Field(3.0, gt=1)
    vswr_clear: float = Field(1.8, gt=1)
    vswr_persist_s: float = Field(30, ge=0)
    vswr_restore_after_s: float = Field(60, ge=0)
    foldback_power_share: float = Field(0.5, gt=0, lt=1)
    over_temperature_c: float = 70
    over_temperature_clear_c: float = 65
    pll_carrier_off_s: float = Field(10, ge=0)
    transmitter_silence_s: float = Field(60, gt=0)
    hysteresis: dict[str, Hysteresis] = Field(default_factory=lambda: dict(DEFAULT_HYSTERESIS))

    @model_validator(mode="after")
    def _consistent(self) -> DiagnosisSettings:
        if not self.vswr_clear <= self.vswr_foldback < self.vswr_carrier_off:
            raise ValueError("need vswr_clear <= vswr_foldback < vswr_carrier_off")
        if self.impedance_clear_tolerance > self.impedance_tolerance:
            raise ValueError("impedance_clear_tolerance must not exceed impedance_tolerance")
        if self.over_temperature_clear_c > self.over_temperature_c:
            raise ValueError("over_temperature_clear_c must not exceed over_temperature_c")
        unknown = set(self.hysteresis) - set(SEVERITY)
        if unknown:
            raise ValueError(f"hysteresis for unknown codes {sorted(unknown)}; "
                             f"allowed {', '.join(SEVERITY)}")
        self.hysteresis = {**DEFAULT_HYSTERESIS, **self.hysteresis}
        return self


@dataclass(frozen=True)
class ClusterInfo:
    """What diagnosis needs from the site file's cluster entry."""

    id: str
    kind: Literal["ip", "fm"] = "ip"
    zone: str = ""
    power_feed: str | None = None
    expires_on: dt.date | None = None
    impedance_ref_ohm: float | None = None
    monitored: bool | None = None  # None: IP clusters are monitored, FM ones are not
    enabled: bool = True
    subscription_ref: str | None = None  # e.g. "Viettel 0912345678": named in evidence

    @property
    def is_monitored(self) -> bool:
        return self.monitored if self.monitored is not None else self.kind == "ip"


@dataclass(frozen=True)
class SiteModel:
    clusters: tuple[ClusterInfo, ...]
    timezone: str = "Asia/Ho_Chi_Minh"
    lightning_sensor: bool = True  # its silence is evidence against lightning


@dataclass
class _Loss:
    lost_at: float  # last sign of life
    detected_at: float
    clean: bool
    how: str  # first evidence line


@dataclass
class _Cluster:
    info: ClusterInfo
    last_seen: float
    heard: bool = False
    loss: _Loss | None = None
    outage: tuple[float, float] | None = None  # last healed loss: (lost_at, back_at)
    tele: dict = field(default_factory=dict)
    onset: dict[str, float] = field(default_factory=dict)  # fault key -> first bad reading
    onset_text: dict[str, str] = field(default_factory=dict)
    healthy_at: dict[str, float] = field(default_factory=dict)  # fault key -> last good
    sim_ok_at: float | None = None
    damaged: MaintenanceNote | None = None


class Diagnoser:
    """Consumes observations, maintains cluster and transmitter alarms through `alarms`."""

    def __init__(self, site_model: SiteModel, alarms: AlarmManager,
                 config: DiagnosisSettings | None = None,
                 clock: Callable[[], float] | None = None, *,
                 emit: Callable[[str, dict], Any] | None = None) -> None:
        self.cfg = config or DiagnosisSettings()
        self.alarms = alarms
        self.alarms.hysteresis.update(self.cfg.hysteresis)  # settings are the one source
        self.clock = clock or alarms.clock
        self.emit = emit or alarms.emit
        self._synced = True
        self._link_up = True
        self._events: deque[tuple[float, str, str]] = deque(maxlen=2000)
        self._unknown_ids: set[str] = set()
        self._clusters: dict[str, _Cluster] = {}
        self.tz = ZoneInfo(site_model.timezone)
        self.storms = StormLog(gap_s=self.cfg.storm_gap_s, retention_s=self.cfg.storm_retention_s,
                               distance_km=self.cfg.lightning_distance_km, tz=self.tz)
        self.transmitter = TransmitterGuard(self.cfg, alarms, self.storms)
        self.update_site(site_model)

    # ------------------------------------------------------------------ public API
    def update_site(self, site_model: SiteModel) -> None:
        """(Re)load the site; alarms of clusters removed or disabled are cleared."""
        self.site = site_model
        self.tz = ZoneInfo(site_model.timezone)
        self.storms.tz = self.tz
        now = self.clock()
        old = self._clusters
        self._clusters = {}
        for info in site_model.clusters:
            c = old.get(info.id) or _Cluster(info=info, last_seen=now)
            c.info = info
            self._clusters[info.id] = c
        for a in self.alarms.active():
            cid = a.get("cluster_id")
            if cid is None:
                continue
            c = self._clusters.get(cid)
            if c is None or not c.info.enabled:
                why = "removed from the site file" if c is None else "disabled in the site file"
                self.alarms.clear(a["code"], cid, note=f"cluster {why}")

    def clock_stepped(self, delta_s: float) -> None:
        """Wall time jumped (NTP step; wire to ClockGuard.on_jump): keep timers' elapsed time
        so a jump does not look like every cluster going silent."""
        for c in self._clusters.values():
            c.last_seen += delta_s
            if c.loss:
                c.loss.detected_at += delta_s
        if self.transmitter.last_ts is not None:
            self.transmitter.last_ts += delta_s
        self.alarms.shift_timers(delta_s)

    def observe(self, obs) -> list[TransmitterAction]:
        """Apply one observation, re-evaluate, return protective transmitter actions."""
        now = self.clock()
        actions: list[TransmitterAction] = []
        if isinstance(obs, Tick):
            self._synced = obs.clock_synced
        elif isinstance(obs, Strike):
            self.storms.add(obs)
        elif isinstance(obs, TransmitterReading):
            actions = self.transmitter.reading(obs.values, obs.ts, now)
        elif isinstance(obs, MaintenanceNote):
            self._note(obs, now)
        elif isinstance(obs, ClusterOnline | ClusterOffline | ClusterTelemetry):
            c = self._clusters.get(obs.cluster_id)
            if c is None:
                if obs.cluster_id not in self._unknown_ids:
                    self._unknown_ids.add(obs.cluster_id)
                    log.warning("observation for a cluster not in the site file",
                                cluster=obs.cluster_id)
            elif c.info.enabled:
                self._cluster_obs(c, obs)
        else:
            raise TypeError(f"not an observation: {type(obs).__name__}")
        self._check_heartbeats(now)
        for c in self._clusters.values():
            if c.info.enabled:
                self._evaluate(c, now)
        self.transmitter.tick(now)
        self.alarms.tick()
        return actions

    def availability(self, cluster_id: str) -> str:
        c = self._clusters[cluster_id]
        if not c.info.enabled:
            return "disabled"
        if c.damaged or c.loss:
            return "offline"
        if not c.info.is_monitored:
            return "unmonitored"
        if not c.heard and self.alarms.get("cluster.offline", cluster_id):
            return "offline"
        return "online"

    def subscription(self, cluster_id: str) -> dict | None:
        """`{"expires_on", "days_left"}` for the cluster state topic, or None."""
        c = self._clusters[cluster_id]
        exp = self._expiry(c)
        if exp is None:
            return None
        return {"expires_on": exp.isoformat(), "days_left": (exp - self._day(self.clock())).days}

    # ------------------------------------------------------------------ inputs
    def _cluster_obs(self, c: _Cluster, obs) -> None:
        if isinstance(obs, ClusterOffline):
            if c.info.is_monitored and c.loss is None:
                how = ("went offline cleanly at " if obs.clean else
                       "connection lost (last will) at ") + self._hms(obs.ts)
                self._lose(c, _Loss(obs.ts, obs.ts, obs.clean, how))
            return
        if c.loss is not None and obs.ts <= c.loss.detected_at:
            return  # late message from before the loss
        if c.loss is not None:
            c.outage = (c.loss.lost_at, obs.ts)
            c.loss = None
        c.last_seen, c.heard = max(c.last_seen, obs.ts), True
        if isinstance(obs, ClusterTelemetry):
            self._telemetry(c, obs)

    def _lose(self, c: _Cluster, loss: _Loss) -> None:
        c.loss = loss
        # clusters not heard since the gateway started all "fall" at its start time: that
        # says nothing about their zone or feed, only (if most do) about the gateway itself
        kind = "unheard" if not c.heard else "clean" if loss.clean else "abrupt"
        self._events.append((loss.lost_at, c.info.id, kind))

    def cluster_link(self, up: bool) -> None:
        """The gateway's own link to the clusters' broker went down/up. While it is down,
        silence says nothing about the clusters; when it returns, each gets a fresh window."""
        now = self.clock()
        self._link_up = up
        if up:
            for c in self._clusters.values():
                c.last_seen = max(c.last_seen, now)

    def _check_heartbeats(self, now: float) -> None:
        if not self._link_up:
            return
        limit = self.cfg.heartbeat_timeout_s
        for c in self._clusters.values():
            if (c.info.enabled and c.info.is_monitored and c.loss is None
                    and c.damaged is None and now - c.last_seen > limit):
                how = (f"no heartbeat since {self._hms(c.last_seen)} (timeout {limit:g} s)"
                       if c.heard else
                       f"not heard since the gateway started at {self._hms(c.last_seen)}")
                self._lose(c, _Loss(c.last_seen, now, False, how))

    def _telemetry(self, c: _Cluster, obs: ClusterTelemetry) -> None:
        f = {k: v for k, v in obs.fields.items() if v is not None}
        c.tele.update(f)
        if f.get("sim_status") == "ok":
            c.sim_ok_at = obs.ts
        states: dict[str, bool | None] = {
            "amplifier": _neg(f.get("amplifier_ok")), "surge": _neg(f.get("surge_protector_ok")),
            "mains": _neg(f.get("mains_ok"))}
        ref, z = c.info.impedance_ref_ohm, f.get("line_impedance_ohm")
        if ref and z is not None:
            dev = abs(z - ref) / ref
            states["speaker_line"] = (True if dev > self.cfg.impedance_tolerance else
                                      False if dev <= self.cfg.impedance_clear_tolerance else None)
        at = self._hm(obs.ts)
        for key, bad in states.items():
            if bad is None:
                continue
            if not bad:
                c.onset.pop(key, None)
                c.healthy_at[key] = obs.ts
                continue
            if key in c.onset:
                continue
            c.onset[key] = obs.ts
            if key == "mains":
                bat = f.get("battery_v", c.tele.get("battery_v"))
                c.onset_text[key] = f"mains supply lost at {at}" + (
                    f", running on battery ({bat:.1f} V)" if bat is not None else "")
                self._events.append((obs.ts, c.info.id, "mains"))
            elif key == "amplifier":
                c.onset_text[key] = f"amplifier fault reported at {at}"
            elif key == "surge":
                c.onset_text[key] = f"surge protector tripped (reported {at})"
            else:
                kind = "open circuit: cut or stolen cable, or a failed horn" if z > ref \
                    else "short circuit on the line"
                c.onset_text[key] = (f"speaker line impedance {z:g} ohm vs calibrated {ref:g} ohm "
                                     f"({(z - ref) / ref:+.0%}) at {at}: {kind}")

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, c: _Cluster, now: float) -> None:
        if self._synced:
            self._eval_subscription(c, now)
        if c.damaged is not None:
            return  # a technician's report stands until `repaired`
        if c.info.is_monitored:
            self._eval_liveness(c, now)
        if c.loss is None:
            self._eval_faults(c)

    def _eval_liveness(self, c: _Cluster, now: float) -> None:
        cid = c.info.id
        active = self.alarms.get("cluster.offline", cid)
        if c.loss is not None:
            if active is None and now - c.loss.detected_at < self.cfg.settle_s:
                return
            cause, conf, ev, inc = self._diagnose_loss(c, c.loss, now)
            if active and cause == "unknown" and active["cause"] in _STICKY:
                cause, conf, ev, inc = (active["cause"], active["confidence"],
                                        active["evidence"], active.get("incident_id"))
            self.alarms.condition_on("cluster.offline", cid, severity=SEVERITY["cluster.offline"],
                                     cause=cause, confidence=conf, evidence=ev, incident_id=inc)
        elif active and c.heard:
            lost, back = c.outage or (c.last_seen, c.last_seen)
            dur = _duration(back - lost)
            damaged = any(k in c.onset for k in ("amplifier", "speaker_line", "surge"))
            if damaged or active["cause"] in ("power_loss", "subscription_expired"):
                self.alarms.condition_off("cluster.offline", cid,
                                          note=f"back online at {self._hm(back)} after {dur}")
            else:
                self.alarms.condition_off(
                    "cluster.offline", cid, cause="link_loss",
                    note=f"link outage {self._hm(lost)}-{self._hm(back)} ({dur}); "
                         "came back healthy")

    def _eval_faults(self, c: _Cluster) -> None:
        cid = c.info.id
        for key, code in FAULT_CODES.items():
            if key in c.onset:
                cause, conf, ev, inc = self._diagnose_fault(c, key)
                cur = self.alarms.get(code, cid)
                if inc is None and cur and cur.get("incident_id"):
                    # it rested on a storm/feed event this boot no longer remembers (a
                    # restart): keep what was concluded, not "no storm recorded"
                    cause, conf, ev, inc = (cur["cause"], cur["confidence"], cur["evidence"],
                                            cur["incident_id"])
                self.alarms.condition_on(code, cid, severity=SEVERITY[code], cause=cause,
                                         confidence=conf, evidence=ev, incident_id=inc)
            elif key in c.healthy_at:
                self.alarms.condition_off(code, cid,
                                          note=f"healthy again at {self._hm(c.healthy_at[key])}")

    def _eval_subscription(self, c: _Cluster, now: float) -> None:
        cid, exp = c.info.id, self._expiry(c)
        status = c.tele.get("sim_status")
        today = self._day(now)
        sub = self._subscription_evidence(c, exp, today, None)
        if sub is not None:
            conf, ev = sub
            self.alarms.condition_on("cluster.subscription_expired", cid,
                                     severity=SEVERITY["cluster.subscription_expired"],
                                     cause="subscription_expired", confidence=conf, evidence=ev)
            self.alarms.condition_off("cluster.subscription_expiring", cid, note="now expired")
            return
        note = f"subscription valid until {exp}" if exp else f"modem reports SIM {status}"
        if status is not None or not self.alarms.get("cluster.subscription_expired", cid):
            # with no word from the modem (e.g. since a restart) an expired SIM stays expired
            self.alarms.condition_off("cluster.subscription_expired", cid, note=note)
        days = (exp - today).days if exp else None
        if days is not None and days <= self.cfg.subscription_warn_days:
            when = "today" if days == 0 else f"in {days} day{'s' if days > 1 else ''}"
            self.alarms.condition_on(
                "cluster.subscription_expiring", cid,
                severity=SEVERITY["cluster.subscription_expiring"], cause="subscription_expired",
                confidence=1.0, evidence=[f"SIM expires on {exp} ({when}){self._ref(c)}"],
                remind=True)
        else:
            self.alarms.condition_off("cluster.subscription_expiring", cid, note=note)

    # ------------------------------------------------------------------ causes
    def _subscription_evidence(self, c: _Cluster, exp: dt.date | None, today: dt.date,
                               loss: _Loss | None) -> tuple[float, list[str]] | None:
        status = c.tele.get("sim_status")
        sim_bad = status in ("expired", "no_registration")
        passed = self._synced and exp is not None and today > exp
        if not (sim_bad or passed):
            return None
        conf, ev = 0.0, []
        if passed:
            conf, ev = 0.9, [f"SIM expired on {exp}{self._ref(c)}"]
            grace = dt.timedelta(days=self.cfg.stale_expiry_grace_days)
            if c.sim_ok_at is not None and self._day(c.sim_ok_at) > exp + grace:
                conf = 0.5
                ev.append(f"but the modem reported its SIM working on {self._day(c.sim_ok_at)}: "
                          "the expiry date in the site file may be out of date")
            elif loss is not None and c.heard and self._day(loss.lost_at) < exp:
                conf = 0.5
                ev.append(f"but the cluster was already silent before {exp}")
        if sim_bad:
            conf = max(conf, 0.95 if status == "expired" else 0.8) + (0.04 if passed else 0)
            ev.append(f"modem reported SIM status '{status}'")
            if not passed and c.info.subscription_ref:  # which SIM to top up or renew
                ev.append(f"SIM {c.info.subscription_ref}"
                          + (f", valid until {exp} per the site file" if exp else ""))
        return min(conf, 0.99), ev

    def _diagnose_loss(self, c: _Cluster, loss: _Loss, now: float):
        cfg, cands = self.cfg, []
        strikes, sid = self.storms.near(loss.lost_at - cfg.lightning_window_s,
                                     loss.detected_at + cfg.lightning_window_s)
        zone = self._group(c, loss.lost_at, "zone")
        feed = self._group(c, loss.lost_at, "feed")
        site = self._sitewide(loss.lost_at)
        sub = self._subscription_evidence(c, self._expiry(c), self._day(now), loss)
        if sub:
            cands.append(("subscription_expired", sub[0], sub[1], None))
        if "mains" in c.onset:
            cands.append(("power_loss", 0.9, [c.onset_text["mains"]], feed and feed[2]))
        if feed and not strikes:
            cands.append(("power_loss", 0.75, [feed[1]], feed[2]))
        if strikes:
            conf, ev = 0.6, [self.storms.text(strikes)]
            # transmitter alarms share the storm's incident but have no cluster
            others = sorted({a["cluster_id"] for a in self.alarms.active()
                             if a.get("incident_id") == sid and a.get("cluster_id")
                             and a["cluster_id"] != c.info.id})
            if "surge" in c.onset:
                conf = 0.9
                ev.append("surge protector tripped before the loss")
            elif "amplifier" in c.onset or "speaker_line" in c.onset:
                conf = 0.85
                ev.append("line or amplifier fault reported before the loss")
            elif zone or feed:
                conf = 0.8
                ev.append((zone or feed)[1])
            elif others:
                conf = 0.7
                ev.append(f"the same storm also damaged {', '.join(others)}")
            if loss.clean:
                conf -= 0.2
                ev.append("but the cluster went offline cleanly (an orderly shutdown)")
            cands.append(("lightning", conf, ev, sid))
        elif zone and not self.site.lightning_sensor:
            cands.append(("lightning", 0.5, [zone[1], "no lightning sensor fitted"], zone[2]))
        elif zone:
            cands.append(("unknown", 0.4, [zone[1], "no lightning recorded by the gateway's "
                          "sensor: a shared 4G cell or supply outage is likely"], zone[2]))
        if site:
            cands.append(("link_loss", 0.85, [site[1]], site[2]))
        if not strikes and "amplifier" in c.onset:
            cands.append(("hardware", 0.6, [c.onset_text["amplifier"] + " before the loss"], None))
        if not strikes and "surge" in c.onset:
            cands.append(("lightning", 0.5, [c.onset_text["surge"], "no storm recorded: a "
                          "surge on the mains or line is also possible"], None))
        if c.tele.get("sim_status") == "absent":
            cands.append(("vandalism_or_unknown", 0.6, ["modem reported no SIM card"], None))
        if not cands:
            rssi = c.tele.get("rssi_dbm")
            if now - loss.lost_at >= cfg.presumed_damage_after_s:
                hours = cfg.presumed_damage_after_s / 3600
                cands.append(("vandalism_or_unknown", 0.4, [
                    f"silent for over {hours:g} h with no storm, supply or subscription "
                    "explanation: field damage or theft is possible"], None))
            elif rssi is not None and rssi <= cfg.weak_rssi_dbm:
                cands.append(("link_loss", 0.4, [f"weak 4G signal ({rssi:g} dBm) in its last "
                                                 "report"], None))
            else:
                cands.append(("unknown", 0.3, self._ruled_out(c, now), None))
        cause, conf, ev, inc = pick(cands)
        also = [f"also: {e[0]}" for k, cf, e, _ in cands if k != cause and cf >= 0.5]
        return cause, round(conf, 2), [loss.how, *ev, *also], inc or None

    def _diagnose_fault(self, c: _Cluster, key: str):
        onset, text = c.onset[key], c.onset_text[key]
        if key == "mains":
            feed = self._group(c, onset, "feed")
            return "power_loss", 0.95, [text, *([feed[1]] if feed else [])], feed and feed[2]
        lo = onset - self.cfg.fault_after_storm_s
        step = key in c.healthy_at and c.healthy_at[key] < onset
        if step:
            lo = max(lo, c.healthy_at[key])
        strikes, sid = self.storms.near(lo, onset + 30)
        if strikes:
            conf = 0.9 if key == "surge" else 0.8 if step else 0.65
            return "lightning", conf, [text, self.storms.text(strikes)], sid
        if key == "surge":
            conf = 0.5 if self.site.lightning_sensor else 0.7
            return "lightning", conf, [text, "no storm recorded: a surge on the mains or line "
                                       "is also possible"], None
        if key == "speaker_line" and c.tele.get("line_impedance_ohm", 0) > (c.info.impedance_ref_ohm
                                                                            or 0):
            return "vandalism_or_unknown", 0.5, [text, "no storm recorded"], None
        return "hardware", 0.6, [text, "no storm recorded"], None

    def _group(self, c: _Cluster, t: float, kind: str):
        """Clusters of c's zone (abrupt losses) or power feed (any loss or mains lost)
        that fell within the window around t: (members, evidence, incident) or None."""
        key = c.info.zone if kind == "zone" else c.info.power_feed
        if not key:
            return None
        window = self.cfg.zone_window_s if kind == "zone" else self.cfg.feed_window_s
        members: dict[str, float] = {}
        for ts, cid, ev_kind in self._events:
            o = self._clusters.get(cid)
            if o is None or abs(ts - t) > window:
                continue
            if kind == "zone" and (o.info.zone != key or ev_kind != "abrupt"):
                continue
            if kind == "feed" and (o.info.power_feed != key or ev_kind == "unheard"):
                continue
            members[cid] = min(members.get(cid, ts), ts)
        need = self.cfg.zone_min_clusters if kind == "zone" else self.cfg.feed_min_clusters
        if c.info.id not in members or len(members) < need:
            return None
        spread = max(members.values()) - min(members.values())
        if kind == "zone":
            text = f"{len(members)} clusters in zone {key} lost within {spread:.0f} s"
        else:
            total = sum(1 for o in self._clusters.values()
                        if o.info.power_feed == key and o.info.enabled and o.info.is_monitored)
            text = (f"{len(members)} of {total} clusters on power feed {key} lost power "
                    f"within {spread:.0f} s")
        return members, text, self._incident(kind, key, members)

    def _sitewide(self, t: float):
        watched = [c for c in self._clusters.values() if c.info.enabled and c.info.is_monitored]
        lost = {cid for ts, cid, k in self._events
                if k != "mains" and abs(ts - t) <= self.cfg.zone_window_s}
        if len(watched) < 3 or len(lost) < self.cfg.sitewide_share * len(watched):
            return None
        return lost, (f"{len(lost)} of {len(watched)} monitored clusters lost at once: the "
                      "gateway's own link or the cluster broker is the likely fault"), \
            self._incident("site", "all", {cid: t for cid in lost})

    def _incident(self, kind: str, key: str, members: dict[str, float]) -> str:
        prefix = f"inc-{kind}-"
        for cid in sorted(members):
            for a in self.alarms.for_cluster(cid):
                if a.get("incident_id", "").startswith(prefix):
                    return a["incident_id"]
        return f"{prefix}{key}-{int(min(members.values()))}"

    def _ruled_out(self, c: _Cluster, now: float) -> list[str]:
        out = [f"no lightning within {self.cfg.lightning_distance_km:g} km recorded"
               if self.site.lightning_sensor else "no lightning sensor fitted"]
        exp = self._expiry(c)
        if exp is not None:
            out.append(f"SIM valid until {exp}")
        feed = c.info.power_feed
        if feed and any(o.info.power_feed == feed and o is not c and o.heard and o.loss is None
                        for o in self._clusters.values()):
            out.append(f"other clusters on power feed {feed} still online")
        return out

    # ------------------------------------------------------------------ technician notes
    def _note(self, n: MaintenanceNote, now: float) -> None:
        body = {"cluster_id": n.cluster_id, "status": n.status, "cause": n.cause,
                "text": n.text or None, "by": n.by or None}
        self.emit("cluster.maintenance", {k: v for k, v in body.items() if v is not None})
        c = self._clusters.get(n.cluster_id)
        if c is None:
            log.warning("maintenance note for a cluster not in the site file",
                        cluster=n.cluster_id)
            return
        who, cid = n.by or "technician", n.cluster_id
        line = f"technician report by {who} on {self._day(n.ts)}: {n.text or n.status}"
        if n.status == "damaged":
            c.damaged = n
            codes = [k for k in FIELD_CODES if self.alarms.get(k, cid)] or ["cluster.offline"]
            for code in codes:
                cur = self.alarms.get(code, cid) or {}
                cause = n.cause or (cur.get("cause") if cur.get("cause") not in (None, "unknown")
                                    else "vandalism_or_unknown")
                self.alarms.raise_(code, cid, SEVERITY[code], cause, 1.0 if n.cause else 0.8,
                                   [line, *cur.get("evidence", [])], cur.get("incident_id"),
                                   confirmed_by=who)
        elif n.status == "repaired":
            c.damaged = None
            for code in FIELD_CODES:
                self.alarms.clear(code, cid, note=line)
            c.loss, c.outage, c.last_seen = None, None, max(c.last_seen, n.ts, now)
            c.onset.clear()
            c.healthy_at.clear()

    # ------------------------------------------------------------------ helpers
    def _expiry(self, c: _Cluster) -> dt.date | None:
        return c.tele.get("sim_expires_on") or c.info.expires_on

    def _ref(self, c: _Cluster) -> str:
        return f" ({c.info.subscription_ref})" if c.info.subscription_ref else ""

    def _day(self, ts: float) -> dt.date:
        return dt.datetime.fromtimestamp(ts, self.tz).date()

    def _hm(self, ts: float) -> str:
        return local_hm(ts, self.tz)

    def _hms(self, ts: float) -> str:
        return local_hms(ts, self.tz)


def _neg(ok: Any) -> bool | None:
    return None if ok is None else not ok


def _duration(s: float) -> str:
    s = max(0, int(s))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def pick(cands: list[tuple[str, float, list[str], str | None]]):
    """Highest confidence wins; ties go to the cause that is cheaper to check first."""
    return max(cands, key=lambda c: (round(c[1], 2), -_ORDER.index(c[0])))

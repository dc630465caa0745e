"""The running site: every component wired on the one event loop.

Offline-first: each part that can be missing (broker, audio device, serial port,
media port) is started in a way that reports the absence and retries, never
stopping the daemon. Everything the central server must learn goes through
`emit` into the durable outbox.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from controller import __version__
from controller.alarms import AlarmManager
from controller.broadcast import BroadcastRunner
from controller.clock import ClockGuard, make_check
from controller.commands import CommandGate
from controller.config import SiteConfig
from controller.diagnosis import ClusterInfo, Diagnoser, DiagnosisSettings, SiteModel
from controller.engine import Engine, Request
from controller.media import AssetCache
from controller.media_server import MediaServer
from controller.observations import ClusterOffline, ClusterOnline, ClusterTelemetry, Tick
from controller.outbox import Outbox
from controller.playout import Player, device_present
from controller.scheduler import ProgrammeScheduler
from controller.sitestate import SiteState
from controller.store import Store
from controller.tts import TTS
from controller.uplink import Uplink

log = structlog.get_logger("loaxa.runtime")

DROPPABLE = {"cluster.telemetry"}


class Runtime:
    def __init__(self, cfg: SiteConfig, store: Store, *, daemon: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.daemon = daemon
        self.boot_id = getattr(daemon, "boot_id", "") or ""
        self._tasks: set[asyncio.Task] = set()
        self._published_clusters: dict[str, tuple[dict, float | None]] = {}
        self.state_dir = Path(cfg.storage.state_dir)
        self.media_cache_dir = self.state_dir / "media"
        self.media_tmp_dir = self.state_dir / "media-tmp"
        self.site = SiteState(cfg)
        self.outbox = Outbox(store)
        self.uplink = Uplink(cfg.site.id, _CentralView(cfg), self.outbox, store,
                             on_command=self._on_command, version=__version__, boot_id=self.boot_id)
        self.alarms = AlarmManager(store, self.emit, time.time, on_change=self._alarms_changed)
        self.diagnoser = Diagnoser(_site_model(cfg), self.alarms, diagnosis_settings(cfg), time.time,
                                   emit=self.emit)
        self.gate = CommandGate(cfg.site.id, {k.key_id: k.public_key for k in cfg.central.keys}, store,
                                self.outbox, max_age_s=cfg.central.max_command_age_s,
                                max_bytes=cfg.central.max_command_bytes, on_security=self._on_security)
        self.player = Player(cfg.audio.device, cfg.audio.sample_rate)
        self.tts = TTS(self.state_dir / "tts", rate=cfg.audio.sample_rate, target_lufs=cfg.audio.loudness_lufs,
                       voice=cfg.audio.tts_voice, command=cfg.audio.tts_command)
        self.assets = AssetCache(self.state_dir / "assets", rate=cfg.audio.sample_rate,
                                 target_lufs=cfg.audio.loudness_lufs)
        ms = cfg.media_server
        self.media_server = MediaServer(ms.bind, ms.port, public_host=_public_host(ms))
        self.runner = BroadcastRunner(self)
        self.engine = Engine(self.runner, fm_clusters={c.id for c in cfg.clusters if c.kind == "fm"},
                             on_skip=self._on_skip)
        self.clock = ClockGuard(make_check(cfg.timing.clock_check), jump_threshold_s=cfg.timing.clock_jump_s,
                                on_sync_change=self._on_sync_change, on_jump=self._on_jump)
        self.scheduler = ProgrammeScheduler(cfg, store, self._fire_programme, self.emit,
                                            lead=lambda p: self.runner.lead_s(p))
        self.devices = None  # controller.devices.Devices: transmitter, RDS, IP link, lightning
        self.tx = None
        self.rds = None
        self.fm_spec = None
        from controller.handlers import register_handlers

        register_handlers(self)

    # ---- lifecycle ------------------------------------------------------
    async def start(self) -> None:
        self.emit("gateway.started", {"version": __version__, "boot_id": self.boot_id})
        self.emit("config.loaded", {"hash": self.cfg.source_hash, "path": str(self.cfg.source_path)})
        if self.daemon is not None and self.daemon.storage_problem:
            self.alarms.raise_("gateway.storage_low", None, "major", "unknown", 1.0,
                               [f"state database unavailable: {self.daemon.storage_problem}"])
        self.uplink.start()
        try:
            await self.media_server.start()
        except OSError as e:
            log.error("media server cannot listen; IP clusters cannot fetch audio", error=str(e))
        from controller.devices import Devices

        self.devices = Devices(self)
        await self.devices.start()
        self.check_audio()
        self.clock.start()
        self.scheduler.start(self.clock.synced)
        self._clock_alarm(self.clock.synced)
        self.publish_all()
        self.spawn(self._tick_loop(), "tick")
        self.spawn(self._health_loop(), "health")
        from controller.control import ControlServer
        from controller.local_api import LocalApi

        self.control = ControlServer(str(self.cfg.control.socket), self.cfg.control.group, LocalApi(self))
        try:
            await self.control.start()
        except OSError as e:
            log.error("control socket unavailable; technician commands will not work", error=str(e))

    async def stop(self) -> None:
        self.emit("gateway.stopping", {})
        self.scheduler.shutdown()
        await self.engine.shutdown()
        await self.clock.stop()
        try:
            await self.control.stop()
        except Exception:
            pass
        if self.devices:
            await self.devices.stop()
        await self.media_server.stop()
        for t in list(self._tasks):
            t.cancel()
        self.player.close()
        self.outbox.flush()
        await self.uplink.stop()
        self.outbox.close()

    async def reload(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.site.reload(cfg)
        self.engine.fm_clusters = {c.id for c in cfg.clusters if c.kind == "fm"}
        self.diagnoser.update_site(_site_model(cfg))
        self.scheduler.reload(cfg)
        self.emit("config.loaded", {"hash": cfg.source_hash, "path": str(cfg.source_path)})
        self.publish_all()

    # ---- plumbing -------------------------------------------------------
    def emit(self, type_: str, body: dict | None = None, *, droppable: bool = False) -> dict | None:
        body = body or {}
        try:
            ev = self.outbox.append(type_, body, droppable=droppable or type_ in DROPPABLE)
        except ValueError as e:  # our own bug: a body that breaks the contract
            log.error("event body rejected by the contract", type=type_, error=str(e))
            return None
        except (sqlite3.Error, OSError) as e:  # disk full / read-only: keep broadcasting, say why
            log.error("event not stored", type=type_, error=str(e))
            self._storage_failed(str(e))
            return None
        if type_ == "alarm.acknowledged" and self.devices is not None:
            from controller.air import RELEASE_CODES

            if body.get("code") in RELEASE_CODES:
                self.spawn(self.devices.air.release_protection(str(body.get("acknowledged_by"))),
                           "tx-release")
        log.info("event", type=type_, seq=ev.get("seq"),
                 **{k: v for k, v in body.items() if k in ("broadcast_id", "programme_id", "code",
                                                           "cluster_id", "cause", "reason", "outcome")})
        return ev

    def _storage_failed(self, why: str) -> None:
        if not self.alarms.get("gateway.storage_low"):
            try:
                self.alarms.raise_("gateway.storage_low", None, "critical", "unknown", 1.0,
                                   [f"cannot write the state database: {why}"])
            except Exception:
                log.error("cannot record the storage alarm either", error=why)

    def db_write(self, sql: str, params: tuple) -> None:
        try:
            self.store.conn.execute(sql, params)
        except Exception as e:
            log.error("database write failed", error=str(e))
            self._storage_failed(str(e))

    def spawn(self, coro: Coroutine, name: str) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("background task failed", task=t.get_name(), error=repr(t.exception()))

    # ---- state published to the central server --------------------------
    def publish_cluster(self, cid: str) -> None:
        """Report by exception: a heartbeat that only moves last_seen is not news."""
        v = self.site.clusters.get(cid)
        if v is None:
            return
        v.faults = [a["code"] for a in self.alarms.for_cluster(cid)]
        st = v.state(self.site.tz)
        key = {k: val for k, val in st.items() if k not in ("last_seen", "rssi_dbm")}
        prev = self._published_clusters.get(cid)
        rssi_moved = prev is not None and _rssi_moved(prev[1], st["rssi_dbm"])
        if prev is not None and prev[0] == key and not rssi_moved:
            return
        self._published_clusters[cid] = (key, st["rssi_dbm"])
        self.uplink.publish_state(f"clusters/{cid}/state", st)

    def publish_health(self, force: bool = False) -> None:
        h = self.site.health(clock_synced=self.clock.synced, outbox_depth=self.outbox.depth,
                             outbox_dropped=self.outbox.dropped_total)
        self.uplink.publish_state("health", h, force=force)

    def publish_all(self) -> None:
        self._published_clusters.clear()
        for cid in self.site.clusters:
            self.publish_cluster(cid)
        self.uplink.publish_state("alarms", self.alarms.active())
        self.publish_health(force=True)

    def _alarms_changed(self, active: list[dict]) -> None:
        self.uplink.publish_state("alarms", active)
        for cid in {a.get("cluster_id") for a in active} | {
                c for c, v in self.site.clusters.items() if v.faults}:
            if cid:
                self.publish_cluster(cid)
        self.publish_health()

    def set_cluster_playing(self, cid: str, programme: str | None) -> None:
        v = self.site.clusters.get(cid)
        if v is not None and v.playing != programme:
            v.playing = programme
            self.publish_cluster(cid)

    # ---- observations from devices ---------------------------------------
    def observe_cluster(self, cid: str, *, online: bool | None = None, telemetry: dict | None = None,
                        clean: bool = False) -> None:
        v = self.site.clusters.get(cid)
        if v is None:
            return
        self._clock_first()
        now = time.time()
        before = v.availability()
        if online is True or telemetry:
            v.online, v.last_seen = True, now
        if online is False:
            v.online = False
        if telemetry:
            v.telemetry.update(telemetry)
            if telemetry.get("rssi_dbm") is not None:
                v.rssi_dbm = telemetry["rssi_dbm"]
            if telemetry.get("volume") is not None:
                v.volume = telemetry["volume"]
        try:
            if online is True:
                self.diagnoser.observe(ClusterOnline(cluster_id=cid, ts=now))
            elif online is False:
                self.diagnoser.observe(ClusterOffline(cluster_id=cid, ts=now, clean=clean))
            if telemetry:
                self.diagnoser.observe(ClusterTelemetry(cluster_id=cid, ts=now, fields=_diag_fields(telemetry)))
        except ValueError as e:
            log.warning("telemetry ignored", cluster=cid, error=str(e))
        self.publish_cluster(cid)
        if v.availability() != before:
            self.publish_health()

    def observe(self, obs) -> None:
        """Any other observation (strike, transmitter reading, note) into diagnosis."""
        self._clock_first()
        try:
            actions = self.diagnoser.observe(obs)
        except ValueError as e:
            log.warning("observation ignored", error=str(e))
            return
        if actions and self.devices:
            for a in actions:
                self.spawn(self.devices.protect(a), "tx-protect")

    def _clock_first(self) -> None:
        """Apply a wall-clock step before any observation stamped after it: otherwise, in the
        second before the guard's own poll, old stamps are judged against the new time (a
        burst of "silent for 3 h") and new ones are shifted once more by clock_stepped."""
        try:
            self.clock.poll()
        except Exception:
            log.exception("clock check failed")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._clock_first()
                self.diagnoser.observe(Tick(ts=time.time(), clock_synced=self.clock.synced))
            except Exception:
                log.exception("diagnosis tick failed")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.timing.health_interval_s)
            try:
                self.check_audio()
                self._check_disk()
                self.publish_health(force=True)
            except Exception:  # e.g. a full disk: the health report must outlive it
                log.exception("health check failed")

    # ---- gateway conditions ---------------------------------------------
    def check_audio(self) -> bool:
        ok = device_present(self.cfg.audio.device)
        if ok:
            self.alarms.clear("gateway.audio_device_missing", None, note="audio device present")
        elif not self.alarms.get("gateway.audio_device_missing"):
            which = self.cfg.audio.device or "default"
            self.alarms.raise_("gateway.audio_device_missing", None, "critical", "hardware", 0.9,
                               [f"audio output {which!r} not found; nothing can go on air"])
        return ok

    def _check_disk(self) -> None:
        from controller.sitestate import disk_free_mb

        free = disk_free_mb(self.state_dir)
        if free is None:
            return
        if free < self.cfg.storage.min_free_mb:
            if not self.alarms.get("gateway.storage_low"):
                self.alarms.raise_("gateway.storage_low", None, "major", "unknown", 1.0,
                                   [f"{free:.0f} MB free in {self.state_dir}"])
        elif self.alarms.get("gateway.storage_low") and not (self.daemon and self.daemon.storage_problem):
            self.alarms.clear("gateway.storage_low", None, note=f"{free:.0f} MB free")

    def on_audio_failure(self, reason: str | None) -> None:
        self.check_audio()
        log.error("audio output failed", reason=reason)

    def on_dead_air(self, b, dbfs: float, seconds: float) -> None:
        if not self.alarms.get("transmitter.dead_air"):
            self.alarms.raise_("transmitter.dead_air", None, "major", "unknown", 0.9, [
                f"on air with audio at {dbfs:.0f} dBFS for {seconds:.0f} s during {b.req.programme_id or b.id}",
                f"fallback: {self.cfg.audio.dead_air_fallback}"])

    def on_dead_air_cleared(self) -> None:
        if self.alarms.get("transmitter.dead_air"):
            self.alarms.clear("transmitter.dead_air", None, note="audio back above threshold")

    def _clock_alarm(self, synced: bool) -> None:
        if synced:
            self.alarms.clear("gateway.clock_unsynchronised", None, note="clock synchronised")
        elif not self.alarms.get("gateway.clock_unsynchronised"):
            self.alarms.raise_("gateway.clock_unsynchronised", None, "major", "unknown", 1.0,
                               ["system clock not synchronised (no NTP yet); scheduled programmes wait"])

    def _on_sync_change(self, synced: bool) -> None:
        self.scheduler.set_clock_synced(synced)
        self._clock_alarm(synced)
        self.publish_health()

    def _on_jump(self, delta: float) -> None:
        self.diagnoser.clock_stepped(delta)
        self.scheduler.on_clock_jump(delta)

    def _on_security(self, detail: dict) -> None:
        ev = [f"{detail.get('count', '?')} rejected commands ({detail.get('reason', detail.get('code', '?'))}) "
              f"in {int(detail.get('window_s', 600) / 60)} min"]
        if detail.get("last_request_id"):
            ev.append(f"last request id {detail['last_request_id']}")
        self.alarms.raise_("gateway.security", None, "major", "unknown", 0.8, ev)

    # ---- broadcasts -------------------------------------------------------
    async def _fire_programme(self, p, scheduled_at) -> None:
        targets, skipped = self.cfg.resolve_targets(p.targets)
        req = Request(priority=p.priority, source=p.source, targets=targets, skipped=skipped,
                      ordered_by="schedule", programme_id=p.id, title=p.title, volume=p.volume,
                      max_duration_s=p.max_duration_s, resume=p.resume, patience_s=p.misfire_grace_s,
                      scheduled_at=scheduled_at)
        self.submit(req)

    def submit(self, req: Request):
        return self.engine.submit(req)

    def _on_skip(self, b) -> None:
        self.runner.log_skipped(b)
        self.emit("broadcast.skipped", self.runner.body(b))

    async def ip_play(self, cid: str, url: str, volume: int, bid: str) -> tuple[bool, str]:
        if self.devices is None or self.devices.ip_link is None:
            return False, "no IP cluster link"
        r = await self.devices.ip_link.play(cid, url, volume, bid)
        return r.reached, r.reason

    async def ip_stop(self, cid: str) -> None:
        if self.devices and self.devices.ip_link:
            await self.devices.ip_link.stop(cid)

    async def _on_command(self, topic: str, payload: bytes) -> dict | None:
        return await self.gate.handle(topic, payload)


class _CentralView:
    """The uplink reads plain attributes; paths become strings."""

    def __init__(self, cfg: SiteConfig) -> None:
        c = cfg.central
        self.broker = c.broker
        self.client_id = c.client_id or f"loaxa-{cfg.site.id}"
        self.username = c.username
        self.password_file = str(c.password_file) if c.password_file else None
        self.ca_file = str(c.ca_file) if c.ca_file else None
        self.cert_file = str(c.cert_file) if c.cert_file else None
        self.key_file = str(c.key_file) if c.key_file else None
        self.protocol = c.protocol
        self.keepalive_s = c.keepalive_s


def _public_host(ms) -> str | None:
    if ms.public_url:
        from urllib.parse import urlsplit

        return urlsplit(ms.public_url).hostname
    return None if ms.bind in ("0.0.0.0", "::") else ms.bind


def diagnosis_settings(cfg: SiteConfig) -> DiagnosisSettings:
    """Site timing feeds the liveness thresholds unless the diagnosis section sets them."""
    d = cfg.diagnosis
    given = d.model_fields_set
    upd: dict = {}
    if "heartbeat_timeout_s" not in given:
        upd["heartbeat_timeout_s"] = cfg.timing.heartbeat_timeout_s
    if "settle_s" not in given:
        upd["settle_s"] = min(d.settle_s, cfg.timing.heartbeat_timeout_s)
    hb_default = DiagnosisSettings.model_fields["heartbeat_timeout_s"].default
    default_hyst = d.hysteresis == DiagnosisSettings().hysteresis  # (its validator marks it "set")
    if default_hyst and cfg.timing.heartbeat_timeout_s < hb_default:
        # short heartbeats (a test bench, a scenario) shorten the debounce windows alike
        k = cfg.timing.heartbeat_timeout_s / hb_default
        upd["hysteresis"] = {code: h.model_copy(update={"raise_after_s": h.raise_after_s * k,
                                                        "clear_after_s": h.clear_after_s * k})
                             if code.startswith("cluster.") else h
                             for code, h in d.hysteresis.items()}
    return d.model_copy(update=upd)


def _site_model(cfg: SiteConfig) -> SiteModel:
    infos = []
    for c in cfg.clusters:
        sub = c.subscription
        infos.append(ClusterInfo(
            id=c.id, kind=c.kind, zone=c.zone, power_feed=c.power_feed,
            expires_on=sub.expires_on if sub else None, impedance_ref_ohm=c.impedance_ref_ohm,
            monitored=c.monitored, enabled=c.enabled,
            subscription_ref=" ".join(x for x in (sub.provider, sub.msisdn) if x) if sub else None))
    return SiteModel(clusters=tuple(infos), timezone=cfg.site.timezone,
                     lightning_sensor=cfg.lightning_sensor is not None)


def _rssi_moved(old: float | None, new: float | None, step_db: float = 6.0) -> bool:
    if old is None or new is None:
        return old != new
    return abs(old - new) >= step_db


def _diag_fields(t: dict) -> dict:
    from controller.observations import TELEMETRY_FIELDS

    return {k: v for k, v in t.items() if k in TELEMETRY_FIELDS}

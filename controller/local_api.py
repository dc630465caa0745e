"""What the technician's commands ask the running daemon (the ControlApi of control.py)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf

from controller import __version__
from controller import config as C
from controller.commands import CommandError
from controller.contract import CLUSTER_CAUSES, rfc3339
from controller.control import ControlError
from controller.handlers import start_broadcast
from controller.observations import MaintenanceNote
from device_drivers.fm_addressing import addresses_from_site, plan_codes

if TYPE_CHECKING:
    from controller.runtime import Runtime

TEST_TONE_HZ = 1000.0
TEST_TONE_S = 4.0


class LocalApi:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def status(self) -> dict:
        rt = self.rt
        on_air = None
        for b in rt.engine.active.values():
            on_air = {"broadcast_id": b.id, "programme_id": b.req.programme_id, "title": b.req.title,
                      "priority": b.req.priority, "started_at": b.started_at, "targets": b.req.targets}
            if b.resources & {"@air"}:
                break
        return {
            "site": {"id": rt.cfg.site.id, "name": rt.cfg.site.name}, "version": __version__,
            "health": rt.site.health(clock_synced=rt.clock.synced, outbox_depth=rt.outbox.depth,
                                     outbox_dropped=rt.outbox.dropped_total),
            "central": {"connected": rt.uplink.connected.is_set(), "session": rt.uplink.session},
            "on_air": on_air, "alarms_active": len(rt.alarms.active()),
            "next": rt.scheduler.next_runs(3),
        }

    async def clusters(self, zone: str | None) -> list[dict]:
        rt = self.rt
        names = {z.id: z.name for z in rt.cfg.zones}
        if zone and zone not in names:
            raise ControlError("unknown_zone", f"no zone {zone}; zones: {', '.join(names)}")
        out = []
        for cid, v in rt.site.clusters.items():
            if zone and v.cfg.zone != zone:
                continue
            v.faults = [a["code"] for a in rt.alarms.for_cluster(cid)]
            out.append({**v.state(rt.site.tz), "zone_name": names.get(v.cfg.zone)})
        return out

    async def alarms(self) -> list[dict]:
        return self.rt.alarms.active()

    async def test_cluster(self, cluster_id: str) -> dict:
        rt = self.rt
        c = self._cluster(cluster_id)
        tone = self._tone_file()
        src = C.Source(media=C.MediaSource(path=tone))
        if c.kind == "ip":
            t0 = time.monotonic()
            try:
                r = start_broadcast(rt, priority="normal", source=src, targets=[c.id],
                                    ordered_by="local:test-cluster", title=f"test {c.id}",
                                    max_duration_s=TEST_TONE_S + 1, patience_s=0)
            except CommandError as e:
                raise ControlError(e.code, e.message) from None
            b = next((x for x in rt.engine.active.values() if x.id == r["broadcast_id"]), None)
            answered, reason = False, "broadcast did not start"
            if b is not None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not (b.reached or b.unreached) and b.state != "ended":
                    await asyncio.sleep(0.05)
                answered = c.id in b.reached
                reason = None if answered else next(
                    (u["reason"] for u in b.unreached if u["cluster"] == c.id), "no answer")
            v = rt.site.clusters[c.id]
            return {"cluster_id": c.id, "kind": "ip", "answered": answered,
                    "round_trip_ms": round((time.monotonic() - t0) * 1000, 1) if answered else None,
                    "reason": reason, "state": v.state(rt.site.tz)}
        spec = rt.fm_spec
        plan = plan_codes({c.id}, addresses_from_site([x for x in rt.cfg.clusters if x.kind == "fm"]))
        try:
            start_broadcast(rt, priority="normal", source=src, targets=[c.id], patience_s=0,
                            ordered_by="local:test-cluster", title=f"test {c.id}", max_duration_s=TEST_TONE_S + 1)
            reason = None
        except CommandError as e:
            reason = e.message
        return {"cluster_id": c.id, "kind": "fm", "address": c.fm.address, "method": spec.signalling,
                "wake_codes": plan.wake_codes(spec), "sleep_codes": plan.release_codes(spec),
                "tone_hz": TEST_TONE_HZ, "tone_s": TEST_TONE_S,
                "frequency_mhz": rt.cfg.transmitter.frequency_mhz,
                "return_channel": bool(c.monitored), "answered": None, "reason": reason}

    async def play(self, file: str | None, tts: str | None, targets: Any, priority: str, by: str) -> dict:
        rt = self.rt
        if (file is None) == (tts is None):
            raise ControlError("bad_request", "give a file or --tts text")
        if file is not None:
            if not Path(file).is_file():
                raise ControlError("file_not_found", f"the daemon cannot read {file}")
            src = C.Source(media=C.MediaSource(path=Path(file)))
        else:
            src = C.Source(tts=C.TtsSource(text=tts))
        before = {b.id for b in rt.engine.active.values()}
        try:
            r = start_broadcast(rt, priority=priority, source=src, targets=targets, ordered_by=by,
                                title=(Path(file).name if file else f"TTS: {tts[:40]}"))
        except CommandError as e:
            code = {"invalid_args": "unknown_cluster"}.get(e.code, e.code)
            raise ControlError(code, e.message) from None
        preempted = [x for x in before if x not in rt.engine.active]
        return {**r, "state": "started" if r["state"] == "on_air" else r["state"], "priority": priority,
                "preempted": preempted[0] if preempted else None}

    async def stop(self, broadcast_id: str | None) -> dict:
        rt = self.rt
        if broadcast_id and broadcast_id not in rt.engine.active and not any(
                b.id == broadcast_id for b in rt.engine.queue):
            raise ControlError("unknown_broadcast", f"no broadcast {broadcast_id} is playing")
        return {"stopped": rt.engine.stop(broadcast_id)}

    async def log(self, from_: str | None, to: str | None, type_: str | None, limit: int) -> list[dict]:
        events, _ = self.rt.outbox.query_log(from_ or "0000", to or "9999", type_, limit)
        return events

    async def broadcast_log(self, from_: str | None, to: str | None) -> list[dict]:
        rows = self.rt.store.conn.execute(
            "SELECT broadcast_id, programme_id, title, priority, source, ordered_by, targets, reached, "
            "unreached, started_at, ended_at, outcome FROM broadcast_log "
            "WHERE COALESCE(started_at,'') >= ? AND COALESCE(started_at,'') <= ? ORDER BY started_at",
            (from_ or "", to or "9999")).fetchall()
        out = []
        for r in rows:
            d = dict(zip(("broadcast_id", "programme_id", "title", "priority", "source", "ordered_by", "targets",
                          "reached", "unreached", "started_at", "ended_at", "outcome"), r, strict=True))
            for k in ("targets", "reached", "unreached"):
                d[k] = json.loads(d[k] or "[]")
            d["outcome"] = "playing" if d["outcome"] == "on_air" else d["outcome"]
            out.append(d)
        return out

    async def note(self, cluster_id: str, status: str, cause: str | None, text: str | None, by: str) -> dict:
        rt = self.rt
        c = self._cluster(cluster_id)
        if status not in ("damaged", "repaired", "note"):
            raise ControlError("bad_request", "status must be damaged, repaired or note")
        if cause is not None and cause not in CLUSTER_CAUSES:
            raise ControlError("bad_request", f"cause must be one of {', '.join(CLUSTER_CAUSES)}")
        now = time.time()
        ts = rfc3339()
        rt.db_write("INSERT INTO maintenance_notes(cluster_id, status, cause, text, by, ts) VALUES(?,?,?,?,?,?)",
                    (c.id, status, cause, text, by, ts))
        rt.observe(MaintenanceNote(cluster_id=c.id, ts=now, status=status, cause=cause, text=text or "", by=by))
        rt.publish_cluster(c.id)
        return {"cluster_id": c.id, "status": status, "cause": cause, "text": text, "by": by, "ts": ts}

    # ---- helpers ---------------------------------------------------------
    def _cluster(self, cid: str) -> C.Cluster:
        try:
            return self.rt.cfg.cluster(cid)
        except StopIteration:
            raise ControlError("unknown_cluster", f"no cluster {cid}") from None

    def _tone_file(self) -> Path:
        p = self.rt.state_dir / "test-tone.wav"
        if not p.exists():
            rate = self.rt.cfg.audio.sample_rate
            t = np.arange(int(TEST_TONE_S * rate)) / rate
            sf.write(str(p), (0.3 * np.sin(2 * np.pi * TEST_TONE_HZ * t)).astype(np.float32), rate)
        return p

"""One broadcast from start to finish: audio ready, clusters woken, on air, released, logged.

The engine decides *whether* a broadcast runs; this decides nothing about priority.
Order of work keeps the listener in mind: the carrier comes up with a pre-roll so
receivers wake, the wake codes go out for exactly the targets, IP clusters get a
tokenised URL on our media server, then the programme plays. Whatever ends it
(finish, stop, preemption, audio failure, dead air), the transmitter is not left
radiating silence and the regulator's log gets one row.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
import structlog

from controller.engine import Broadcast
from device_drivers import fm_signalling
from device_drivers.fm_addressing import addresses_from_site, plan_codes

if TYPE_CHECKING:
    from controller.runtime import Runtime

log = structlog.get_logger("loaxa.broadcast")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


PREPARE_MARGIN_S = 1.5  # TTS synthesis / media decoding / stream connect before a scheduled start
IP_START_LATENCY_S = 0.3  # command -> first sample on a 4G cluster (fetch and decode), typical


class DeadAir(Exception):
    pass


class BroadcastRunner:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.fm_awake: set[str] = set()  # FM clusters whose amplifiers we switched on

    # ---- the engine calls this ----------------------------------------
    async def __call__(self, b: Broadcast) -> None:
        rt, req = self.rt, b.req
        fm_ids = {c.id for c in rt.cfg.clusters if c.kind == "fm"}
        fm = [t for t in req.targets if t in fm_ids]
        ip = [t for t in req.targets if t not in fm_ids]
        b.reached, b.unreached = [], [{"cluster": c, "reason": "disabled"} for c in req.skipped]
        b.started_at, b.ended_at = now_iso(), None
        self._log_start(b)
        media_urls: list[str] = []
        carrier_up = False
        rds_alarm = False
        # synthesis/decoding runs while the carrier comes up and receivers wake
        prep = asyncio.ensure_future(self._prepare(b))
        try:
            if fm:
                carrier_up = await self._carrier(True, b)
                if req.priority == "emergency" and rt.rds is not None:
                    rds_alarm = await rt.rds.emergency_on(req.title or "Canh bao khan cap")
            audio = await prep
            prefix, release = self._fm_codes(b, fm) if fm else (None, None)
            if fm:
                if carrier_up or rt.tx is None or rt.tx.reachable:
                    b.reached += fm
                else:
                    b.unreached += [{"cluster": c, "reason": "transmitter not answering"} for c in fm]
            if await self._align(b, prefix):
                b.started_at = now_iso()  # the log records when it went on air, not when it fired
                rt.db_write("UPDATE broadcast_log SET started_at=? WHERE broadcast_id=?", (b.started_at, b.id))
            if ip and not isinstance(audio, np.ndarray):
                from controller.streams import LiveOggStream

                b.ip_stream = LiveOggStream(rate=rt.cfg.audio.sample_rate)  # fed by the playout tee
            # the air never waits for 4G acknowledgements: IP clusters are told in parallel
            # a scheduled programme starts on its second on IP clusters too: they begin after the
            # wake codes the FM air plays first (an unscheduled one goes out at once)
            hold = 0.0
            if b.req.scheduled_at is not None and prefix is not None:
                hold = max(0.0, len(prefix) / rt.cfg.audio.sample_rate - IP_START_LATENCY_S)
            ip_task = asyncio.ensure_future(self._start_ip(b, ip, audio, media_urls, hold)) if ip else None
            if fm:
                for c in b.reached:
                    rt.set_cluster_playing(c, req.programme_id or b.id)
                play = asyncio.ensure_future(self._play(b, audio, prefix, need_air=True))
                await self._announce(b, ip_task)
                try:
                    await play
                except DeadAir:
                    # fallback "release": the receivers are switched off, not left on for the next one
                    if release is not None and len(release) and await self._play_release(release):
                        self.fm_awake -= set(fm)
                    raise
                finally:
                    if not play.done():
                        play.cancel()
                if release is not None and len(release) and await self._play_release(release):
                    self.fm_awake -= set(fm)
            else:
                await self._announce(b, ip_task)
                await self._play(b, audio, None, need_air=False)
        except asyncio.CancelledError:
            prep.cancel()
            raise
        except DeadAir as e:
            b.outcome, b.reason = "failed", str(e)
        except Exception as e:
            log.exception("broadcast failed", broadcast=b.id)
            b.outcome, b.reason = "failed", f"{type(e).__name__}: {e}"
        finally:
            await asyncio.shield(self._finish(b, fm, ip, media_urls, carrier_up, rds_alarm))

    async def _align(self, b: Broadcast, prefix: np.ndarray | None) -> bool:
        """A scheduled programme fired early (EarlyTrigger): hold the wake codes so that the
        programme itself begins on its scheduled second. True if it waited."""
        if b.req.scheduled_at is None:
            return False
        prefix_s = len(prefix) / self.rt.cfg.audio.sample_rate if prefix is not None else 0.0
        delay = b.req.scheduled_at.timestamp() - prefix_s - time.time()
        if 0 < delay < 60:
            await asyncio.sleep(delay)
            return True
        return False

    def lead_s(self, p) -> float:
        """How early a scheduled programme must fire: preparation, carrier pre-roll, codes."""
        rt = self.rt
        targets, _ = rt.cfg.resolve_targets(p.targets)
        fm = [t for t in targets if t in rt.engine.fm_clusters]
        lead = PREPARE_MARGIN_S
        if fm and rt.fm_spec is not None:
            if rt.cfg.transmitter.carrier == "on_demand":
                lead += rt.cfg.transmitter.preroll_s
            try:
                addrs = addresses_from_site([c for c in rt.cfg.clusters if c.kind == "fm"])
                lead += plan_codes(set(fm), addrs).signalling_time_s(rt.fm_spec)
            except ValueError:
                pass
        return lead

    async def _announce(self, b: Broadcast, ip_task: asyncio.Future | None) -> None:
        """broadcast.started once every target's fate is known (IP acks are bounded)."""
        if ip_task is not None:
            try:
                await ip_task
            except Exception as e:
                log.error("IP clusters not started", error=str(e))
            for c in b.reached:
                self.rt.set_cluster_playing(c, b.req.programme_id or b.id)
        self._emit(b, "broadcast.started")

    # ---- audio ---------------------------------------------------------
    async def _prepare(self, b: Broadcast) -> np.ndarray | AsyncIterator[np.ndarray]:
        rt, src = self.rt, b.req.source
        rate = rt.cfg.audio.sample_rate
        max_frames = int(b.req.max_duration_s * rate)
        if src.tts is not None:
            x = await rt.tts.synthesize(src.tts.text, src.tts.voice or rt.cfg.audio.tts_voice)
        elif src.media is not None:
            if src.media.url:
                from controller.media import fetch_verified

                path = await fetch_verified(src.media.url, src.media.sha256, rt.media_cache_dir)
            else:
                path = src.media.path
            x = await rt.assets.load_async(path, src.media.sha256)
        elif src.stream is not None:
            from controller.streams import relay_blocks

            return _limit(relay_blocks(src.stream.url, rate=rate), max_frames)
        else:
            from controller.streams import live_input_blocks

            dev = (src.live.input if src.live else None) or rt.cfg.audio.live_input
            return _limit(live_input_blocks(dev, rate=rate), max_frames)
        start = int(b.req.offset_s * rate)
        return np.ascontiguousarray(x[start:start + max_frames], dtype=np.float32)

    async def _play(self, b: Broadcast, audio, prefix: np.ndarray | None, *, need_air: bool) -> None:
        rt = self.rt
        rate = rt.cfg.audio.sample_rate
        quiet_since: list[float | None] = [None]
        limit_s = rt.cfg.audio.dead_air_s
        floor = rt.cfg.audio.dead_air_dbfs
        programme_starts = [None]
        prefix_s = (len(prefix) / rate) if prefix is not None else 0.0

        def on_started(t_mono: float) -> None:
            programme_starts[0] = t_mono + prefix_s
            wall_at = time.time() + (t_mono - time.monotonic())
            # one line per broadcast: bench/broadcast_timing.py reads when the air got it
            log.info("on air", broadcast=b.id, priority=b.req.priority, first_sample_at=round(wall_at, 4),
                     wake_codes_s=round(prefix_s, 3),
                     scheduled_at=b.req.scheduled_at.timestamp() if b.req.scheduled_at else None)

        def on_level(dbfs: float) -> None:
            t = time.monotonic()
            if programme_starts[0] is None or t < programme_starts[0]:
                return
            if dbfs < floor:
                quiet_since[0] = quiet_since[0] or t
                if t - quiet_since[0] >= limit_s:
                    rt.on_dead_air(b, dbfs, t - quiet_since[0])
                    rt.player.stop()
                    b.reason = f"dead air: below {floor:g} dBFS for {limit_s:g} s"
            else:
                if quiet_since[0] is not None:
                    rt.on_dead_air_cleared()
                quiet_since[0] = None

        if isinstance(audio, np.ndarray):
            source = audio if prefix is None else np.concatenate([prefix, audio])
        else:
            source = _chain(prefix, audio)
            if b.ip_stream is not None:
                source = b.ip_stream.tee(source)
        if not need_air:
            # IP-only: nothing goes through the transmitter; wait for the programme to run out
            await _drain(source, rate)
            return
        res = await rt.player.play(source, broadcast_id=b.id, on_started=on_started, on_level=on_level)
        b.played_s = res.duration_s
        if b.reason and b.reason.startswith("dead air"):
            raise DeadAir(b.reason)
        if res.outcome == "failed":
            rt.on_audio_failure(res.reason)
            raise RuntimeError(f"audio output failed: {res.reason}")

    async def _play_release(self, release: np.ndarray) -> bool:
        """True once the release codes are on air (only then are the receivers off)."""
        try:
            res = await self.rt.player.play(release, broadcast_id=None)
        except Exception as e:  # the programme is over; a failed release is logged, not fatal
            log.warning("release codes not played", error=str(e))
            return False
        return res.outcome == "finished"

    # ---- FM clusters ---------------------------------------------------
    def _fm_codes(self, b: Broadcast, fm: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Wake audio for exactly `fm` (switching off leftovers first), and release audio."""
        rt = self.rt
        rate = rt.cfg.audio.sample_rate
        spec = rt.fm_spec
        addrs = addresses_from_site([c for c in rt.cfg.clusters if c.kind == "fm"])
        leftovers = self.fm_awake - set(fm)
        vol = None
        if b.req.volume is not None and spec.codes.volume is not None:
            vol = min(spec.volume_levels - 1, round(b.req.volume / 100 * (spec.volume_levels - 1)))
        plan = plan_codes(set(fm), addrs)
        off_plan = plan_codes(leftovers, addrs) if leftovers else None
        self.fm_awake = set(fm)
        if spec.signalling == "rds":
            msgs = (fm_signalling.rds_release(off_plan, spec) if off_plan else []) + \
                fm_signalling.rds_wake(plan, spec, vol)
            rt.spawn(rt.rds.send_timed(msgs) if rt.rds else _noop(), "rds-wake")
            b.fm_release_msgs = fm_signalling.rds_release(plan, spec)
            return None, None
        parts = []
        if off_plan:
            parts.append(fm_signalling.release_audio(off_plan, spec, rate))
        parts.append(fm_signalling.wake_audio(plan, spec, rate, vol))
        return np.concatenate(parts), fm_signalling.release_audio(plan, spec, rate)

    async def _carrier(self, on: bool, b: Broadcast | None = None) -> bool:
        rt = self.rt
        if rt.tx is None:
            return False
        if on:
            was_on = rt.tx.carrier_on
            ok = await rt.tx.carrier(True)
            preroll = rt.cfg.transmitter.preroll_s
            if b is not None and b.req.priority == "emergency" and rt.fm_spec is not None:
                # an emergency waits only as long as the receivers need to wake
                preroll = min(preroll, rt.fm_spec.wake_delay_ms / 1000 + 0.1)
            if ok and not was_on and preroll > 0:
                await asyncio.sleep(preroll)
            return ok
        if rt.cfg.transmitter.carrier == "always":
            return True
        return await rt.tx.carrier(False)

    # ---- IP clusters ---------------------------------------------------
    async def _start_ip(self, b: Broadcast, ip: list[str], audio, media_urls: list[str],
                        hold_s: float = 0.0) -> None:
        rt = self.rt
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        ttl = b.req.max_duration_s + 600
        if isinstance(audio, np.ndarray):
            path = await asyncio.to_thread(self._write_ogg, b.id, audio)
            url = rt.media_server.register(path, ttl)
        else:
            url = rt.media_server.register(b.ip_stream, ttl)
        media_urls.append(url)
        vol = b.req.volume if b.req.volume is not None else 80
        results = await asyncio.gather(*(self._ip_play_one(c, url, vol, b.id) for c in ip))
        for c, (ok, reason) in zip(ip, results, strict=True):
            if ok:
                b.reached.append(c)
            else:
                b.unreached.append({"cluster": c, "reason": reason})

    async def _ip_play_one(self, cid: str, url: str, vol: int, bid: str) -> tuple[bool, str]:
        """A cluster known to be offline is not waited for (an emergency must not stall)."""
        v = self.rt.site.clusters.get(cid)
        task = asyncio.ensure_future(self.rt.ip_play(cid, url, vol, bid))
        if v is not None and v.online is False:
            self.rt.spawn(_swallow(task), f"ip-play-{cid}")
            return False, "offline (no sign of life since " + (
                time.strftime("%H:%M:%S", time.localtime(v.last_seen)) if v.last_seen else "start") + ")"
        return await task

    def _write_ogg(self, bid: str, audio: np.ndarray) -> str:
        d = self.rt.media_tmp_dir
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{bid}.ogg"
        sf.write(str(path), audio, self.rt.cfg.audio.sample_rate, format="OGG", subtype="VORBIS")
        return str(path)

    # ---- the end -------------------------------------------------------
    async def _finish(self, b: Broadcast, fm, ip, media_urls, carrier_up, rds_alarm) -> None:
        rt = self.rt
        preemptor = rt.engine.active.get(b.preempted_by) if b.preempted_by else None
        taken = set(preemptor.req.targets) if preemptor else set()
        try:
            if fm and not preemptor:
                if b.fm_release_msgs and rt.rds:
                    await rt.rds.send_timed(b.fm_release_msgs)
                    self.fm_awake -= set(fm)
                # DTMF receivers whose release codes never went on air (stopped, failed) stay in
                # fm_awake: the next broadcast switches them off before waking its own targets
                if carrier_up and not any(x is not b and set(x.req.targets) & {c.id for c in rt.cfg.clusters if c.kind == "fm"}
                                          for x in rt.engine.active.values()):
                    await self._carrier(False)
            if rds_alarm and rt.rds and not (preemptor and preemptor.req.priority == "emergency"):
                await rt.rds.emergency_off()
            for c in ip:
                if c not in taken:
                    rt.spawn(rt.ip_stop(c), f"ip-stop-{c}")
            if b.ip_stream is not None:
                b.ip_stream.close()
            for u in media_urls:
                rt.media_server.revoke(u)
            p = rt.media_tmp_dir / f"{b.id}.ogg"
            p.unlink(missing_ok=True)
        except Exception:
            log.exception("broadcast clean-up failed", broadcast=b.id)
        finally:
            for c in fm + ip:
                if c not in taken:
                    rt.set_cluster_playing(c, None)
            b.ended_at = now_iso()
            outcome = b.outcome or ("stopped" if b.reason else "finished")
            if b.outcome is None and b.task is not None and b.task.cancelled():
                outcome = "stopped"
            etype = {"finished": "broadcast.finished", "preempted": "broadcast.preempted",
                     "stopped": "broadcast.finished", "failed": "broadcast.failed"}.get(outcome, "broadcast.finished")
            self._log_end(b, outcome)
            self._emit(b, etype, outcome=outcome)

    # ---- records -------------------------------------------------------
    def body(self, b: Broadcast, **extra: Any) -> dict:
        req = b.req
        return {
            "broadcast_id": b.id, "programme_id": req.programme_id, "title": req.title,
            "priority": req.priority, "source": req.source.kind, "ordered_by": req.ordered_by,
            "targets": list(req.targets) + list(req.skipped),
            "reached": list(b.reached), "unreached": list(b.unreached),
            "started_at": b.started_at, "ended_at": b.ended_at,
            **({"reason": b.reason} if b.reason else {}),
            **({"preempted_by": b.preempted_by} if b.preempted_by else {}),
            **extra,
        }

    def _emit(self, b: Broadcast, etype: str, **extra: Any) -> None:
        self.rt.emit(etype, self.body(b, **extra))

    def _log_start(self, b: Broadcast) -> None:
        req = b.req
        self.rt.db_write(
            "INSERT OR REPLACE INTO broadcast_log(broadcast_id, programme_id, title, priority, source, "
            "ordered_by, targets, started_at, outcome) VALUES(?,?,?,?,?,?,?,?,?)",
            (b.id, req.programme_id, req.title, req.priority, req.source.kind, req.ordered_by,
             json.dumps(list(req.targets) + list(req.skipped)), b.started_at, "on_air"))

    def log_skipped(self, b: Broadcast) -> None:
        """A programme that never went on air still belongs in the log, with the reason."""
        req = b.req
        at = req.scheduled_at.astimezone(dt.UTC).isoformat() if req.scheduled_at else now_iso()
        self.rt.db_write(
            "INSERT OR REPLACE INTO broadcast_log(broadcast_id, programme_id, title, priority, source, "
            "ordered_by, targets, started_at, ended_at, outcome) VALUES(?,?,?,?,?,?,?,?,?,?)",
            (b.id, req.programme_id, req.title, req.priority, req.source.kind, req.ordered_by,
             json.dumps(list(req.targets) + list(req.skipped)), at, at, f"skipped: {b.reason}"))

    def _log_end(self, b: Broadcast, outcome: str) -> None:
        self.rt.db_write(
            "UPDATE broadcast_log SET reached=?, unreached=?, ended_at=?, outcome=? WHERE broadcast_id=?",
            (json.dumps(b.reached), json.dumps(b.unreached), b.ended_at,
             outcome + (f": {b.reason}" if b.reason and outcome != "finished" else ""), b.id))


async def _swallow(task: asyncio.Future) -> None:
    try:
        await task
    except Exception:
        pass


async def _noop() -> None:
    return None


async def _chain(prefix: np.ndarray | None, it: AsyncIterator[np.ndarray]) -> AsyncIterator[np.ndarray]:
    if prefix is not None and len(prefix):
        yield prefix
    async for block in it:
        yield block


async def _limit(it: AsyncIterator[np.ndarray], max_frames: int) -> AsyncIterator[np.ndarray]:
    n = 0
    async for block in it:
        if n + len(block) >= max_frames:
            yield block[: max_frames - n]
            return
        n += len(block)
        yield block


async def _drain(source, rate: int) -> None:
    """Let an IP-only programme run for its real duration."""
    if isinstance(source, np.ndarray):
        await asyncio.sleep(len(source) / rate)
        return
    t0, frames = time.monotonic(), 0
    async for block in source:  # paced like the air would be, so IP clusters get real time
        frames += len(block)
        ahead = frames / rate - (time.monotonic() - t0)
        if ahead > 0.2:
            await asyncio.sleep(ahead - 0.1)

"""Programmes from the site file and the central server, fired by APScheduler 3.

In-memory job store only (rebuilt from config + database at start; no pickles).
Misfire grace is explicit per programme (APScheduler's 1 s default silently drops
runs on a loaded Pi) and every run missed beyond it becomes `broadcast.skipped`.
Until the clock is trusted the scheduler is paused; a wall-clock jump rebuilds
the jobs from "now" so nothing fires in a burst.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import structlog
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger

from controller.config import Programme, SiteConfig
from controller.store import Store

log = structlog.get_logger("loaxa.scheduler")

Fire = Callable[[Programme, dt.datetime | None], Awaitable[None]]
Emit = Callable[..., object]


class ProgrammeScheduler:
    def __init__(self, cfg: SiteConfig, store: Store, fire: Fire, emit: Emit) -> None:
        self.cfg = cfg
        self.store = store
        self.fire = fire
        self.emit = emit
        self.tz = ZoneInfo(cfg.site.timezone)
        self.sched = AsyncIOScheduler(jobstores={"default": MemoryJobStore()}, timezone=self.tz)
        self.sched.add_listener(self._on_missed, EVENT_JOB_MISSED)
        self.clock_synced = False
        self._rebuilding = False
        self._unsynced_since: dt.datetime | None = None

    # ---- programmes -----------------------------------------------------
    def central_programmes(self) -> list[Programme]:
        rows = self.store.conn.execute("SELECT payload FROM central_schedule ORDER BY programme_id").fetchall()
        out = []
        for (payload,) in rows:
            try:
                out.append(Programme.model_validate(json.loads(payload)))
            except ValueError as e:  # a stored row from an older version: keep going
                log.error("stored central programme unreadable", error=str(e))
        return out

    def programmes(self) -> dict[str, Programme]:
        progs = {p.id: p for p in self.cfg.programmes}
        for p in self.central_programmes():
            progs[p.id] = p  # the central server's copy wins
        return progs

    def put(self, p: Programme) -> None:
        self.store.conn.execute(
            "INSERT INTO central_schedule(programme_id, payload, updated_at) VALUES(?,?,?) "
            "ON CONFLICT(programme_id) DO UPDATE SET payload=excluded.payload, updated_at=excluded.updated_at",
            (p.id, p.model_dump_json(exclude_none=True), dt.datetime.now(dt.UTC).isoformat()),
        )
        self.rebuild()

    def delete(self, programme_id: str) -> bool:
        cur = self.store.conn.execute("DELETE FROM central_schedule WHERE programme_id=?", (programme_id,))
        self.rebuild()
        return cur.rowcount > 0

    # ---- lifecycle ------------------------------------------------------
    def start(self, clock_synced: bool) -> None:
        self.clock_synced = clock_synced
        self.sched.start(paused=not clock_synced)
        self.rebuild()

    def shutdown(self) -> None:
        if self.sched.running:
            self.sched.shutdown(wait=False)

    def set_clock_synced(self, synced: bool) -> None:
        self.clock_synced = synced
        if synced:
            since, self._unsynced_since = self._unsynced_since, None
            if since is not None:
                self._report_missed(since, dt.datetime.now(self.tz))
            # the clock just became trustworthy: compute every next run from the true now
            self.rebuild()
            self.sched.resume()
        else:
            # remembered only if the clock was trustworthy when it was lost
            self._unsynced_since = dt.datetime.now(self.tz)
            self.sched.pause()

    def _report_missed(self, since: dt.datetime, until: dt.datetime) -> None:
        """Runs that fell due while the clock was untrusted did not play: say so (≤ 1 day)."""
        from controller.conflicts import occurrences

        since = max(since, until - dt.timedelta(days=1))
        for p in self.programmes().values():
            for t in occurrences(p, self.tz, since, until)[:50]:
                self._skip(p, t, "clock not synchronised")

    def on_clock_jump(self, delta_s: float) -> None:
        log.warning("rebuilding schedule after clock jump", seconds=round(delta_s))
        self.rebuild()

    def reload(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.tz = ZoneInfo(cfg.site.timezone)
        self.rebuild()

    def rebuild(self) -> None:
        """Drop every job and add them again from now: no pile-up of missed runs."""
        self._rebuilding = True
        try:
            self.sched.remove_all_jobs()
            now = dt.datetime.now(self.tz)
            for p in self.programmes().values():
                if p.schedule is None:
                    continue
                if p.schedule.cron:
                    m, h, dom, mon, dow = p.schedule.cron.split()
                    trig = CronTrigger(minute=m, hour=h, day=dom, month=mon, day_of_week=dow,
                                       start_date=p.valid_from, end_date=p.valid_until, timezone=self.tz)
                    self._add(p, trig, p.id)
                else:
                    for i, at in enumerate(p.schedule.at or []):
                        at = at if at.tzinfo else at.replace(tzinfo=self.tz)
                        if at + dt.timedelta(seconds=p.misfire_grace_s) < now or not _valid(p, at):
                            continue
                        self._add(p, DateTrigger(run_date=at, timezone=self.tz), f"{p.id}@{i}")
        finally:
            self._rebuilding = False

    def _add(self, p: Programme, trigger, job_id: str) -> None:
        self.sched.add_job(
            self._run, trigger=trigger, id=job_id, args=[p.id], name=p.title,
            misfire_grace_time=int(max(1, p.misfire_grace_s)), coalesce=True, max_instances=3,
            replace_existing=True,
        )

    def next_runs(self, limit: int = 10) -> list[dict]:
        jobs = sorted((j for j in self.sched.get_jobs() if j.next_run_time), key=lambda j: j.next_run_time)
        return [{"programme_id": j.args[0], "at": j.next_run_time.isoformat()} for j in jobs[:limit]]

    async def _run(self, programme_id: str) -> None:
        p = self.programmes().get(programme_id)
        if p is None:
            return
        if not self.clock_synced:
            self._skip(p, None, "clock not synchronised")
            return
        scheduled = self._scheduled_time(p)
        try:
            await self.fire(p, scheduled)
        except Exception:
            log.exception("programme failed to start", programme=programme_id)

    def _scheduled_time(self, p: Programme) -> dt.datetime | None:
        """The run being executed: the first fire time not older than the grace."""
        now = dt.datetime.now(self.tz)
        if p.schedule and p.schedule.cron:
            trig = CronTrigger.from_crontab(p.schedule.cron, timezone=self.tz)
            return trig.get_next_fire_time(None, now - dt.timedelta(seconds=p.misfire_grace_s))
        past = [a if a.tzinfo else a.replace(tzinfo=self.tz) for a in (p.schedule.at or [])] if p.schedule else []
        past = [a for a in past if a <= now]
        return max(past) if past else None

    def _on_missed(self, ev: JobExecutionEvent) -> None:
        if self._rebuilding:
            return
        pid = ev.job_id.split("@", 1)[0]
        p = self.programmes().get(pid)
        if p is None:
            return
        reason = ("clock not synchronised" if not self.clock_synced
                  else f"missed by more than its grace of {p.misfire_grace_s:g} s")
        self._skip(p, ev.scheduled_run_time, reason)

    def _skip(self, p: Programme, scheduled: dt.datetime | None, reason: str) -> None:
        log.warning("programme skipped", programme=p.id, reason=reason)
        self.emit("broadcast.skipped", {
            "broadcast_id": None, "programme_id": p.id, "priority": p.priority,
            "source": p.source.kind, "targets": self.cfg.resolve_targets(p.targets)[0],
            "reached": [], "unreached": [], "started_at": None, "ended_at": None,
            "reason": reason, "scheduled_at": scheduled.isoformat() if scheduled else None,
        })


def _valid(p: Programme, at: dt.datetime) -> bool:
    def aware(x: dt.datetime | None) -> dt.datetime | None:
        return x if x is None or x.tzinfo else x.replace(tzinfo=dt.UTC)
    vf, vu = aware(p.valid_from), aware(p.valid_until)
    return (vf is None or at >= vf) and (vu is None or at <= vu)

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
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger

from controller.config import Programme, SiteConfig
from controller.store import Store

log = structlog.get_logger("loaxa.scheduler")

Fire = Callable[[Programme, dt.datetime | None], Awaitable[None]]
Emit = Callable[..., object]
Lead = Callable[[Programme], float]


class EarlyTrigger(BaseTrigger):
    """Fires `lead_s` before the inner trigger, so that carrier pre-roll and wake codes are
    done when the programme is due: the listener hears it on the scheduled second."""

    def __init__(self, inner: BaseTrigger, lead_s: float) -> None:
        self.inner = inner
        self.lead = dt.timedelta(seconds=lead_s)

    def get_next_fire_time(self, previous_fire_time, now):
        prev = previous_fire_time + self.lead if previous_fire_time else None
        # from `now`, not now + lead: a job added inside the lead window (a reload, a clock
        # fix) gets a fire time just past, which runs at once rather than tomorrow
        # and never before the run just fired (CronTrigger would hand the same run back)
        t = self.inner.get_next_fire_time(prev, max(now, prev + dt.timedelta(microseconds=1)) if prev else now)
        return t - self.lead if t else None

    def __str__(self) -> str:
        return f"early[{self.lead.total_seconds():g}s]({self.inner})"


class ProgrammeScheduler:
    def __init__(self, cfg: SiteConfig, store: Store, fire: Fire, emit: Emit,
                 lead: Lead | None = None) -> None:
        self.lead = lead or (lambda p: 0.0)
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
                    self._add(p, EarlyTrigger(trig, self.lead(p)), p.id)
                else:
                    for i, at in enumerate(p.schedule.at or []):
                        at = at if at.tzinfo else at.replace(tzinfo=self.tz)
                        if at + dt.timedelta(seconds=p.misfire_grace_s) < now or not _valid(p, at):
                            continue
                        early = at - dt.timedelta(seconds=self.lead(p))
                        self._add(p, DateTrigger(run_date=max(early, now), timezone=self.tz), f"{p.id}@{i}")
        finally:
            self._rebuilding = False

    def _add(self, p: Programme, trigger, job_id: str) -> None:
        self.sched.add_job(
            self._run, trigger=trigger, id=job_id, args=[p.id], name=p.title,
            misfire_grace_time=int(max(1, p.misfire_grace_s)), coalesce=True, max_instances=3,
            replace_existing=True,
        )

    def next_runs(self, limit: int = 10) -> list[dict]:
        """The programmes' own times (jobs fire a little earlier, see EarlyTrigger)."""
        jobs = sorted((j for j in self.sched.get_jobs() if j.next_run_time), key=lambda j: j.next_run_time)
        out = []
        for j in jobs[:limit]:
            lead = j.trigger.lead if isinstance(j.trigger, EarlyTrigger) else dt.timedelta(0)
            p = self.programmes().get(j.args[0])
            if p is not None and p.schedule and p.schedule.at and not isinstance(j.trigger, EarlyTrigger):
                lead = dt.timedelta(seconds=self.lead(p))
            out.append({"programme_id": j.args[0], "at": (j.next_run_time + lead).isoformat()})
        return out

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
        """The programme time of the run being executed: the job fired `lead` early, maybe
        up to the grace late, so it is the first programme time after now + lead - grace."""
        lead = dt.timedelta(seconds=self.lead(p))
        after = dt.datetime.now(self.tz) + lead - dt.timedelta(seconds=p.misfire_grace_s)
        if p.schedule and p.schedule.cron:
            trig = CronTrigger.from_crontab(p.schedule.cron, timezone=self.tz)
            return trig.get_next_fire_time(None, after)
        times = [a if a.tzinfo else a.replace(tzinfo=self.tz) for a in (p.schedule.at or [])] if p.schedule else []
        times = sorted(a for a in times if a >= after)
        return times[0] if times else None

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

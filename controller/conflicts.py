"""Same-priority programmes that would collide on a cluster are a planning error.

Arbitration would silently drop one of them at air time; better to tell the
technician (check-config) or the central operator (schedule.put) now.
"""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from controller.config import Programme, SiteConfig

HORIZON_DAYS = 14


def occurrences(p: Programme, tz: ZoneInfo, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    if not p.schedule:
        return []
    if p.schedule.at:
        out = []
        for at in p.schedule.at:
            at = at if at.tzinfo else at.replace(tzinfo=tz)
            if start <= at < end:
                out.append(at)
        return out
    from apscheduler.triggers.cron import CronTrigger

    trig = CronTrigger.from_crontab(p.schedule.cron, timezone=tz)
    out, prev, t = [], None, start
    while len(out) < 2000:
        t = trig.get_next_fire_time(prev, t)
        if t is None or t >= end:
            break
        out.append(t)
        prev, t = t, t + dt.timedelta(seconds=1)
    return out


def schedule_conflicts(cfg: SiteConfig, programmes: list[Programme] | None = None,
                       now: dt.datetime | None = None) -> list[str]:
    """Human-readable conflicts between programmes of equal priority sharing a cluster."""
    progs = programmes if programmes is not None else cfg.programmes
    tz = ZoneInfo(cfg.site.timezone)
    now = now or dt.datetime.now(tz)
    end = now + dt.timedelta(days=HORIZON_DAYS)
    windows = {}
    targets = {}
    for p in progs:
        windows[p.id] = [(t, t + dt.timedelta(seconds=p.max_duration_s)) for t in occurrences(p, tz, now, end)]
        targets[p.id] = set(cfg.resolve_targets(p.targets)[0]) if _resolvable(cfg, p) else set()
    out = []
    for i, a in enumerate(progs):
        for b in progs[i + 1:]:
            if a.priority != b.priority:
                continue
            shared = targets[a.id] & targets[b.id]
            if not shared:
                continue
            hit = _first_overlap(windows[a.id], windows[b.id])
            if hit:
                out.append(
                    f"programmes {a.id} and {b.id} (both {a.priority}) overlap on "
                    f"{len(shared)} cluster(s) ({', '.join(sorted(shared)[:5])}) at {hit:%Y-%m-%d %H:%M}"
                )
    return out


def conflicting_ids(cfg: SiteConfig, new: Programme, existing: list[Programme]) -> list[str]:
    others = [p for p in existing if p.id != new.id]
    ids = []
    for p in others:
        if schedule_conflicts(cfg, [p, new]):
            ids.append(p.id)
    return ids


def _resolvable(cfg: SiteConfig, p: Programme) -> bool:
    known = {z.id for z in cfg.zones} | {c.id for c in cfg.clusters}
    return p.targets == "all" or all(t in known for t in p.targets)


def _first_overlap(a: list, b: list) -> dt.datetime | None:
    i = j = 0
    while i < len(a) and j < len(b):
        (s1, e1), (s2, e2) = a[i], b[j]
        if s1 < e2 and s2 < e1:
            return max(s1, s2)
        if e1 <= e2:
            i += 1
        else:
            j += 1
    return None

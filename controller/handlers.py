"""Central commands that act on the site: broadcasts, schedules, clusters, alarms.

The command gate (controller/commands.py) has already verified signature,
freshness, replay and schema; here the args meet the site: unknown targets,
busy clusters and schedule conflicts are answered with an error, not a crash.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from controller import config as C
from controller.commands import CommandContext, CommandError
from controller.conflicts import conflicting_ids
from controller.engine import Busy, Request

if TYPE_CHECKING:
    from controller.runtime import Runtime

OVERRIDES_KEY = "cluster_overrides"


def to_source(src: Any) -> C.Source:
    data = src.model_dump(exclude_none=True) if hasattr(src, "model_dump") else dict(src)
    try:
        return C.Source.model_validate(data)
    except ValueError as e:
        raise CommandError("invalid_args", f"source: {e}") from None


def check_targets(rt: Runtime, targets: Any) -> tuple[list[str], list[str]]:
    if targets != "all":
        known = {z.id for z in rt.cfg.zones} | {c.id for c in rt.cfg.clusters}
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise CommandError("invalid_args", f"unknown targets: {', '.join(unknown)}")
    enabled, skipped = rt.cfg.resolve_targets(targets)
    if not enabled:
        raise CommandError("invalid_args", "no enabled cluster among the targets")
    return enabled, skipped


def start_broadcast(rt: Runtime, *, priority: str, source: C.Source, targets: Any, ordered_by: str,
                    title: str | None = None, volume: int | None = None,
                    max_duration_s: float | None = None, patience_s: float = 60.0) -> dict:
    """Start now, preempting lower priorities; behind an equal or higher one, wait in the
    queue up to `patience_s` (then broadcast.skipped) rather than refuse outright."""
    enabled, skipped = check_targets(rt, targets)
    req = Request(priority=priority, source=source, targets=enabled, skipped=skipped,
                  ordered_by=ordered_by, title=title or f"{priority} broadcast", volume=volume,
                  max_duration_s=float(max_duration_s or 1800), patience_s=patience_s)
    try:
        b = rt.submit(req)
    except Busy as e:
        raise CommandError("busy", str(e)) from None
    return {"broadcast_id": b.id, "state": b.state, "targets": enabled, "skipped": skipped}


def central_programme(args: Any) -> C.Programme:
    """The contract's programme (cron fields / dates, duration_s) as a site programme."""
    rec = args.recurrence
    if hasattr(rec, "cron"):
        f = rec.cron
        schedule = {"cron": f"{f.minute} {f.hour} {f.day} {f.month} {f.day_of_week}"}
    else:
        schedule = {"at": list(rec.dates)}
    data = {
        "id": args.id, "title": args.title, "priority": args.priority,
        "source": to_source(args.source).model_dump(exclude_none=True),
        "targets": args.targets, "schedule": schedule,
        "valid_from": args.valid_from, "valid_until": args.valid_until,
    }
    if args.duration_s:
        data["max_duration_s"] = args.duration_s
    try:
        return C.Programme.model_validate({k: v for k, v in data.items() if v is not None})
    except ValueError as e:
        raise CommandError("invalid_args", str(e).splitlines()[0] + ": " + str(e).splitlines()[-1]) from None


def apply_overrides(rt: Runtime) -> None:
    """cluster.set enabled=false survives restarts and reloads (kept in the state db)."""
    ov = rt.store.kv_get(OVERRIDES_KEY, {}) or {}
    for i, c in enumerate(rt.cfg.clusters):
        o = ov.get(c.id)
        if o and "enabled" in o and o["enabled"] != c.enabled:
            rt.cfg.clusters[i] = c.model_copy(update={"enabled": o["enabled"]})


def register_handlers(rt: Runtime) -> None:
    g = rt.gate
    apply_overrides(rt)

    async def broadcast_start(args, ctx: CommandContext) -> dict:
        return start_broadcast(rt, priority=args.priority, source=to_source(args.source), targets=args.targets,
                               ordered_by=f"central:{ctx.request_id}", title=args.title,
                               volume=args.volume, max_duration_s=args.max_duration_s)

    async def broadcast_stop(args, ctx) -> dict:
        which = None if args.broadcast_id == "all" else args.broadcast_id
        stopped = rt.engine.stop(which)
        if which and not stopped:
            raise CommandError("not_found", f"no broadcast {which} on air or queued")
        return {"stopped": stopped}

    async def schedule_put(args, ctx) -> dict:
        p = central_programme(args)
        check_targets(rt, p.targets)
        clash = conflicting_ids(rt.cfg, p, list(rt.scheduler.programmes().values()))
        if clash:
            raise CommandError("conflict", f"overlaps programmes of the same priority: {', '.join(clash)}")
        rt.scheduler.put(p)
        return {"id": p.id, "next": [r for r in rt.scheduler.next_runs(50) if r["programme_id"] == p.id][:3]}

    async def schedule_delete(args, ctx) -> dict:
        if not rt.scheduler.delete(args.id):
            if any(p.id == args.id for p in rt.cfg.programmes):
                raise CommandError("not_found", f"{args.id} comes from the site file; change it there")
            raise CommandError("not_found", f"no central programme {args.id}")
        return {"deleted": args.id}

    async def schedule_list(args, ctx) -> dict:
        central = {p.id for p in rt.scheduler.central_programmes()}
        return {"programmes": [
            {**json.loads(p.model_dump_json(exclude_none=True)), "origin": "central" if p.id in central else "site"}
            for p in rt.scheduler.programmes().values()], "next": rt.scheduler.next_runs(20)}

    async def cluster_set(args, ctx) -> dict:
        try:
            c = rt.cfg.cluster(args.cluster_id)
        except StopIteration:
            raise CommandError("not_found", f"no cluster {args.cluster_id}") from None
        out: dict = {"cluster_id": c.id}
        if args.enabled is not None:
            ov = rt.store.kv_get(OVERRIDES_KEY, {}) or {}
            ov.setdefault(c.id, {})["enabled"] = args.enabled
            rt.store.kv_set(OVERRIDES_KEY, ov)
            apply_overrides(rt)
            rt.site.reload(rt.cfg)
            from controller.runtime import _site_model

            rt.diagnoser.update_site(_site_model(rt.cfg))
            out["enabled"] = args.enabled
        if args.volume is not None:
            v = rt.site.clusters[c.id]
            v.volume = args.volume
            if c.kind == "ip" and rt.devices and rt.devices.ip_link:
                r = await rt.devices.ip_link.set_volume(c.id, args.volume)
                out["acknowledged"] = r.reached
                if not r.reached:
                    out["reason"] = r.reason
            out["volume"] = args.volume
        rt.publish_cluster(c.id)
        rt.publish_health()
        return out

    async def alarm_ack(args, ctx) -> dict:
        from controller.alarms import UnknownAlarm

        try:
            return rt.alarms.ack(args.alarm_id, args.by)
        except UnknownAlarm:
            raise CommandError("not_found", f"no alarm {args.alarm_id}") from None

    for name, fn in (("broadcast.start", broadcast_start), ("broadcast.stop", broadcast_stop),
                     ("schedule.put", schedule_put), ("schedule.delete", schedule_delete),
                     ("schedule.list", schedule_list), ("cluster.set", cluster_set), ("alarm.ack", alarm_ack)):
        g.register(name, fn)

    def status() -> dict:
        rt.publish_health()
        return rt.uplink.snapshot()

    g.register_builtin(rebirth=lambda: rt.uplink.rebirth(), status_provider=status)

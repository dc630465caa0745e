"""`loaxa check-config` and the site JSON Schema, for the technician's editor."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

from controller.config import SiteConfig, load_site
from controller.yamlsrc import YamlError


def schema_text() -> str:
    schema = SiteConfig.model_json_schema(mode="validation")
    for k in ("source_path", "source_hash", "warnings"):
        schema.get("properties", {}).pop(k, None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "loaxa site file"
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def next_runs(cfg: SiteConfig, count: int = 5, now: dt.datetime | None = None) -> list[tuple[dt.datetime, str]]:
    from zoneinfo import ZoneInfo

    from apscheduler.triggers.cron import CronTrigger

    tz = ZoneInfo(cfg.site.timezone)
    now = now or dt.datetime.now(tz)
    runs: list[tuple[dt.datetime, str]] = []
    for p in cfg.programmes:
        if not p.schedule:
            continue
        if p.schedule.cron:
            trig = CronTrigger.from_crontab(p.schedule.cron, timezone=tz)
            t, prev = now, None
            for _ in range(count):
                t = trig.get_next_fire_time(prev, t)
                if t is None:
                    break
                runs.append((t, p.id))
                prev, t = t, t + dt.timedelta(seconds=1)
        else:
            for at in p.schedule.at or []:
                at = at if at.tzinfo else at.replace(tzinfo=tz)
                if at >= now:
                    runs.append((at.astimezone(tz), p.id))
    return sorted(runs)[:count]


def report(path: Path, *, as_json: bool = False) -> int:
    try:
        cfg = load_site(path)
    except YamlError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "errors": e.errors}, ensure_ascii=False))
        else:
            for line in e.errors:
                click.echo(line, err=True)
            click.echo(f"{len(e.errors)} problem(s); the daemon would refuse this file.", err=True)
        return 2
    from controller.conflicts import schedule_conflicts

    conflicts = schedule_conflicts(cfg)
    by_zone: dict[str, dict[str, int]] = {}
    for c in cfg.clusters:
        by_zone.setdefault(c.zone, {"ip": 0, "fm": 0})[c.kind] += 1
    runs = next_runs(cfg)
    if as_json:
        click.echo(json.dumps({
            "ok": not conflicts, "site": cfg.site.id, "warnings": cfg.warnings, "conflicts": conflicts,
            "clusters": {"ip": sum(z["ip"] for z in by_zone.values()), "fm": sum(z["fm"] for z in by_zone.values())},
            "zones": by_zone, "programmes": [p.id for p in cfg.programmes],
            "next": [{"at": t.isoformat(), "programme": p} for t, p in runs],
        }, ensure_ascii=False))
        return 2 if conflicts else 0
    ip = sum(1 for c in cfg.clusters if c.kind == "ip")
    click.echo(f"{path}: ok — site {cfg.site.id} ({cfg.site.name}), timezone {cfg.site.timezone}")
    click.echo(f"  clusters: {len(cfg.clusters)} ({ip} IP, {len(cfg.clusters) - ip} FM)")
    for z in cfg.zones:
        n = by_zone.get(z.id, {"ip": 0, "fm": 0})
        click.echo(f"    {z.id:<12} {z.name:<24} {n['ip']} IP, {n['fm']} FM")
    click.echo(f"  programmes: {len(cfg.programmes)}")
    if runs:
        click.echo("  next scheduled broadcasts (local time):")
        for t, pid in runs:
            click.echo(f"    {t:%Y-%m-%d %H:%M} {pid}")
    for w in cfg.warnings:
        click.echo(f"warning: {w}", err=True)
    for c in conflicts:
        click.echo(f"error: {c}", err=True)
    return 2 if conflicts else 0

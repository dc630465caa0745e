"""`loaxa log`: the broadcast log the commune must keep (table or CSV), or the event log.

Times are shown in the station's time zone (site.timezone) because that is what a
report to the commune office uses; --json keeps the daemon's UTC timestamps.
"""
from __future__ import annotations

import csv
import json
import sys
from datetime import datetime, time, timedelta, tzinfo
from typing import Any

import click
from rich.text import Text

from controller.i18n import t, word
from controller.techcli import Ctx, _cells, _table, _utc, common, make_ctx

_TODAY = {"today", "hôm nay", "hom nay"}
_YESTERDAY = {"yesterday", "hôm qua", "hom qua"}
_ENVELOPE = {"id", "seq", "ts", "type", "historical"}


def parse_when(text: str, tz: tzinfo, *, end: bool, lang: str) -> datetime:
    """A technician's time: a date, a date and time, today, yesterday, now (in the station tz).

    A date alone as the end of a range means the whole of that day.
    """
    s = text.strip().lower()
    now = datetime.now(tz)
    if s == "now":
        return now
    day = {**dict.fromkeys(_TODAY, 0), **dict.fromkeys(_YESTERDAY, 1)}.get(s)
    if day is not None:
        start = datetime.combine(now.date() - timedelta(days=day), time(), tz)
        return start + timedelta(days=1) if end else start
    try:
        if len(s) == 10:
            start = datetime.combine(datetime.strptime(s, "%Y-%m-%d").date(), time(), tz)
            return start + timedelta(days=1) if end else start
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as e:
        raise click.BadParameter(t("log.bad_time", lang, v=text)) from e
    return dt if dt.tzinfo else dt.replace(tzinfo=tz)


def _source(src: Any) -> str:
    if isinstance(src, dict) and len(src) == 1:
        kind, spec = next(iter(src.items()))
        if isinstance(spec, dict):
            detail = spec.get("url") or spec.get("path") or spec.get("input") or ""
            return f"{kind}: {str(detail).rsplit('/', 1)[-1]}" if detail else kind
        return kind
    return "—" if src is None else str(src)


def _unreached(items: list) -> str:
    out = []
    for u in items or []:
        out.append(f"{u.get('cluster')}: {u.get('reason')}" if isinstance(u, dict) else str(u))
    return "; ".join(out)


@click.command("log")
@click.option("--from", "frm", default=None,
              help='start: 2026-05-03, "2026-05-03 14:00", today, yesterday (default: 7 days ago)')
@click.option("--to", default=None, help="end (default: now); a date alone means to the end of that day")
@click.option("--type", "type_", default=None,
              help="show events of this type instead of broadcasts (e.g. alarm. or broadcast.failed)")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header, for a spreadsheet")
@click.option("--limit", type=click.IntRange(1, 1000), default=200, show_default=True,
              help="most events to show (with --type)")
@common
def log_cmd(frm: str | None, to: str | None, type_: str | None, as_csv: bool, limit: int,
            **o: Any) -> None:
    """Broadcast log: what was played, who ordered it, where it reached (nhật ký phát)."""
    c = make_ctx(**o)
    start = (parse_when(frm, c.tz, end=False, lang=c.lang) if frm
             else datetime.now(c.tz) - timedelta(days=7))
    stop = parse_when(to, c.tz, end=True, lang=c.lang) if to else datetime.now(c.tz)
    rng = {"frm": start.strftime("%Y-%m-%d %H:%M"), "to": stop.strftime("%Y-%m-%d %H:%M")}
    if type_:
        rows = c.ask("log", {"from": _utc(start), "to": _utc(stop), "type": type_, "limit": limit})
        if c.as_json:
            return c.emit_json(rows)
        return _events_csv(c, rows) if as_csv else _events_table(c, rows, rng)
    rows = c.ask("broadcast_log", {"from": _utc(start), "to": _utc(stop)})
    if c.as_json:
        return c.emit_json(rows)
    if as_csv:
        return _broadcasts_csv(c, rows)
    if not rows:
        return c.line(c.t("log.none", **rng))
    tb = _table(c.t("col.start"), c.t("col.programme"), c.t("col.priority"), c.t("col.by"),
                c.t("col.reached"), c.t("col.outcome"))
    tb.title = c.t("log.title", n=len(rows), **rng)
    for r in rows:
        when = c.local(r.get("started_at"), "%m-%d %H:%M")
        if r.get("ended_at"):
            when += "–" + c.local(r.get("ended_at"), "%H:%M")
        reached = f"{len(r.get('reached') or [])}/{len(r.get('targets') or [])}"
        missing = [u.get("cluster") if isinstance(u, dict) else str(u) for u in r.get("unreached") or []]
        if missing:
            reached += "\n- " + ", ".join(missing)
        outcome = r.get("outcome")
        tb.add_row(*_cells(when, r.get("title") or r.get("programme_id"),
                           word("prio", r.get("priority"), c.lang), r.get("ordered_by"),
                           Text(reached, style="yellow" if missing else ""),
                           Text(word("outcome", outcome, c.lang),
                                style="red" if outcome == "failed" else "")))
    c.out.print(tb)


def _broadcasts_csv(c: Ctx, rows: list[dict]) -> None:
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow([c.t(k) for k in ("col.broadcast", "col.start", "col.end", "col.programme",
                                 "col.priority", "col.source", "col.by", "col.targets",
                                 "col.reached", "col.unreached", "col.outcome")])
    fmt = "%Y-%m-%d %H:%M:%S"
    for r in rows:
        w.writerow([r.get("broadcast_id"), c.local(r.get("started_at"), fmt),
                    c.local(r.get("ended_at"), fmt) if r.get("ended_at") else "",
                    r.get("title") or r.get("programme_id") or "",
                    word("prio", r.get("priority"), c.lang), _source(r.get("source")),
                    r.get("ordered_by") or "", " ".join(r.get("targets") or []),
                    " ".join(r.get("reached") or []), _unreached(r.get("unreached")),
                    word("outcome", r.get("outcome"), c.lang)])
    sys.stdout.flush()


def _details(ev: dict) -> str:
    parts = []
    for k, v in ev.items():
        if k in _ENVELOPE or v is None:
            continue
        parts.append(f"{k}={v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}")
    text = ", ".join(parts)
    return text if len(text) <= 240 else text[:239] + "…"


def _events_table(c: Ctx, rows: list[dict], rng: dict) -> None:
    if not rows:
        return c.line(c.t("log.events.none", **rng))
    tb = _table(c.t("col.time"), c.t("col.type"), c.t("col.details"))
    tb.title = c.t("log.events.title", n=len(rows), **rng)
    for ev in rows:
        tb.add_row(*_cells(c.local(ev.get("ts"), "%m-%d %H:%M:%S"), ev.get("type"), _details(ev)))
    c.out.print(tb)


def _events_csv(c: Ctx, rows: list[dict]) -> None:
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["#", c.t("col.time"), c.t("col.type"), c.t("col.details")])
    for ev in rows:
        body = {k: v for k, v in ev.items() if k not in _ENVELOPE}
        w.writerow([ev.get("seq"), c.local(ev.get("ts"), "%Y-%m-%d %H:%M:%S"), ev.get("type"),
                    json.dumps(body, ensure_ascii=False)])
    sys.stdout.flush()

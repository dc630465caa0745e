"""The technician's commands: ask the running daemon over the control socket, answer in words.

Exit codes: 0 ok, 1 the daemon answered with an error (or a cluster test failed),
2 bad command line, 3 the daemon cannot be reached (with how to start it / see why).
`--json` prints the daemon's data unchanged, for scripts.
"""
from __future__ import annotations

import json
import os
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from controller import control
from controller.i18n import detect_lang, t, word

DEFAULT_SOCKET = "/run/loaxa/control.sock"
DEFAULT_CONFIG = "/etc/loaxa/site.yaml"
CAUSES = ("lightning", "subscription_expired", "power_loss", "link_loss", "hardware",
          "vandalism_or_unknown", "unknown")


class Ctx:
    """What every command needs: where the daemon is, which language, which clock."""

    def __init__(self, socket: str, lang: str, as_json: bool, tz: tzinfo) -> None:
        self.socket, self.lang, self.as_json, self.tz = socket, lang, as_json, tz
        self.out = Console(highlight=False, soft_wrap=False)

    def t(self, key: str, **kw: Any) -> str:
        return t(key, self.lang, **kw)

    def ask(self, op: str, args: dict | None = None, *, timeout: float = 15.0) -> Any:
        try:
            return control.call(self.socket, op, args, timeout=timeout)
        except control.NotRunning as e:
            self._fail(e.reason, self._down_lines(e), code=3)
        except control.ControlError as e:
            what = word("errcode", e.code, self.lang)
            lines = [self.t("error.refused", what=what)]
            if e.message:
                lines.append(self.t("error.detail", message=e.message))
            self._fail(e.code, lines, code=1, message=e.message)

    def _down_lines(self, e: control.NotRunning) -> list[str]:
        if e.reason == "denied":
            return [self.t("down.denied", path=e.path), self.t("hint.denied")]
        if e.reason == "timeout":
            return [self.t("down.timeout", s=e.detail), self.t("hint.restart"), self.t("hint.why")]
        return [self.t(f"down.{e.reason}", path=e.path), self.t("hint.start"), self.t("hint.why")]

    def _fail(self, err: str, lines: list[str], *, code: int, message: str = "") -> None:
        for line in lines:
            click.echo(line, err=True)
        if self.as_json:
            click.echo(json.dumps({"error": {"code": err, "message": message or lines[0]}},
                                  ensure_ascii=False))
        raise SystemExit(code)

    def emit_json(self, data: Any) -> None:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))

    def line(self, text: str | Text, style: str | None = None) -> None:
        self.out.print(text if isinstance(text, Text) else Text(text, style=style or ""))

    # ---- time in words
    def local(self, ts: str | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
        dt = _parse_ts(ts)
        return dt.astimezone(self.tz).strftime(fmt) if dt else "—"

    def dur(self, seconds: float) -> str:
        s = int(max(seconds, 0))
        if s < 60:
            return self.t("dur.s", n=s)
        if s < 3600:
            return self.t("dur.min", n=s // 60)
        if s < 86400:
            return self.t("dur.h", n=s // 3600, m=s % 3600 // 60)
        return self.t("dur.d", n=s // 86400, h=s % 86400 // 3600)

    def ago(self, ts: str | None, *, short: bool = False) -> str:
        dt = _parse_ts(ts)
        if dt is None:
            return self.t("never")
        secs = (datetime.now(UTC) - dt).total_seconds()
        if secs < 10:
            return self.t("ago.now")
        if short and secs >= 3600:  # tables: "2 h ago", not "2 h 5 min ago"
            secs -= secs % (3600 if secs < 86400 else 86400)
        dur = self.dur(secs)
        return self.t("ago", dur=dur.replace(" 0 min", "").replace(" 0 phút", "")
                      .replace(" 0 h", "").replace(" 0 giờ", ""))


def _parse_ts(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _utc(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _read_site(path: str | None) -> dict:
    """Only what the tools need from the site file; a broken file must not stop `status`."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, ImportError) as e:
        if explicit:
            raise click.BadParameter(f"{path}: {e}", param_hint="--config") from e
        return {}
    except Exception:  # yaml syntax errors: check-config explains those
        return {}


def make_ctx(config_path: str | None, socket_path: str | None, as_json: bool,
             lang: str | None) -> Ctx:
    site = _read_site(config_path)
    info = site.get("site") if isinstance(site.get("site"), dict) else {}
    ctl = site.get("control") if isinstance(site.get("control"), dict) else {}
    sock = socket_path or ctl.get("socket") or DEFAULT_SOCKET
    try:
        tz: tzinfo = ZoneInfo(str(info["timezone"]))
    except Exception:
        tz = datetime.now().astimezone().tzinfo or UTC
    return Ctx(str(sock), detect_lang(lang, info.get("language")), as_json, tz)


def common(f: Any) -> Any:
    """--config, --socket, --json, --lang on every technician command."""
    f = click.option("--lang", type=click.Choice(["vi", "en"]), default=None,
                     help="language of the output (default: site.language, else $LANG)")(f)
    f = click.option("--json", "as_json", is_flag=True, help="raw data as JSON, for scripts")(f)
    f = click.option("--socket", "socket_path", envvar="LOAXA_SOCKET", default=None,
                     help=f"control socket (default: control.socket of the site file, else {DEFAULT_SOCKET})")(f)
    f = click.option("--config", "-c", "config_path", envvar="LOAXA_CONFIG", default=None,
                     type=click.Path(dir_okay=False), help=f"site file (default {DEFAULT_CONFIG})")(f)
    return f


def _table(*cols: str, nowrap: int = 1) -> Table:
    """A borderless table for 80 columns; the first `nowrap` columns (ids) never wrap."""
    tb = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
               padding=(0, 1), expand=False)
    for i, c in enumerate(cols):
        tb.add_column(c, overflow="fold", no_wrap=i < nowrap)
    return tb


def _cells(*vals: Any) -> list[Text]:
    return [v if isinstance(v, Text) else Text("—" if v is None else str(v)) for v in vals]


# ---------------------------------------------------------------- commands
@click.command()
@common
def status(**o: Any) -> None:
    """Health of the station at a glance (tình trạng trạm)."""
    c = make_ctx(**o)
    d = c.ask("status")
    if c.as_json:
        return c.emit_json(d)
    health = d.get("health") or {}
    gw = health.get("gateway") or {}
    site = d.get("site") or {}
    c.line(c.t("status.site", name=site.get("name", "?"), id=site.get("id", "?"),
               version=d.get("version", "?"), uptime=c.dur(gw.get("uptime_s") or 0)), "bold")
    clock_ok = gw.get("clock_synced")
    c.line(c.t("status.clock.ok" if clock_ok else "status.clock.bad"), None if clock_ok else "yellow")
    connected = (d.get("central") or {}).get("connected")
    c.line(c.t("status.central.ok") if connected else
           c.t("status.central.bad", n=gw.get("outbox_depth", 0)), None if connected else "yellow")
    c.line(c.t("status.tx", state=_tx_words(c, health.get("transmitter"))))
    on_air = d.get("on_air")
    if on_air:
        c.line(c.t("status.onair", what=on_air.get("title") or on_air.get("programme_id")
                   or on_air.get("broadcast_id"), priority=word("prio", on_air.get("priority"), c.lang),
                   since=c.local(on_air.get("started_at"), "%H:%M"),
                   n=len(on_air.get("targets") or [])), "bold")
    else:
        c.line(c.t("status.onair.none"))
    n = health.get("counts") or {}
    c.line(c.t("status.counts", online=n.get("online", 0), offline=n.get("offline", 0),
               unmonitored=n.get("unmonitored", 0), faulty=n.get("faulty", 0),
               total=n.get("clusters_total", 0)), "red" if n.get("offline") else None)
    k = d.get("alarms_active", 0)
    c.line(c.t("status.alarms", n=k) if k else c.t("status.alarms.none"), "red" if k else None)


def _tx_words(c: Ctx, tx: dict | None) -> str:
    if not tx:
        return c.t("tx.nodata")
    if not tx.get("reachable"):
        return c.t("tx.unreachable")
    parts = [c.t("tx.onair") if tx.get("on_air") else c.t("tx.standby")]
    for key, field in (("tx.freq", "frequency_mhz"), ("tx.forward", "forward_w"),
                       ("tx.reflected", "reflected_w"), ("tx.temp", "temperature_c")):
        if tx.get(field) is not None:
            parts.append(c.t(key, v=f"{tx[field]:g}"))
    return ", ".join(parts)


def _rssi(c: Ctx, dbm: float | None) -> str:
    if dbm is None:
        return "—"
    w = "rssi.good" if dbm >= -85 else "rssi.fair" if dbm >= -100 else "rssi.weak"
    return f"{dbm:g} {c.t(w)}"


def _sim(c: Ctx, sub: dict | None) -> Text:
    days = (sub or {}).get("days_left")
    if days is None:
        return Text("—")
    if days < 0:
        return Text(c.t("sim.expired"), style="bold red")
    if days < 14:
        return Text(c.t("sim.soon", n=days), style="yellow")
    return Text(c.t("sim.days", n=days))


@click.command()
@click.option("--zone", "-z", default=None, help="only this village (zone id)")
@common
def clusters(zone: str | None, **o: Any) -> None:
    """Every loudspeaker cluster: reachable?, last seen, volume, signal, SIM, faults."""
    c = make_ctx(**o)
    rows = c.ask("clusters", {"zone": zone})
    if c.as_json:
        return c.emit_json(rows)
    if not rows:
        return c.line(c.t("clusters.none"))
    causes = {(a.get("cluster_id"), a.get("code")): a.get("cause") for a in c.ask("alarms")}
    tb = _table(c.t("col.id"), c.t("col.zone"), c.t("col.state"), c.t("col.seen"),
                c.t("col.volume"), c.t("col.signal"), c.t("col.sim"), c.t("col.problems"), nowrap=2)
    tb.title = c.t("clusters.title", n=len(rows))
    for r in rows:
        avail = r.get("availability")
        state = word("avail", avail, c.lang)
        if r.get("playing"):
            state = c.t("avail.playing", state=state)
        style = {"offline": "bold red", "disabled": "dim"}.get(avail or "", "")
        seen = "—" if avail == "unmonitored" else c.ago(r.get("last_seen"), short=True)
        faults = []
        for code in r.get("faults") or []:
            text = word("code", code, c.lang)
            cause = causes.get((r.get("id"), code))
            faults.append(c.t("fault.with_cause", fault=text, cause=word("cause", cause, c.lang))
                          if cause else text)
        vol = r.get("volume")
        tb.add_row(*_cells(r.get("id"), r.get("zone_name") or r.get("zone"), Text(state, style=style),
                           seen, f"{vol}%" if vol is not None else None, _rssi(c, r.get("rssi_dbm")),
                           _sim(c, r.get("subscription")),
                           Text("\n".join(faults), style="red") if faults else None))
    c.out.print(tb)


@click.command()
@common
def alarms(**o: Any) -> None:
    """Active alarms with their cause and the evidence for it (cảnh báo)."""
    c = make_ctx(**o)
    items = c.ask("alarms")
    if c.as_json:
        return c.emit_json(items)
    if not items:
        return c.line(c.t("alarms.none"), "green")
    c.line(c.t("alarms.title", n=len(items)), "bold")
    for a in items:
        where = (c.t("alarm.where.cluster", id=a["cluster_id"]) if a.get("cluster_id")
                 else c.t("alarm.where.site"))
        sev = a.get("severity")
        c.line("")
        c.line(f"[{word('sev', sev, c.lang)}] {where} — {word('code', a.get('code'), c.lang)}",
               "bold red" if sev in ("critical", "major") else "bold yellow")
        pct = round(100 * float(a.get("confidence") or 0))
        c.line("   " + c.t("alarm.cause", cause=word("cause", a.get("cause"), c.lang), pct=pct))
        if a.get("evidence"):
            c.line("   " + c.t("alarm.evidence"))
            for ev in a["evidence"]:
                c.line(f"     - {ev}")
        c.line("   " + c.t("alarm.since", at=c.local(a.get("raised_at")), ago=c.ago(a.get("raised_at")),
                           id=a.get("alarm_id")))
        if a.get("incident_id"):
            c.line("   " + c.t("alarm.incident", id=a["incident_id"]))
        if a.get("acknowledged_by"):
            c.line("   " + c.t("alarm.ack", by=a["acknowledged_by"]))


TEST_TIMEOUT_S = 90


@click.command("test-cluster")
@click.argument("cluster_id")
@common
def test_cluster(cluster_id: str, **o: Any) -> None:
    """Check one cluster now: does it answer? (FM: what to listen for) (kiểm tra cụm loa)."""
    c = make_ctx(**o)
    if not c.as_json:
        click.echo(c.t("test.waiting", id=cluster_id, s=TEST_TIMEOUT_S), err=True)
    r = c.ask("test_cluster", {"cluster_id": cluster_id}, timeout=TEST_TIMEOUT_S)
    if c.as_json:
        c.emit_json(r)
        raise SystemExit(1 if r.get("answered") is False else 0)
    cid = r.get("cluster_id", cluster_id)
    if r.get("kind") == "fm":
        return _fm_test(c, cid, r)
    if r.get("answered"):
        c.line(c.t("test.ip.ok", id=cid, ms=round(r.get("round_trip_ms") or 0)), "bold green")
        st = r.get("state") or {}
        vol = st.get("volume")
        c.line(c.t("test.ip.state", vol=f"{vol}%" if vol is not None else "—",
                   signal=_rssi(c, st.get("rssi_dbm")), sim=_sim(c, st.get("subscription")).plain))
        return
    c.line(c.t("test.ip.fail", id=cid), "bold red")
    if r.get("reason"):
        c.line(c.t("test.reason", reason=r["reason"]))
    c.line(c.t("test.ip.hint"))
    raise SystemExit(1)


def _fm_test(c: Ctx, cid: str, r: dict) -> None:
    c.line(c.t("test.fm.sent", id=cid, address=r.get("address", "?"),
               method=word("method", r.get("method"), c.lang)), "bold")
    c.line(c.t("test.fm.wake", codes=" ".join(r.get("wake_codes") or []) or "—"))
    tone_s = r.get("tone_s", "?")
    c.line(c.t("test.fm.tone", hz=r.get("tone_hz", "?"), s=tone_s))
    c.line(c.t("test.fm.sleep", codes=" ".join(r.get("sleep_codes") or []) or "—"))
    c.line("")
    if r.get("return_channel"):
        if r.get("answered"):
            return c.line(c.t("test.fm.confirmed", id=cid), "bold green")
        c.line(c.t("test.fm.unconfirmed", id=cid), "bold red")
        if r.get("reason"):
            c.line(c.t("test.reason", reason=r["reason"]))
        c.line(c.t("test.fm.nothing", address=r.get("address", "?"), freq=r.get("frequency_mhz", "?")))
        raise SystemExit(1)
    c.line(c.t("test.fm.listen", s=tone_s), "bold")
    c.line(c.t("test.fm.nothing", address=r.get("address", "?"), freq=r.get("frequency_mhz", "?")))


def _who() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown"


@click.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--tts", default=None, help="text to speak instead of a file")
@click.option("--targets", "-t", multiple=True, required=True,
              help='"all", or village (zone) / cluster ids, comma separated or repeated')
@click.option("--priority", "-p", type=click.Choice(["normal", "priority", "emergency"]),
              default="normal", show_default=True)
@common
def play(file: str | None, tts: str | None, targets: tuple[str, ...], priority: str,
         **o: Any) -> None:
    """Play a sound file or spoken text now (phát ngay)."""
    c = make_ctx(**o)
    if (file is None) == (tts is None):
        raise click.UsageError(c.t("play.need_source"))
    if file is not None:
        p = Path(file)
        if not p.is_file():
            raise click.BadParameter(c.t("play.no_file", file=file), param_hint="FILE")
        file = str(p.resolve())
    ids = [x.strip() for arg in targets for x in arg.split(",") if x.strip()]
    tg: Any = "all" if ids == ["all"] else ids
    r = c.ask("play", {"file": file, "tts": tts, "targets": tg, "priority": priority, "by": _who()})
    if c.as_json:
        return c.emit_json(r)
    bid = r.get("broadcast_id", "?")
    if r.get("state") == "queued":
        c.line(c.t("play.queued", bid=bid), "yellow")
    else:
        c.line(c.t("play.started", bid=bid, prio=word("prio", r.get("priority", priority), c.lang),
                   n=len(r.get("targets") or [])), "bold green")
    if r.get("preempted"):
        c.line(c.t("play.preempted", other=r["preempted"]))
    if r.get("skipped"):
        c.line(c.t("play.skipped", ids=", ".join(r["skipped"])), "yellow")
    c.line(c.t("play.stop_hint", bid=bid))


@click.command()
@click.argument("broadcast_id", required=False)
@common
def stop(broadcast_id: str | None, **o: Any) -> None:
    """Stop what is playing (or one broadcast by id) (dừng phát)."""
    c = make_ctx(**o)
    r = c.ask("stop", {"broadcast_id": broadcast_id})
    if c.as_json:
        return c.emit_json(r)
    ids = r.get("stopped") or []
    c.line(c.t("stop.done", ids=", ".join(ids)) if ids else c.t("stop.nothing"))


@click.group("cluster")
def cluster() -> None:
    """One cluster: field notes (ghi chú sửa chữa)."""


@cluster.command("note")
@click.argument("cluster_id")
@click.option("--status", "note_status", type=click.Choice(["damaged", "repaired", "note"]),
              required=True)
@click.option("--cause", type=click.Choice(CAUSES), default=None, help="what caused the damage")
@click.option("--text", default=None, help="what you found or did, in your words")
@common
def cluster_note(cluster_id: str, note_status: str, cause: str | None, text: str | None,
                 **o: Any) -> None:
    """Record a field note (damage, repair) for the central server."""
    c = make_ctx(**o)
    r = c.ask("note", {"cluster_id": cluster_id, "status": note_status, "cause": cause,
                       "text": text, "by": _who()})
    if c.as_json:
        return c.emit_json(r)
    c.line(c.t("note.saved", id=cluster_id, status=word("note", note_status, c.lang)), "green")


def register(main_group: click.Group) -> None:
    """Add the technician's commands to the `loaxa` group."""
    from controller.techlog import log_cmd

    for cmd in (status, clusters, alarms, test_cluster, play, stop, log_cmd, cluster):
        main_group.add_command(cmd)


"""The live view of `loaxa demo`, folded from the record as it is written.

`DemoView.apply(record)` is called from one thread (the demo's main thread; records reach it
over a queue) and `render(width, height)` never draws wider than `width` — 80 columns over
SSH — nor needs colour: every state also has a glyph (ASCII on a non-UTF-8 terminal).
The summary logic lives in demo_summary.py and is re-exported here.
"""
from __future__ import annotations

import json
import unicodedata
from collections import deque
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from controller.demo_summary import (  # noqa: F401 - re-exported: the demo's public API
    END_TYPES,
    PRIO_STYLE,
    Summary,
    Verdict,
    compress_ids,
    summarise,
    summary_lines,
    topic_tail,
)


def _ascii(x: Any) -> Any:
    """'Bản 01 - Đài' -> 'Ban 01 - Dai': Vietnamese readable on a terminal without UTF-8."""
    if isinstance(x, str):
        x = unicodedata.normalize("NFKD", x.replace("đ", "d").replace("Đ", "D"))
        return "".join(ch for ch in x if not unicodedata.combining(ch)).encode(
            "ascii", "replace").decode()
    if isinstance(x, dict):
        return {k: _ascii(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_ascii(v) for v in x]
    return x


# ---------------------------------------------------------------------- the live view
class DemoView:
    """The live picture, folded record by record (call `apply` from one thread only)."""

    def __init__(self, zones: list[tuple[str, list[tuple[str, str]]]], *, title: str = "",
                 duration: float = 0.0, ascii_only: bool = False):
        self.zones = zones                 # [(zone id, [(cluster id, kind), ...]), ...]
        self.title, self.duration, self.ascii = (_ascii(title) if ascii_only else title), duration, ascii_only
        self.t = 0.0
        self.truth: dict[str, dict] = {}   # ground truth: playing, alive
        self.state: dict[str, dict] = {}   # clusters/{id}/state payloads
        self.on_air: dict[str, dict] = {}
        self.alarms: list[dict] = []
        self.status: dict = {}
        self.health: dict = {}
        self.tx: dict = {}
        self.events = 0
        self.last_seq = 0
        self.dups = 0
        self.gaps = 0
        self._ids: set[str] = set()
        self._notes: dict[str, str] = {}      # request id, then broadcast id -> scenario note
        self.ticker: deque[tuple[float, str, str]] = deque(maxlen=12)
        self.finished = False

    def note(self, t: float, text: str, style: str = "") -> None:
        self.ticker.append((t, text, style))

    def apply(self, r: dict) -> None:
        if self.ascii:
            r = _ascii(r)
        self.t = max(self.t, float(r.get("t", 0.0)))
        k = r.get("kind")
        if k == "cluster":
            cur = self.truth.setdefault(r["cluster"], {"playing": False, "alive": True})
            cur["playing"] = bool(r.get("playing"))
            if "alive" in r:
                cur["alive"] = bool(r["alive"])
        elif k == "transmitter":
            self.tx = r
        elif k == "scenario":
            self._scenario(r)
        elif k == "response":
            p = r.get("payload") or {}
            bid = ((p.get("data") or {}).get("broadcast_id")) if isinstance(p, dict) else None
            if bid and r.get("request_id") in self._notes:
                self._notes[bid] = self._notes.pop(r["request_id"])
            if isinstance(p, dict) and p.get("status") == "error":
                err = p.get("error") or {}
                self.note(r["t"], f"command refused: {err.get('code')}", "yellow")
        elif k == "mqtt":
            self._mqtt(r)

    def _scenario(self, r: dict) -> None:
        ev = r.get("event") or {}
        if "start" in ev:
            self.duration = self.duration or float(ev["start"].get("duration") or 0)
            self.note(r["t"], "scenario started", "dim")
        elif "note" in ev:
            self.note(r["t"], str(ev["note"]), "cyan")
            rid = (ev.get("result") or {}).get("request_id")
            if rid and "command" in ev:
                self._notes[rid] = str(ev["note"])
        elif "ended" in ev:
            self.note(r["t"], f"{ev['ended'].replace('_', ' ')} over", "cyan")
        elif "finished" in ev:
            self.finished = True
            self.note(r["t"], "everything stopped", "dim")
        elif "end" in ev or "interrupted" in ev:
            self.finished = True
            self.note(r["t"], "scenario over" if "end" in ev else "interrupted", "bold")
        elif "daemon_exited" in ev:
            self.note(r["t"], f"daemon exited rc={ev['daemon_exited'].get('rc')}", "red")
        else:
            kind = next((x for x in ev if x not in ("at", "index", "result", "error")), "?")
            self.note(r["t"], f"scenario: {kind}", "cyan")

    def _mqtt(self, r: dict) -> None:
        tail, p = topic_tail(r), r.get("payload")
        if tail.startswith("clusters/") and isinstance(p, dict):
            self.state[str(p.get("id") or tail.split("/")[1])] = p
        elif tail == "alarms" and isinstance(p, list):
            self.alarms = [a for a in p if isinstance(a, dict)]
        elif tail == "status" and isinstance(p, dict):
            if p.get("state") != self.status.get("state"):
                self.note(r["t"], f"uplink {p.get('state')} (session {p.get('session')})",
                          "green" if p.get("state") == "online" else "red")
            self.status = p
        elif tail == "health" and isinstance(p, dict):
            self.health = p
        elif tail == "events" and isinstance(p, dict):
            self._event(r["t"], p)

    def _event(self, t: float, p: dict) -> None:
        if p.get("id") in self._ids:
            self.dups += 1
            return
        self._ids.add(p.get("id"))
        self.events += 1
        seq = p.get("seq")
        if isinstance(seq, int):
            if seq > self.last_seq + 1 and self.last_seq:
                self.gaps += seq - self.last_seq - 1
            elif seq <= self.last_seq and self.gaps:
                self.gaps -= 1         # a late event filling a gap
            self.last_seq = max(self.last_seq, seq)
        typ = str(p.get("type", ""))
        bid = p.get("broadcast_id")
        if typ == "broadcast.started" and bid:
            self.on_air[bid] = p | {"_t": t, "_note": self._notes.get(bid)}
            self.note(t, f"on air: {p.get('priority')} {p.get('source')}, reached "
                         f"{len(p.get('reached') or [])} of {len(p.get('targets') or [])}",
                      PRIO_STYLE.get(p.get("priority"), ""))
        elif typ in END_TYPES and bid:
            self.on_air.pop(bid, None)
            self.note(t, f"{typ.split('.')[1]}: {p.get('title') or bid}", "dim")
        elif typ == "alarm.raised" and not p.get("historical"):
            self.note(t, f"alarm {p.get('cluster_id') or 'site'} {p.get('code')}: {p.get('cause')}", "red")
        elif typ == "command.rejected":
            self.note(t, f"rejected {p.get('command')}: {p.get('reason')}", "yellow")

    # ---- rendering -----------------------------------------------------------------------
    def _g(self, fancy: str, plain: str) -> str:
        return plain if self.ascii else fancy

    @property
    def _ov(self) -> str:
        return "crop" if self.ascii else "ellipsis"     # "…" is not ASCII

    def render(self, width: int = 80, height: int = 30) -> RenderableType:
        width = max(40, min(width, 100))
        inner = width - 4
        body: list[RenderableType] = [self._on_air(inner), self._tx(inner), self._uplink(inner),
                                      self._grid()]
        room = max(2, height - 17 - len(self.zones) + 7)
        n_alarm = min(len(self.alarms), max(1, room // 2))
        body.append(self._alarms(inner, n_alarm))
        body.append(self._ticker(inner, max(1, room - max(n_alarm, 1))))
        prog = f"t {self.t:5.1f}/{self.duration:.0f} s"
        head = Text(f"loaxa demo - {self.title}"[: inner - len(prog) - 2], style="bold")
        return Panel(Group(*body), title=head, subtitle=prog, width=width,
                     title_align="left", subtitle_align="right", padding=(0, 1))

    def _row(self, label: str, text: Text, inner: int) -> Text:
        line = Text()
        line.append(f"{label:<7}", style="bold")
        line.append_text(text)
        line.truncate(inner, overflow=self._ov)
        return line

    def _on_air(self, inner: int) -> RenderableType:
        if not self.on_air:
            return self._row("ON AIR", Text("nothing", style="dim"), inner)
        lines = []
        rank = {"emergency": 0, "priority": 1, "normal": 2}
        for p in sorted(self.on_air.values(), key=lambda p: rank.get(p.get("priority"), 3))[:2]:
            tg = p.get("targets") or []
            heard = sum(1 for c in tg if self.truth.get(c, {}).get("playing"))
            t = Text()
            t.append(f" {p.get('priority')} ", style=PRIO_STYLE.get(p.get("priority"), ""))
            t.append(f" {p.get('_note') or p.get('title') or p.get('programme_id') or p.get('source')}")
            lines.append(self._row("ON AIR", t, inner))
            d = Text(f"{p.get('source')} since {p['_t']:.0f} s  ")
            d.append(f"reached {len(p.get('reached') or [])}/{len(tg)}", style="green")
            un = p.get("unreached") or []
            if un:
                d.append(f"  unreached {compress_ids(u.get('cluster') for u in un)}", style="red")
            d.append(f"  playing now {heard}", style="cyan")
            lines.append(self._row("", d, inner))
        return Group(*lines)

    def _tx(self, inner: int) -> Text:
        x = self.tx
        if not x:
            return self._row("TX", Text("no data yet", style="dim"), inner)
        t = Text()
        t.append("carrier ON " if x.get("carrier") else "carrier off ",
                 style="bold green" if x.get("carrier") else "dim")
        t.append(f"{x.get('frequency_mhz', 0):.1f} MHz {x.get('forward_w', x.get('power_w', 0)):.0f} W"
                 f"  VSWR {x.get('vswr', 0):.1f}", style="red" if (x.get("vswr") or 0) >= 2 else "")
        rds = x.get("rds") or {}
        t.append(f"  RDS PTY {rds.get('pty', '-')}")
        t.append("  TA on" if rds.get("ta") else "  TA off", style="bold red" if rds.get("ta") else "dim")
        if rds.get("rt"):
            t.append(f"  \"{rds['rt']}\"", style="dim")
        return self._row("TX", t, inner)

    def _uplink(self, inner: int) -> Text:
        st = self.status.get("state", "waiting")
        t = Text(st, style="bold green" if st == "online" else "bold red")
        t.append(f" session {self.status.get('session', '-')}  events {self.events}  seq {self.last_seq}"
                 f"  gaps {self.gaps}  dups {self.dups}")
        depth = ((self.health.get("gateway") or {}).get("outbox_depth"))
        if depth is not None:
            t.append(f"  outbox {depth}")
        return self._row("UPLINK", t, inner)

    def _cell(self, cid: str) -> Text:
        st, gt = self.state.get(cid, {}), self.truth.get(cid, {})
        avail = st.get("availability", "?")
        glyph, style = {"online": (self._g("●", "o"), "green"),
                        "offline": (self._g("✕", "X"), "bold red"),
                        "unmonitored": (self._g("·", "."), "white"),
                        "disabled": ("-", "dim")}.get(avail, ("?", "dim"))
        t = Text(cid, style=style)
        t.append(glyph, style=style)
        t.append(self._g("♪", "*") if gt.get("playing") else " ", style="bold cyan")
        if st.get("faults") or any(a.get("cluster_id") == cid for a in self.alarms):
            t.append("!", style="bold yellow")
        elif gt.get("alive") is False:
            t.append(self._g("†", "x"), style="magenta")
        else:
            t.append(" ")
        return t

    def _grid(self) -> RenderableType:
        g = Table.grid(padding=(0, 1))
        g.add_column(width=9, no_wrap=True, overflow=self._ov)
        for _ in range(max((len(c) for _, c in self.zones), default=1)):
            g.add_column(no_wrap=True)
        for zone, members in self.zones:
            g.add_row(Text(zone, style="bold"), *[self._cell(c) for c, _ in members])
        legend = Text()
        for text, style in ((f"{self._g('●', 'o')}online ", "green"),
                            (f"{self._g('✕', 'X')}offline ", "bold red"),
                            (f"{self._g('·', '.')}unmonitored  ", "white"),
                            ("! alarm  ", "yellow"), (f"{self._g('♪', '*')}playing ", "cyan"),
                            (f"{self._g('†', 'x')}dead ", "magenta"),
                            (f"({self._g('♪ †', '* x')}: ground truth)", "dim")):
            legend.append(text, style=style)
        return Group(Text("CLUSTERS", style="bold"), g, legend)

    def _alarms(self, inner: int, n: int) -> RenderableType:
        lines = [Text(f"ALARMS ({len(self.alarms)} active)", style="bold")]
        for a in self.alarms[-n:] if n else []:
            t = Text()
            t.append(f"{a.get('cluster_id') or 'site':<5} ", style="bold")
            t.append(f"{str(a.get('code', '')).split('.', 1)[-1]} ", style="yellow")
            t.append(f"{a.get('cause')} {float(a.get('confidence') or 0):.0%}", style="red")
            ev = (a.get("evidence") or [""])
            t.append(f"  {ev[0] if ev else ''}", style="dim")
            t.truncate(inner, overflow=self._ov)
            lines.append(t)
        return Group(*lines)

    def _ticker(self, inner: int, n: int) -> RenderableType:
        lines = [Text("LATEST", style="bold")]
        for t, text, style in list(self.ticker)[-n:]:
            line = Text()
            line.append(f"{t:5.0f} s  ", style="dim")
            line.append(text, style=style)
            line.truncate(inner, overflow=self._ov)
            lines.append(line)
        return Group(*lines)


def log_line(r: dict) -> str | None:
    """One line for a notable record (`--no-ui`), or None for the rest."""
    t, k = f"[{float(r.get('t', 0)):7.2f}]", r.get("kind")
    if k == "scenario":
        ev = r.get("event") or {}
        if "at" in ev:
            kind = next((x for x in ev if x not in ("at", "index", "result", "error", "note")), "?")
            what = ev.get("note") or json.dumps(ev.get(kind), ensure_ascii=False,
                                                separators=(",", ":"))[:100]
            return f"{t} scenario {kind}: {what}" + (f" (error: {ev['error']})" if "error" in ev else "")
        key = next(iter(ev), "?")
        val = ev.get(key)
        return f"{t} scenario {key}" + (f": {val}" if isinstance(val, str) else "")
    if k == "cluster" and "alive" in r:
        return f"{t} ground truth {r['cluster']} {'back' if r['alive'] else 'dead'}"
    if k == "transmitter":
        return None
    if k == "response":
        p = r.get("payload") or {}
        return f"{t} response {p.get('status')} {(p.get('error') or {}).get('code', '')}".rstrip()
    if k != "mqtt":
        return None
    tail, p = topic_tail(r), r.get("payload")
    if tail == "status" and isinstance(p, dict):
        return f"{t} uplink {p.get('state')} session {p.get('session')}"
    if tail == "events" and isinstance(p, dict):
        typ = str(p.get("type"))
        extra = ""
        if typ.startswith("broadcast."):
            extra = (f" {p.get('priority')} {p.get('source')} reached "
                     f"{len(p.get('reached') or [])}/{len(p.get('targets') or [])}")
        elif typ.startswith("alarm."):
            extra = f" {p.get('cluster_id') or '-'} {p.get('code')} cause={p.get('cause')}"
        elif typ == "command.rejected":
            extra = f" {p.get('command')} reason={p.get('reason')}"
        hist = " (historical)" if p.get("historical") else ""
        return f"{t} event #{p.get('seq')} {typ}{extra}{hist}"
    return None

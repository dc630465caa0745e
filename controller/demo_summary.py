"""The end of `loaxa demo`: what happened, judged from the record alone.

`summarise(records)` is a pure function over a record (simulation.md, "Record file"), so an
outside checker can call it on any run. Its verdicts compare what the daemon claimed
(broadcast events, alarms) with ground truth from the simulated devices, never trusting the
daemon's own account of who heard a broadcast.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

END_TYPES = ("broadcast.finished", "broadcast.preempted", "broadcast.failed", "broadcast.skipped")
PRIO_STYLE = {"emergency": "bold white on red", "priority": "bold yellow", "normal": "green"}
CARRY_S = 4.0      # a receiver still playing this long after a new broadcast began is hearing it
PRE_S = 2.0        # scheduled broadcasts: clusters may start a little before the event is sent


def topic_tail(rec: dict) -> str:
    """'loaxa/v1/{site}/clusters/ip01/state' -> 'clusters/ip01/state'."""
    parts = str(rec.get("topic", "")).split("/", 3)
    return parts[3] if len(parts) == 4 else ""


_NUM = re.compile(r"^(.*?)(\d+)$")


def compress_ids(ids: Any) -> str:
    """['fm01','fm02','fm03','ip05'] -> 'fm01-03 ip05' (ids sorted, runs collapsed)."""
    def key(s: str) -> tuple:
        m = _NUM.match(s)
        return (m.group(1), int(m.group(2)), s) if m else (s, -1, s)
    out: list[str] = []
    run: list[tuple] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0][2])
        elif len(run) == 2:
            out.extend((run[0][2], run[1][2]))
        elif run:
            out.append(run[0][2] + "-" + _NUM.match(run[-1][2]).group(2))
        run.clear()
    for k in sorted({key(str(i)) for i in ids}):
        if run and (k[1] < 0 or k[0] != run[-1][0] or k[1] != run[-1][1] + 1):
            flush()
        run.append(k)
        if k[1] < 0:
            flush()
    flush()
    return " ".join(out) or "none"


# ---------------------------------------------------------------------- the summary
@dataclass
class Broadcast:
    broadcast_id: str
    priority: str = "?"
    title: str = ""
    source: str = ""
    outcome: str = "on air"
    start_t: float = 0.0
    end_t: float | None = None
    targets: list[str] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)
    unreached: list[dict] = field(default_factory=list)
    note: str = ""                                           # the scenario's words for it
    heard: list[str] = field(default_factory=list)           # ground truth
    unreachable: list[str] = field(default_factory=list)     # ground truth: dead, cut off, no SIM


@dataclass
class Verdict:
    name: str
    ok: bool | None          # None: not applicable to this scenario
    detail: str
    word: str | None = None  # instead of yes/no/n/a

    def line(self) -> str:
        word = self.word or ("n/a" if self.ok is None else ("yes" if self.ok else "no"))
        return f"{self.name}: {word} ({self.detail})"


@dataclass
class Summary:
    duration: float = 0.0
    ended: str = "incomplete"     # "end" | "interrupted" | "incomplete"
    broadcasts: list[Broadcast] = field(default_factory=list)
    alarms: list[dict] = field(default_factory=list)     # every alarm, last known state
    active_alarm_ids: set[str] = field(default_factory=set)
    events: int = 0
    max_seq: int = 0
    missing_seqs: list[int] = field(default_factory=list)
    duplicates: int = 0
    seq_conflicts: int = 0
    commands: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)

    def lines(self, width: int = 80) -> list[str]:
        return summary_lines(self, width)


def _playing_intervals(records: list[dict]) -> dict[str, list[list]]:
    """cluster -> [[start_t, end_t, programme], ...] from ground truth `cluster` lines."""
    out: dict[str, list[list]] = {}
    last_t = records[-1]["t"] if records else 0.0
    for r in records:
        if r.get("kind") != "cluster":
            continue
        ivs = out.setdefault(r["cluster"], [])
        open_iv = ivs[-1] if ivs and ivs[-1][1] is None else None
        if r.get("playing"):
            prog = r.get("programme")
            if open_iv is not None and prog is not None and open_iv[2] not in (None, prog):
                open_iv[1] = r["t"]
                open_iv = None
            if open_iv is None:
                ivs.append([r["t"], None, prog])
        elif open_iv is not None:
            open_iv[1] = r["t"]
    for ivs in out.values():
        if ivs and ivs[-1][1] is None:
            ivs[-1][1] = last_t
    return out


def _heard(ivs: list[list], b: Broadcast, known_ids: set[str]) -> bool:
    end = b.end_t if b.end_t is not None else float("inf")
    for s, e, prog in ivs:
        if prog in known_ids and prog != b.broadcast_id:
            continue              # an IP cluster that says it plays another broadcast
        if s > end or e < b.start_t:
            continue
        if s >= b.start_t or e >= min(end, b.start_t + CARRY_S):
            return True
    return False


def _unreachable(records: list[dict], t: float) -> dict[str, str]:
    """Clusters the simulation had disabled at time t: ground truth, not the daemon's view."""
    out: dict[str, str] = {}
    for r in records:
        if r["t"] > t + 0.5:
            break
        if r.get("kind") == "cluster" and "alive" in r:
            if r["alive"]:
                out.pop(r["cluster"], None)
            else:
                out[r["cluster"]] = "dead"
        ev = r.get("event") if r.get("kind") == "scenario" else None
        if not isinstance(ev, dict):
            continue
        if "subscription_expired" in ev:
            out[ev["subscription_expired"]["cluster"]] = "SIM expired"
        lc = ev.get("link_cut")
        if lc and ev.get("at", 0) <= t < ev.get("at", 0) + lc.get("duration", 0):
            out[lc["cluster"]] = "link cut"
    return out


def _scenario_events(records: list[dict]) -> list[dict]:
    return [r["event"] | {"_t": r["t"]} for r in records
            if r.get("kind") == "scenario" and isinstance(r.get("event"), dict)]


def summarise(records: list[dict]) -> Summary:
    """Everything the demo's summary says, computed from a record (see module docstring)."""
    s = Summary()
    events: dict[str, dict] = {}          # id -> event, first delivery
    seq_ids: dict[int, str] = {}
    alarms: dict[str, dict] = {}
    diag: dict[str, list[tuple[float, dict]]] = {}    # cluster -> [(t, alarm)]
    last_snapshot: list | None = None
    bcs: dict[str, Broadcast] = {}
    responses: dict[str, list[tuple[float, dict]]] = {}
    kinds: dict[str, str] = {}
    for r in records:
        k = r.get("kind")
        if k == "response" and isinstance(r.get("payload"), dict):
            responses.setdefault(r.get("request_id") or "", []).append((r["t"], r["payload"]))
        if k == "scenario":
            ev = r.get("event") or {}
            if "end" in ev:
                s.ended, s.duration = "end", float(ev["end"].get("duration", r["t"]))
            elif "interrupted" in ev:
                s.ended, s.duration = "interrupted", r["t"]
        if k != "mqtt":
            continue
        tail, p = topic_tail(r), r.get("payload")
        if tail.startswith("clusters/") and isinstance(p, dict) and p.get("kind"):
            kinds[str(p.get("id"))] = p["kind"]
        elif tail == "alarms" and isinstance(p, list):
            last_snapshot = p
            for a in p:
                if isinstance(a, dict) and a.get("alarm_id"):
                    alarms[a["alarm_id"]] = a
                    if a.get("cluster_id"):
                        diag.setdefault(a["cluster_id"], []).append((r["t"], a))
        elif tail == "events" and isinstance(p, dict):
            eid, seq = p.get("id"), p.get("seq")
            if eid in events:
                s.duplicates += 1
                continue
            events[eid] = p
            if isinstance(seq, int):
                if seq in seq_ids and seq_ids[seq] != eid:
                    s.seq_conflicts += 1
                seq_ids.setdefault(seq, eid)
            typ = str(p.get("type", ""))
            if typ.startswith("alarm.") and p.get("alarm_id"):
                a = {k2: v for k2, v in p.items() if k2 not in ("id", "seq", "ts", "type", "historical")}
                alarms[p["alarm_id"]] = {**alarms.get(p["alarm_id"], {}), **a}
                if p.get("cluster_id") and typ == "alarm.raised":
                    diag.setdefault(p["cluster_id"], []).append((r["t"], a))
            elif typ.startswith("broadcast.") and p.get("broadcast_id"):
                b = bcs.get(p["broadcast_id"])
                if b is None:
                    b = bcs[p["broadcast_id"]] = Broadcast(p["broadcast_id"], start_t=r["t"] - PRE_S)
                b.priority = p.get("priority") or b.priority
                b.title = p.get("title") or p.get("programme_id") or b.title
                b.source = str(p.get("source") or b.source)
                b.targets = list(p.get("targets") or b.targets)
                b.reached = list(p.get("reached") or b.reached)
                b.unreached = list(p.get("unreached") or b.unreached)
                if typ in END_TYPES:
                    b.outcome, b.end_t = typ.split(".", 1)[1], r["t"]
                else:
                    b.outcome = "on air"
    if not s.duration and records:
        s.duration = records[-1]["t"]
    # broadcasts: window from the command's answer, heard = ground truth
    s.commands = _commands(records, responses)
    for t, resp, note in s.commands.pop("_answers"):
        bid = ((resp.get("data") or {}).get("broadcast_id")) if resp.get("status") == "ok" else None
        if bid in bcs:
            bcs[bid].start_t = min(bcs[bid].start_t + PRE_S, t)
            bcs[bid].note = note
    intervals = _playing_intervals(records)
    known = set(bcs)
    for b in sorted(bcs.values(), key=lambda b: b.start_t):
        b.heard = sorted(c for c in b.targets if _heard(intervals.get(c, []), b, known))
        gone = _unreachable(records, b.start_t)
        b.unreachable = sorted(c for c in b.targets if c in gone)
        s.broadcasts.append(b)
    s.alarms = list(alarms.values())
    s.active_alarm_ids = {a["alarm_id"] for a in (last_snapshot or []) if isinstance(a, dict)}
    seqs = sorted(seq_ids)
    s.events, s.max_seq = len(events), (seqs[-1] if seqs else 0)
    s.missing_seqs = sorted(set(range(1, s.max_seq + 1)) - set(seqs))
    s.verdicts = _verdicts(records, s, diag, kinds, last_snapshot or [])
    return s


def _commands(records: list[dict], responses: dict[str, list[tuple[float, dict]]]) -> dict[str, Any]:
    """Each command the scenario sent, paired with the first answer to its request id after it
    (a replay reuses the id of the command it copies)."""
    sent, ok, rejected, unanswered, answers = 0, 0, [], [], []
    for ev in _scenario_events(records):
        cmd = ev.get("command")
        rid = (ev.get("result") or {}).get("request_id")
        if not cmd or not rid:
            continue
        sent += 1
        queue = responses.get(rid) or []
        resp = queue.pop(0) if queue else None
        if resp is not None:
            answers.append((resp[0], resp[1], str(ev.get("note") or "")))
        if resp is None:
            unanswered.append(f"{cmd.get('name')} at {ev['_t']:.0f} s")
        elif resp[1].get("status") == "ok":
            ok += 1
        else:
            rejected.append(str((resp[1].get("error") or {}).get("code", "error")))
    return {"sent": sent, "ok": ok, "rejected": rejected, "unanswered": unanswered,
            "_answers": answers}


def _final_causes(cluster: str, snapshot: list) -> list[str]:
    return [str(a.get("cause")) for a in snapshot
            if isinstance(a, dict) and a.get("cluster_id") == cluster]


def _diagnosed(clusters: list[str], want: str, diag: dict, snapshot: list,
               after: float) -> tuple[bool, list[str]]:
    """Each cluster had an alarm with cause `want` after `after`, and no active alarm of it
    ends the run blaming something else."""
    ok, notes = True, []
    for c in clusters:
        seen = [(t, a) for t, a in diag.get(c, []) if t >= after - 0.5]
        first = next((t for t, a in seen if a.get("cause") == want or a.get("code", "").endswith(want)),
                     None)
        final = _final_causes(c, snapshot)
        wrong = sorted({x for x in final if x != want})
        if first is None:
            ok = False
            notes.append(f"{c}: " + (f"diagnosed {', '.join(sorted({str(a.get('cause')) for _, a in seen}))}"
                                     if seen else "no alarm"))
        elif wrong:
            ok = False
            notes.append(f"{c}: {want} at {first:.0f} s, at the end {'/'.join(wrong)}")
        else:
            notes.append(f"{c} at {first:.0f} s")
    return ok, notes


def _verdicts(records: list[dict], s: Summary, diag: dict, kinds: dict, snapshot: list) -> list[Verdict]:
    out: list[Verdict] = []
    scen = _scenario_events(records)
    storms = [e for e in scen if "lightning" in e]
    damaged = sorted({c for e in storms for c in (e["lightning"].get("damage") or {})})
    if not damaged:
        out.append(Verdict("storm diagnosed as lightning", None, "no storm damage in this scenario"))
    else:
        mon = [c for c in damaged if kinds.get(c, "ip" if c.startswith("ip") else "fm") == "ip"]
        ok, notes = _diagnosed(mon, "lightning", diag, snapshot, storms[0]["_t"])
        fm = [c for c in damaged if c not in mon]
        if fm:
            notes.append(f"{compress_ids(fm)} unmonitored FM")
        out.append(Verdict("storm diagnosed as lightning", ok if mon else None, "; ".join(notes)))
    sims = [e for e in scen if "subscription_expired" in e]
    if not sims:
        out.append(Verdict("SIM expired diagnosed", None, "no SIM expiry in this scenario"))
    else:
        cl = sorted({e["subscription_expired"]["cluster"] for e in sims})
        ok, notes = _diagnosed(cl, "subscription_expired", diag, snapshot, sims[0]["_t"])
        out.append(Verdict("SIM expired diagnosed", ok, "; ".join(notes)))
    out.append(_emergency_verdict(scen, s))
    lost = len(s.missing_seqs)
    detail = f"{s.events} events, seq 1..{s.max_seq}" + (
        f", {s.duplicates} duplicate(s)" if s.duplicates else ", no duplicates")
    if s.seq_conflicts:
        detail += f", {s.seq_conflicts} seq reused by different events"
    good = lost == 0 and not s.seq_conflicts and s.events > 0
    out.append(Verdict("events lost", good, (detail if lost == 0 else
                       f"missing seq {compress_ids(map(str, s.missing_seqs[:20]))}; {detail}"),
                       word="none" if lost == 0 else f"{lost} gaps"))
    return out


def _emergency_verdict(scen: list[dict], s: Summary) -> Verdict:
    name = "emergency heard by every reachable cluster"
    ems = [b for b in s.broadcasts if b.priority == "emergency"]
    asked = [e for e in scen if (e.get("command") or {}).get("name") == "broadcast.start"
             and ((e["command"].get("args") or {}).get("priority") == "emergency")
             and e["command"].get("signed", True) is True]
    if not ems:
        return Verdict(name, False if asked else None,
                       f"{len(asked)} emergency command(s) sent, none went on air" if asked
                       else "no emergency broadcast in this scenario")
    ok, parts = True, []
    for b in ems:
        reach = [c for c in b.targets if c not in b.unreachable]
        missing = sorted(set(reach) - set(b.heard))
        ok = ok and not missing
        txt = f"{len(set(reach) & set(b.heard))} of {len(reach)}"
        txt += f"; missing {compress_ids(missing)}" if missing else ""
        if b.unreachable:
            txt += f"; unreachable {compress_ids(b.unreachable)}"
        parts.append(txt)
    return Verdict(name, ok, " | ".join(parts))


def summary_lines(s: Summary, width: int = 80) -> list[str]:
    """The end-of-run summary as plain text lines no wider than `width`."""
    out: list[str] = []

    def add(text: str, indent: str = "  ") -> None:
        out.extend(textwrap.wrap(text, width, subsequent_indent=indent + "  ",
                                 initial_indent=indent, break_on_hyphens=False) or [""])
    out.append(f"Summary ({s.duration:.0f} s, {'ran to its end' if s.ended == 'end' else s.ended})")
    out.append(f"Broadcasts ({len(s.broadcasts)}):")
    for b in s.broadcasts:
        end = f"{b.end_t:.0f}" if b.end_t is not None else "end"
        add(f"{b.start_t:.0f}-{end} s {b.priority} {b.source} \"{b.note or b.title or b.broadcast_id}\": "
            f"{b.outcome}; daemon says reached {len(b.reached)} of {len(b.targets)}; "
            f"heard (ground truth) {len(b.heard)}: {compress_ids(b.heard)}")
    n_active = sum(1 for a in s.alarms if a.get("alarm_id") in s.active_alarm_ids)
    out.append(f"Alarms ({len(s.alarms)} raised, {n_active} active at the end):")
    for a in sorted(s.alarms, key=lambda a: str(a.get("raised_at", ""))):
        state = "active" if a.get("alarm_id") in s.active_alarm_ids else "cleared"
        ev = "; ".join(str(x) for x in (a.get("evidence") or [])[:2])
        add(f"{a.get('cluster_id') or '-'} {a.get('code')} [{state}] cause {a.get('cause')} "
            f"({float(a.get('confidence') or 0):.0%}): {ev}")
    c = s.commands
    if c.get("sent"):
        add(f"Commands: {c['sent']} sent, {c['ok']} accepted, {len(c['rejected'])} rejected"
            + (f" ({', '.join(c['rejected'])})" if c["rejected"] else "")
            + (f", {len(c['unanswered'])} unanswered ({', '.join(c['unanswered'])})"
               if c["unanswered"] else ""), indent="")
    add(f"Events delivered: {s.events} (seq 1..{s.max_seq}, "
        f"{'gapless' if not s.missing_seqs else f'{len(s.missing_seqs)} missing'}, "
        f"{s.duplicates} duplicate deliveries)", indent="")
    out.append("Verdicts:")
    for v in s.verdicts:
        add(v.line())
    return out

"""Soak: the simulated Bình Lư site for N minutes of schedule, telemetry and faults.

A long scenario is generated (one 60 s cycle repeated): a central programme every
minute, commanded broadcasts, line noise and an unplugged cable on the transmitter,
4G link cuts, a power cut, broker outages and refused commands, all through
`run_scenario` against the real daemon. Prints the daemon's RSS and open fds at start,
every few minutes and at the end, and what the central server saw (seq gaps included).

    .venv/bin/python -m bench.soak --minutes 30        # default; CI never runs this
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.central import SeqTracker  # noqa: E402
from device_drivers.sim.runner import run_scenario  # noqa: E402

SITE = ROOT / "config" / "binhlu.yaml"


def scenario(minutes: float, restarts: bool) -> dict:
    cycles = max(1, int(minutes))
    until = (datetime.now(UTC) + timedelta(minutes=minutes + 5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ev: list[dict] = [{"at": "3s", "command": {"name": "schedule.put", "args": {
        "id": "soak-minutely", "title": "Bản tin mỗi phút", "priority": "normal",
        "source": {"tts": {"text": "Bản tin thử nghiệm hằng phút."}}, "targets": ["trung-tam"],
        # every minute, clear of the site's own normal-priority relays (05:30, 17:00)
        "recurrence": {"cron": {"minute": "*", "hour": "0-4,6-16,18-23"}}, "duration_s": 20,
        "valid_until": until}}}]
    for c in range(cycles):
        t = c * 60

        def at(s: float, t: float = t, **e: object) -> None:
            ev.append({"at": f"{t + s}s", **e})
        at(5, command={"name": "broadcast.start", "args": {
            "priority": "priority", "targets": ["ban-01"],
            "source": {"tts": {"text": f"Thông báo số {c + 1}."}}}})
        at(12, transmitter={"garbage": 200})
        at(18, link_cut={"cluster": "ip04", "duration": "5s"})
        at(25, command={"name": "status.get"})
        at(32, power_cut={"clusters": ["ban-02"], "duration": "4s"})
        if c % 2 == 1:
            at(40, broker_outage={"duration": "3s"})
        if c % 3 == 2:
            at(46, transmitter={"unplugged": "3s"})
        at(52, command={"name": "status.get", "signed": False})
        if restarts and c % 10 == 9:
            at(56, gateway_restart={"hard": True})
    return {"title": f"soak {minutes:g} min", "duration": f"{int(minutes * 60)}s",
            "timing": {"heartbeat_timeout": "6s", "health_interval": "30s", "poll_fast": "1s",
                       "poll_slow": "10s"}, "events": ev}


def proc(pid: int) -> dict | None:
    try:
        st = Path(f"/proc/{pid}/status").read_text().splitlines()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    v = {ln.split(":")[0]: ln.split()[1] for ln in st if ln.startswith(("VmRSS", "Threads"))}
    return {"rss_mb": int(v["VmRSS"]) / 1024, "fds": fds, "threads": int(v["Threads"])}


class Watch:
    """Follows the record: the daemon's pid, what the central server received."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.t0 = time.monotonic()
        self.tracker = SeqTracker()
        self.types: collections.Counter = collections.Counter()
        self.problems: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, rec: dict) -> None:
        with self.lock:
            if rec.get("kind") == "scenario":
                e = rec.get("event") or {}
                pid = (e.get("start") or {}).get("daemon_pid") or e.get("daemon_pid")
                if pid:
                    self.pid = pid
            elif rec.get("kind") == "mqtt" and rec.get("topic", "").endswith("/events"):
                p = rec.get("payload")
                if isinstance(p, dict):
                    self.types[p.get("type")] += 1
                    for kind, _ in self.tracker.feed(p):
                        self.problems[kind] += 1


def sample(w: Watch, label: str, samples: list) -> None:
    if w.pid is None:
        return
    s = proc(w.pid)
    if s is None:
        return
    s.update(pid=w.pid, label=label, t_min=(time.monotonic() - w.t0) / 60)
    samples.append(s)
    print(f"[{s['t_min']:5.1f} min] {label:5s} pid {w.pid}: RSS {s['rss_mb']:.1f} MB, "
          f"{s['fds']} fds, {s['threads']} threads", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--report-every", type=float, default=5, help="minutes between samples")
    ap.add_argument("--warmup", type=float, default=75, help="seconds before the start sample "
                    "(the first broadcasts load the audio stack once)")
    ap.add_argument("--restarts", action="store_true", help="also SIGKILL the daemon every 10 min")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="loaxa-soak-"))
    wd.mkdir(parents=True, exist_ok=True)
    sc = wd / "soak.yaml"
    sc.write_text(yaml.safe_dump(scenario(a.minutes, a.restarts), allow_unicode=True, sort_keys=False))
    watch, samples, done = Watch(), [], threading.Event()

    def sampler() -> None:
        if done.wait(a.warmup):
            return
        sample(watch, "start", samples)
        while not done.wait(a.report_every * 60):
            sample(watch, "", samples)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    last = threading.Timer(max(1.0, a.minutes * 60 - 3), lambda: sample(watch, "end", samples))
    last.start()
    t0 = time.monotonic()
    rc = run_scenario(SITE, sc, wd / "soak.jsonl", on_record=watch, workdir=wd / "run",
                      report=lambda text: print(text, file=sys.stderr))
    done.set()
    last.cancel()
    print(f"\nscenario rc={rc} in {(time.monotonic() - t0) / 60:.1f} min; record {wd / 'soak.jsonl'}")
    same = [s for s in samples if s["pid"] == samples[0]["pid"]] if samples else []
    if len(same) >= 2:
        a0, a1 = same[0], same[-1]
        print(f"daemon pid {a0['pid']}: RSS {a0['rss_mb']:.1f} -> {a1['rss_mb']:.1f} MB "
              f"({a1['rss_mb'] - a0['rss_mb']:+.1f}) over {a1['t_min'] - a0['t_min']:.1f} min; "
              f"fds {a0['fds']} -> {a1['fds']}; threads {a0['threads']} -> {a1['threads']}")
    t = watch.tracker
    print(f"events received: {sum(watch.types.values())} (highest seq {t.last}); "
          f"open gaps {len(t.missing)}; {dict(watch.problems) or 'no gap/duplicate reports'}")
    print("by type: " + ", ".join(f"{k} {v}" for k, v in watch.types.most_common()))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

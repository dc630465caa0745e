"""`loaxa demo`: the real command on a short scenario (real daemon, mosquitto, simulators),
its summary's verdicts against ground truth, the live view at 80 columns, and Ctrl-C.

One demo run (about 20 s) is shared by the module; the summary and view tests replay its
record, and the broken-record tests edit a copy of it so each verdict is seen to fail.
"""
from __future__ import annotations

import copy
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from controller.config import load_site
from controller.demo import _zones, trimmed_scenario
from controller.demo_view import DemoView, summarise, topic_tail
from device_drivers.sim.record import read_record
from device_drivers.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "config" / "binhlu.yaml"
BAN01 = {"ip02", "fm06", "fm07", "fm08", "fm09"}

SHORT = """\
title: Short demo
duration: 20s
timing: {heartbeat_timeout: 3s, health_interval: 10s}
events:
  - at: 3s
    note: A notice to Bản 01
    command:
      name: broadcast.start
      args: {priority: priority, source: {tts: {text: "Họp dân.", voice: vi}}, targets: [ban-01]}
  - at: 7s
    note: Lightning over Bản 02
    lightning:
      strikes: 5
      distance_km: 3
      near: [ban-02]
      damage: {fm10: [surge_protector_tripped], ip03: [surge_protector_tripped]}
  - at: 8s
    subscription_expired: {cluster: ip05}
  - at: 10s
    note: Storm warning
    command:
      name: broadcast.start
      args: {priority: emergency, source: {tts: {text: "Bão đang đến.", voice: vi}}, targets: all}
"""


def demo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", "demo", *args]


def procs_mentioning(text: str) -> list[str]:
    """Live processes whose command line mentions `text` (the runs' temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or d.name == str(os.getpid()):
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state != "Z":
            out.append(cmd)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`loaxa demo --no-ui` on the short scenario; TMPDIR inside the test's dir, so every
    process of the run (daemon, mosquitto) has that dir in its command line."""
    tmp = tmp_path_factory.mktemp("demo")
    (tmp / "tmp").mkdir()
    sc = tmp / "short.yaml"
    sc.write_text(SHORT, encoding="utf-8")
    rec = tmp / "short.jsonl"
    env = {**os.environ, "TMPDIR": str(tmp / "tmp")}
    t0 = time.monotonic()
    r = subprocess.run(demo_cmd("--no-ui", "--scenario", str(sc), "--record", str(rec)),
                       cwd="/", env=env, capture_output=True, text=True, timeout=60)
    return {"proc": r, "records": read_record(rec), "tmp": tmp, "wall": time.monotonic() - t0,
            "scenario": sc}


def test_demo_runs_the_day_and_says_what_happened(run):
    r = run["proc"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # log lines as it goes, then the summary with the verdicts the acceptance reads
    assert "scenario lightning: Lightning over Bản 02" in out
    assert "event #1 gateway.started" in out
    assert "broadcast.started emergency tts" in out
    assert "storm diagnosed as lightning: yes (ip03" in out
    assert "fm10 unmonitored FM" in out
    assert "SIM expired diagnosed: yes (ip05" in out
    assert "emergency heard by every reachable cluster: yes" in out
    assert "events lost: none" in out
    assert f"record: {run['tmp'] / 'short.jsonl'}" in out
    # the whole run fits the scenario plus a small start/stop overhead; nothing outlives it
    assert run["wall"] < 20 + 12
    assert run["records"][-1]["event"].get("finished") is not None
    assert not procs_mentioning(str(run["tmp"]))


def test_summary_judges_broadcasts_by_ground_truth(run):
    s = summarise(run["records"])
    assert s.ended == "end"
    notice, emergency = s.broadcasts
    assert notice.note == "A notice to Bản 01" and notice.priority == "priority"
    # the notice was heard in Bản 01 and nowhere else (FM receivers decoded the codes)
    assert set(notice.heard) == BAN01
    assert emergency.priority == "emergency" and emergency.outcome == "finished"
    assert set(emergency.unreachable) == {"fm10", "ip05"}     # damaged receiver, dead SIM
    assert set(emergency.heard) == set(emergency.targets) - {"fm10", "ip05"}
    assert len(emergency.targets) == 35
    ok = {v.name: v.ok for v in s.verdicts}
    assert ok == {"storm diagnosed as lightning": True, "SIM expired diagnosed": True,
                  "emergency heard by every reachable cluster": True, "events lost": True}
    assert s.missing_seqs == [] and s.duplicates == 0 and s.events == s.max_seq > 5
    assert all(len(line) <= 80 for line in s.lines(80))


def _verdict(records: list[dict], name: str):
    return next(v for v in summarise(records).verdicts if v.name == name)


def test_summary_verdicts_fail_on_a_record_that_shows_failure(run):
    recs = copy.deepcopy(run["records"])
    # an event lost in transit and another delivered twice
    evs = [r for r in recs if r["kind"] == "mqtt" and topic_tail(r) == "events"]
    lost = evs[3]
    recs.remove(lost)
    recs.insert(recs.index(evs[5]) + 1, copy.deepcopy(evs[5]))
    v = _verdict(recs, "events lost")
    assert not v.ok and v.line().startswith("events lost: 1 gaps")
    assert str(lost["payload"]["seq"]) in v.detail and "1 duplicate" in v.detail
    # a receiver that never played the emergency
    em = next(b for b in summarise(recs).broadcasts if b.priority == "emergency")
    quiet = [r for r in recs if not (r["kind"] == "cluster" and r["cluster"] == "fm20"
                                     and r["t"] >= em.start_t)]
    v = _verdict(quiet, "emergency heard by every reachable cluster")
    assert not v.ok and "missing fm20" in v.detail and "32 of 33" in v.detail
    # the daemon blaming the wrong cause for the storm damage, or missing the SIM
    for r in recs:
        p = r.get("payload")
        for a in (p if isinstance(p, list) else [p] if isinstance(p, dict) else []):
            if isinstance(a, dict) and a.get("cluster_id") in ("ip03", "ip05"):
                a["cause"] = "unknown"
                a["code"] = "cluster.offline"
    assert not _verdict(recs, "storm diagnosed as lightning").ok
    assert "ip03: diagnosed unknown" in _verdict(recs, "storm diagnosed as lightning").detail
    assert not _verdict(recs, "SIM expired diagnosed").ok


def _view(records: list[dict], until: float, **kw) -> DemoView:
    v = DemoView(_zones(load_site(SITE)), title="Short demo", duration=20, **kw)
    for r in records:
        if r["t"] > until:
            break
        v.apply(r)
    return v


def _text(view: DemoView, *, width: int = 80, height: int = 30, encoding: str = "utf-8") -> str:
    buf = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict")
    c = Console(file=buf, width=width, height=height, record=True, color_system=None)
    c.print(view.render(c.width, c.height))
    return c.export_text()


def test_live_view_fits_80_columns_all_along(run):
    recs = run["records"]
    em = next(b for b in summarise(recs).broadcasts if b.priority == "emergency")
    view, checkpoints = _view([], 0), [x / 2 for x in range(0, 44)]
    for r in [*recs, {"t": 99.0, "kind": "end-of-test"}]:
        while checkpoints and r["t"] > checkpoints[0]:     # the view as it stood at each 0.5 s
            lines = _text(view).splitlines()
            assert max(len(line) for line in lines) <= 80, checkpoints[0]
            assert len(lines) <= 30
            checkpoints.pop(0)
        view.apply(r)
    # during the emergency: what is on air, who plays (ground truth), the TA flag, the uplink
    mid = _view(recs, (em.start_t + em.end_t) / 2 + 1)
    text = _text(mid)
    assert "ON AIR  emergency  Storm warning" in text
    assert "fm01·♪" in text and "fm10· †" in text and "ip05✕ !" in text
    assert "TA on" in text and "UPLINK online" in text
    assert "subscription_expired" in text
    # a small terminal: still 80 wide, never taller than it
    small = _text(mid, height=24).splitlines()
    assert len(small) <= 24 and max(map(len, small)) <= 80


def test_live_view_degrades_to_ascii(run):
    recs = run["records"]
    em = next(b for b in summarise(recs).broadcasts if b.priority == "emergency")
    v = _view(recs, em.start_t + 3, ascii_only=True)
    text = _text(v, encoding="ascii")       # would raise on any non-ASCII glyph
    assert "fm01.*" in text and "ip05X !" in text


def test_duration_trims_the_scenario(run, tmp_path):
    out = trimmed_scenario(run["scenario"], 9.0, tmp_path)
    sc = load_scenario(out, load_site(SITE))
    assert sc.duration == 9.0
    assert [e.kind for e in sc.events] == ["command", "lightning", "subscription_expired"]


def test_unknown_scenario_is_a_clear_error():
    r = subprocess.run(demo_cmd("--no-ui", "--scenario", "no-such-day"), cwd="/",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "scenario not found: no-such-day (shipped: demo-day, smoke)" in r.stderr


def test_ctrl_c_stops_everything_and_exits_130(tmp_path):
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    p = subprocess.Popen(demo_cmd("--no-ui", "--record", str(tmp_path / "day.jsonl")), cwd="/",
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True)
    reader.start()
    seen = []
    try:
        deadline = time.monotonic() + 20
        while not any("uplink online" in x for x in seen) and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        assert any("uplink online" in x for x in seen), "".join(seen)
        assert procs_mentioning(str(tmp_path))        # the daemon and mosquitto are running
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 130
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(5)     # the pipe is at EOF once the demo has exited
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert "Summary (" in out and "interrupted" in out
    assert read_record(tmp_path / "day.jsonl")[-1]["event"].get("finished") is not None
    assert not procs_mentioning(str(tmp_path))

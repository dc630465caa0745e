"""The black-box scenario runner: real daemon, real mosquitto, ptys, ALSA capture.

These tests check the harness, not what the daemon does with the events: exit codes and
messages, the record's shape and ground truth from the simulators, the time budget, and
that no process outlives a run (found by scanning /proc for the run's work dir).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

from device_drivers.sim.record import read_record
from device_drivers.sim.runner import daemon_log_path, run_scenario

ROOT = Path(__file__).resolve().parent.parent
BINHLU = ROOT / "config" / "binhlu.yaml"


def simulate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device_drivers.sim.runner", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def procs_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line mentions `text` (the run's work dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines()
                          if ln.startswith("State:")), "")
        except OSError:
            continue
        if text in cmd and "zombie" not in state:
            out.append((int(d.name), cmd))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if ln.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def test_invalid_scenario_exits_2_with_file_and_line(tmp_path):
    sc = tmp_path / "bad.yaml"
    sc.write_text("duration: 10s\nevents:\n  - at: 2s\n    link_cut: {cluster: ip44, duration: 3s}\n"
                  "  - at: 3s\n    gateway_restart: {hard: true, kill: 9}\n")
    wd = tmp_path / "wd"
    r = simulate("--site", str(BINHLU), "--scenario", str(sc), "--record",
                 str(tmp_path / "out.jsonl"), "--workdir", str(wd), timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"{sc}:6: events[1].gateway_restart.kill: unknown key" in r.stderr
    assert "problem(s); the simulation did not run" in r.stderr
    assert not procs_mentioning(str(wd))
    # shape errors come first; once fixed, the bad cluster id is reported with its line
    sc.write_text(sc.read_text().replace(", kill: 9", ""))
    r = simulate("--site", str(BINHLU), "--scenario", str(sc), "--record",
                 str(tmp_path / "out.jsonl"), timeout=30)
    assert r.returncode == 2
    assert f"{sc}:4: events[0].link_cut.cluster: no cluster with id 'ip44'" in r.stderr


def test_invalid_site_file_exits_2_naming_the_site_file(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(BINHLU.read_text().replace("power_w: 50", "power_w: -50"))
    r = simulate("--site", str(site), "--scenario", "smoke", "--record",
                 str(tmp_path / "out.jsonl"), timeout=30)
    assert r.returncode == 2
    assert f"site file: {site}:" in r.stderr and "transmitter.power_w" in r.stderr


SHORT = """\
duration: 9s
timing: {heartbeat_timeout: 3s, health_interval: 5s}
events:
  - at: 1s
    command: {name: status.get}
  - at: 1.5s
    transmitter: {vswr: 2.9, unplugged: 1s}
  - at: 2s
    link_cut: {cluster: ip04, duration: 2s}
  - at: 2.5s
    lightning: {strikes: 2, distance_km: 5, near: [ban-02], damage: {ip03: [dead], fm07: [surge_protector_tripped]}}
  - at: 3s
    command: {name: status.get, signed: forged}
  - at: 3.2s
    command: {name: status.get, signed: replay}
  - at: 3.5s
    broker_outage: {duration: 1.5s}
  - at: 6s
    gateway_restart: {hard: true}
  - at: 7s
    command: {name: rebirth, request_id: after-outage}
"""


def test_short_scenario_records_everything_and_leaves_nothing_behind(tmp_path):
    sc = tmp_path / "short.yaml"
    sc.write_text(SHORT)
    out = tmp_path / "out.jsonl"
    wd = tmp_path / "wd"
    t0 = time.monotonic()
    r = simulate("--site", str(BINHLU), "--scenario", str(sc), "--record", str(out),
                 "--workdir", str(wd))
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed < 9 + 10, f"took {elapsed:.1f} s for a 9 s scenario"
    assert not procs_mentioning(str(wd)), "a daemon or broker outlived the run"

    rec = read_record(out)
    times = [x["t"] for x in rec]
    assert times == sorted(times)
    kinds = {x["kind"] for x in rec}
    assert {"scenario", "mqtt", "cluster"} <= kinds
    scen = [x["event"] for x in rec if x["kind"] == "scenario"]
    assert scen[0]["start"]["site"] == "binhlu" and "finished" in scen[-1]
    assert next(x["t"] for x in rec if x["kind"] == "scenario" and "end" in x["event"]) >= 9
    applied = [e for e in scen if "at" in e]
    assert [next(k for k in e if k not in ("at", "index", "result", "note")) for e in applied] == [
        "command", "transmitter", "link_cut", "lightning", "command", "command", "broker_outage",
        "gateway_restart", "command"]
    assert not any("error" in e for e in applied), applied
    by_index = {e["index"]: e for e in applied}
    assert by_index[0]["result"]["signed"] is True
    assert by_index[5]["result"]["request_id"] == by_index[0]["result"]["request_id"]  # replay

    # every cluster of the site has its ground truth, and the lightning's "dead" shows
    cl = [x for x in rec if x["kind"] == "cluster"]
    assert {x["cluster"] for x in cl} == {f"ip{i:02d}" for i in range(1, 7)} | {
        f"fm{i:02d}" for i in range(1, 30)}
    assert any(x["cluster"] == "ip03" and x.get("alive") is False and x["t"] >= 2.5 for x in cl)

    # transmitter ground truth comes from its simulator: the injected VSWR shows at once
    start = scen[0]["start"]
    assert {"transmitter_sim", "ip_cluster_sim", "fm_receiver_sim", "lightning_sim"} <= set(
        start["simulators"]), start
    tx = [x for x in rec if x["kind"] == "transmitter"]
    assert tx[0]["t"] <= 0.05 and {"carrier", "frequency_mhz", "power_w", "rds"} <= set(tx[0])
    assert any(x["vswr"] == 2.9 and 1.5 <= x["t"] < 2 for x in tx)
    assert by_index[3]["result"]["sensor"] == "strikes sent"

    # the simulated central server heard its commands, byte for byte: the replay is identical
    cmds = [x for x in rec if x["kind"] == "mqtt" and "/cmd/" in x["topic"]]
    assert [c["topic"].rsplit("/", 1)[1] for c in cmds] == ["status.get"] * 3 + ["rebirth"]
    assert cmds[2]["payload"] == cmds[0]["payload"] and cmds[1]["payload"] != cmds[0]["payload"]
    # ...and it resubscribed after the broker outage (the last command is heard after it)
    healed = next(x["t"] for x in rec if x["kind"] == "scenario"
                  and x["event"].get("ended") == "broker_outage")
    assert cmds[3]["payload"]["request_id"] == "after-outage" and cmds[3]["t"] > healed >= 5.0

    # the hard restart replaced the daemon; neither daemon survives
    restart = next(x["event"] for x in rec if x["kind"] == "scenario"
                   and x["event"].get("ended") == "gateway_restart")
    first = scen[0]["start"]["daemon_pid"]
    assert restart["daemon_pid"] != first
    crashed_before = any("daemon_exited" in e and x["t"] < 6 for x in rec
                         if x["kind"] == "scenario" for e in [x["event"]])
    assert crashed_before or by_index[7]["result"]["stopped_rc"] == -signal.SIGKILL
    assert not pid_alive(first) and not pid_alive(restart["daemon_pid"])
    # the daemon's own log is kept beside the record
    assert daemon_log_path(out).read_bytes() == (wd / "daemon.log").read_bytes() != b""
    # the daemon ran with the rewritten site file: the endpoints only
    site = (wd / "site.yaml").read_text()
    assert "mqtt://127.0.0.1:" in site and str(wd / "dev" / "transmitter") in site
    assert "laichau.example" not in site.split("programmes:")[0]
    assert "heartbeat_timeout_s: 3.0" in site and "news-morning" in site


def test_library_call_stops_on_request_with_live_records(tmp_path):
    sc = tmp_path / "long.yaml"
    sc.write_text("duration: 60s\nevents:\n  - at: 1s\n    command: {name: status.get}\n")
    wd = tmp_path / "wd"
    seen: list[dict] = []
    stop = threading.Event()

    def on_record(obj):
        seen.append(obj)
        if obj["kind"] == "scenario" and "command" in obj["event"]:
            stop.set()
    t0 = time.monotonic()
    rc = run_scenario(BINHLU, sc, tmp_path / "out.jsonl", on_record=on_record,
                      stop_event=stop, workdir=wd)
    assert rc == 130
    assert time.monotonic() - t0 < 15
    assert seen[0]["event"]["start"]["duration"] == 60
    assert any("interrupted" in x["event"] for x in seen if x["kind"] == "scenario")
    assert not procs_mentioning(str(wd))


def test_ctrl_c_stops_everything(tmp_path):
    wd = tmp_path / "wd"
    out = tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "device_drivers.sim.runner", "--site", str(BINHLU),
                          "--scenario", "smoke", "--record", str(out), "--workdir", str(wd)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:   # wait until the daemon runs
            if out.exists() and any("start" in x.get("event", {}) for x in read_record(out)):
                break
            time.sleep(0.1)
        daemon_pid = read_record(out)[0]["event"]["start"]["daemon_pid"]
        assert pid_alive(daemon_pid)
        assert len(procs_mentioning(str(wd))) >= 2   # the daemon and the broker, seen here
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert not pid_alive(daemon_pid)
    assert not procs_mentioning(str(wd)), "a daemon or broker outlived Ctrl-C"
    assert any("interrupted" in x["event"] for x in read_record(out) if x["kind"] == "scenario")


def test_even_a_killed_runner_leaves_nothing_behind(tmp_path):
    wd = tmp_path / "wd"
    out = tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "device_drivers.sim.runner", "--site", str(BINHLU),
                          "--scenario", "smoke", "--record", str(out), "--workdir", str(wd)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(procs_mentioning(str(wd))) < 2:
            time.sleep(0.1)
        assert len(procs_mentioning(str(wd))) >= 2
        p.kill()                       # no finally-block runs: the kernel must clean up
        p.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and procs_mentioning(str(wd)):
            time.sleep(0.1)
        assert not procs_mentioning(str(wd))
    finally:
        if p.poll() is None:
            p.kill()


def test_unplugged_transmitter_port_vanishes_and_returns_with_the_same_device(tmp_path):
    """What the daemon's serial port sees when a scenario pulls the transmitter's cable."""
    import asyncio

    from controller.config import load_site
    from device_drivers.sim.record import Recorder
    from device_drivers.sim.site_sim import SiteSim

    cfg = load_site(ROOT / "config" / "minimal.yaml")   # no IP clusters: no broker needed

    def ask(fd: int, line: bytes) -> bytes:
        os.write(fd, line)
        got = b""
        deadline = time.monotonic() + 2
        while not got.endswith(b"\r\n") and time.monotonic() < deadline:
            try:
                got += os.read(fd, 256)
            except BlockingIOError:
                time.sleep(0.01)
        return got

    async def main() -> None:
        rec = Recorder(tmp_path / "r.jsonl")
        s = SiteSim(cfg, "mqtt://127.0.0.1:9", tmp_path, rec, capture_path=tmp_path / "air.raw")
        await s.start()
        try:
            link = Path(s.ports["transmitter"])
            fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)   # the daemon's side
            tty.setraw(fd)
            assert await asyncio.to_thread(ask, fd, b"TX.OPMODE ON\r\n") == b"OK\r\n"
            s.unplug_transmitter(0.5)
            assert not link.exists()
            try:   # hung up: end of file (pyserial: "device disconnected") or EIO
                assert os.read(fd, 1) == b"", "the old port still reads"
            except BlockingIOError:
                raise AssertionError("the old port did not hang up") from None
            except OSError:
                pass
            os.close(fd)
            await asyncio.sleep(0.7)
            assert link.exists()
            fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(fd)
            # the same exciter is back, its state kept: the carrier is still on
            assert await asyncio.to_thread(ask, fd, b"TX.OPMODE?\r\n") in (
                b"TX.OPMODE=ON\r\n", b"TX.OPMODE=1\r\n")
            os.close(fd)
        finally:
            await s.stop()
        assert not Path(s.ports["transmitter"]).exists()
    asyncio.run(main())

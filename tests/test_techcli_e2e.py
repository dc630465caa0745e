"""The technician's commands against the real daemon on the simulated Bình Lư site.

A scenario runs in the background (real daemon, real broker, simulators); meanwhile the
real `loaxa` CLI talks to the daemon's control socket, in Vietnamese and English, and
with --json for scripts. What the simulators observed is the ground truth.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_drivers.sim.record import read_record
from device_drivers.sim.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = """\
duration: 40s
timing:
  heartbeat_timeout: 5s
  health_interval: 5s
events:
  - at: 30s
    lightning: {strikes: 2, distance_km: 5, near: [ip02], damage: {ip02: [surge_protector_tripped]}}
"""


@pytest.fixture(scope="module")
def site_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("techcli")
    sc = wd / "scenario.yaml"
    sc.write_text(SCENARIO)
    record = wd / "record.jsonl"
    stop = threading.Event()
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", run_scenario(
        ROOT / "config" / "binhlu.yaml", sc, record, stop_event=stop, workdir=wd / "work",
        keep_workdir=True)), daemon=True)
    t.start()
    sock = wd / "work" / "control.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sock.exists() and cli(sock, "status", "--json").returncode == 0:
            break
        time.sleep(0.3)
    else:
        stop.set()
        pytest.fail("daemon control socket never answered")
    yield {"sock": sock, "record": record, "thread": t, "result": result, "stop": stop}
    stop.set()
    t.join(60)


def cli(sock: Path, *args: str, lang: str = "en") -> subprocess.CompletedProcess:
    env = dict(os.environ, LOAXA_LANG=lang, COLUMNS="80")
    return subprocess.run([sys.executable, "-m", "controller.cli", *args, "--socket", str(sock)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_status_in_both_languages_and_json(site_run):
    r = cli(site_run["sock"], "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["site"]["id"] == "binhlu"
    assert data["health"]["counts"]["clusters_total"] == 35
    assert data["health"]["counts"]["unmonitored"] == 29  # FM clusters: no return channel
    en = cli(site_run["sock"], "status", lang="en")
    vi = cli(site_run["sock"], "status", lang="vi")
    assert en.returncode == vi.returncode == 0
    assert en.stdout != vi.stdout
    assert "binhlu" in en.stdout and "binhlu" in vi.stdout
    assert all(len(line) <= 80 for line in en.stdout.splitlines() + vi.stdout.splitlines())


def test_clusters_table_and_zone_filter(site_run):
    data = json.loads(cli(site_run["sock"], "clusters", "--json").stdout)
    by_id = {c["id"]: c for c in data}
    assert len(by_id) == 35
    assert by_id["fm07"]["availability"] == "unmonitored"
    assert by_id["ip01"]["kind"] == "ip" and by_id["ip01"]["subscription"]["days_left"] is not None
    zone = json.loads(cli(site_run["sock"], "clusters", "--zone", "ban-01", "--json").stdout)
    assert {c["id"] for c in zone} == {"ip02", "fm06", "fm07", "fm08", "fm09"}
    vi = cli(site_run["sock"], "clusters", lang="vi")
    assert vi.returncode == 0 and "fm29" in vi.stdout


def test_test_cluster_ip_answers_and_fm_explains(site_run):
    ip = cli(site_run["sock"], "test-cluster", "ip04", "--json")
    assert ip.returncode == 0, ip.stdout + ip.stderr
    d = json.loads(ip.stdout)
    assert d["kind"] == "ip" and d["answered"] is True, d
    fm = cli(site_run["sock"], "test-cluster", "fm12", "--json")
    f = json.loads(fm.stdout)
    assert f["kind"] == "fm" and f["return_channel"] is False
    assert f["wake_codes"] == ["*112#"] and f["sleep_codes"] == ["#112*"]
    human = cli(site_run["sock"], "test-cluster", "fm12", lang="en")
    assert "112" in human.stdout
    time.sleep(6)  # let the test tones end before the next test plays
    rec = read_record(site_run["record"])
    assert any(r.get("kind") == "cluster" and r.get("cluster") == "ip04" and r.get("playing") for r in rec)


def wait_air_free(sock: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if json.loads(cli(sock, "status", "--json").stdout)["on_air"] is None:
            return
        time.sleep(0.5)
    raise AssertionError("something stayed on air")


def test_play_and_stop_are_logged_as_local_operator(site_run):
    wait_air_free(site_run["sock"])
    r = cli(site_run["sock"], "play", "--tts", "Thử loa bản hai", "--targets", "ban-02", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    bid = json.loads(r.stdout)["broadcast_id"]
    time.sleep(2.5)
    s = cli(site_run["sock"], "stop", bid, "--json")
    assert s.returncode == 0 and json.loads(s.stdout)["stopped"] == [bid]
    time.sleep(1.0)
    log = json.loads(cli(site_run["sock"], "log", "--json").stdout)
    row = next(x for x in log if x["broadcast_id"] == bid)
    assert row["ordered_by"].startswith("local:")
    assert row["outcome"].startswith("stopped")
    csv_out = cli(site_run["sock"], "log", "--csv")
    assert csv_out.returncode == 0 and bid in csv_out.stdout


def test_unknown_cluster_is_a_clear_error(site_run):
    r = cli(site_run["sock"], "test-cluster", "fm99")
    assert r.returncode == 1
    assert "fm99" in (r.stdout + r.stderr)


def test_cluster_note_and_alarms(site_run):
    r = cli(site_run["sock"], "cluster", "note", "fm07", "--status", "damaged", "--cause", "lightning",
            "--text", "loa bị cháy sau cơn giông", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    alarms = json.loads(cli(site_run["sock"], "alarms", "--json").stdout)
    mine = [a for a in alarms if a.get("cluster_id") == "fm07"]
    assert mine and mine[0]["cause"] == "lightning" and mine[0]["confidence"] == 1.0
    vi = cli(site_run["sock"], "alarms", lang="vi")
    assert vi.returncode == 0 and "fm07" in vi.stdout
    rep = cli(site_run["sock"], "cluster", "note", "fm07", "--status", "repaired", "--json")
    assert rep.returncode == 0
    alarms = json.loads(cli(site_run["sock"], "alarms", "--json").stdout)
    assert not [a for a in alarms if a.get("cluster_id") == "fm07"]
    time.sleep(1.0)
    rec = read_record(site_run["record"])
    notes = [r["payload"] for r in rec if r.get("kind") == "mqtt" and r["topic"].endswith("/events")
             and r["payload"].get("type") == "cluster.maintenance"]
    assert [n["status"] for n in notes if n.get("cluster_id") == "fm07"][:2] == ["damaged", "repaired"]


def test_daemon_not_running_says_how_to_start_it(tmp_path):
    for lang, word in (("en", "systemctl start loaxa"), ("vi", "systemctl start loaxa")):
        r = cli(tmp_path / "nothing.sock", "status", lang=lang)
        assert r.returncode == 3
        assert word in r.stdout + r.stderr
        assert "journalctl -u loaxa" in r.stdout + r.stderr

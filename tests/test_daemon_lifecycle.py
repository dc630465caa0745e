"""The daemon as systemd runs it: READY, watchdog pings, SIGHUP reload, clean SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from support.site import site_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_daemon(cfg, notify_path, tmp_path, extra_env=None):
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000", PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_PID", None)
    env.update(extra_env or {})
    out = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(cfg)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def test_ready_watchdog_reload_and_clean_stop(tmp_path, notify_socket):
    cfg = site_file(tmp_path)  # broker port 9: nothing listens — must run offline
    proc = start_daemon(cfg, notify_socket.path, tmp_path)
    try:
        notify_socket.wait_for("READY=1", timeout=20)
        n0 = sum(m == "WATCHDOG=1" for m in notify_socket.messages)
        notify_socket.poll(1.2)
        pings = sum(m == "WATCHDOG=1" for m in notify_socket.messages) - n0
        assert pings >= 3, f"watchdog pings at half of WATCHDOG_USEC expected, got {pings}"

        # a broken new site file keeps the old one running
        good = cfg.read_text()
        cfg.write_text(good.replace("power_w: 30", "power_w: -5"))
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("STATUS=running (reload rejected", timeout=10)
        assert proc.poll() is None
        pings_before = sum(m == "WATCHDOG=1" for m in notify_socket.messages)
        notify_socket.poll(0.6)
        assert sum(m == "WATCHDOG=1" for m in notify_socket.messages) > pings_before

        cfg.write_text(good)
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("STATUS=running site minimal (reloaded)", timeout=10)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0
        assert time.monotonic() - t0 < 5.0
        notify_socket.poll(0.2)
        assert "STOPPING=1" in notify_socket.messages
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert "power_w" in log and "reload rejected" in log


def test_invalid_site_file_exits_2_with_every_error(tmp_path, notify_socket):
    cfg = site_file(tmp_path)
    cfg.write_text(cfg.read_text().replace("power_w: 30", "power_w: -5").replace("frequency_mhz: 98.5", "frequency_mhz: 200"))
    proc = start_daemon(cfg, notify_socket.path, tmp_path)
    assert proc.wait(timeout=20) == 2
    log = (tmp_path / "daemon.log").read_text()
    assert "transmitter.power_w" in log and "transmitter.frequency_mhz" in log
    assert "2 problem(s)" in log
    notify_socket.poll(0.1)
    assert "READY=1" not in notify_socket.messages

"""A full, read-only or corrupt state disk: a clear alarm, and the air goes on.

Uses real mounts (tmpfs with a size limit, a read-only bind mount): root only, as in CI.
chmod does not stop root, so without mount these tests skip and say why.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_faults_kill import Central, Gateway, Notify, SimLoop, Transmitter, make_site, new_key

from controller.store import Store


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"needs mount (root in CI): mount {' '.join(args)}: {r.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Rig:
    def __init__(self, tmp_path: Path, broker, state: Path, **site: object) -> None:
        self.sims, key = SimLoop(), new_key()
        self.tx = Transmitter(self.sims, tmp_path / "dev" / "transmitter")
        path = make_site(tmp_path, broker.url, key, tx_port=self.tx.link, state_dir=state, **site)
        self.notify = Notify(tmp_path / "notify.sock")
        self.gw = Gateway(path, tmp_path, self.notify, watchdog_usec=1_000_000)
        self.central = Central(broker.url, key)

    def start(self) -> None:
        self.gw.start()
        self.gw.wait_ready()

    def storage_alarm(self) -> dict | None:
        """gateway.storage_low as the central server sees it on the retained alarms list."""
        alarms = self.central.retained("alarms") or []
        return next((a for a in alarms if a.get("code") == "gateway.storage_low"), None)

    def broadcast_goes_on_air(self) -> None:
        before = self.tx.carrier_episodes()
        rid = self.central.post("broadcast.start", {"priority": "priority", "targets": ["fm01"],
                                                    "source": {"tts": {"text": "Vẫn phát sóng."}}})
        resp = self.central.wait_for(lambda: self.central.responses.get(rid), 10, "broadcast.start answer")
        assert resp["status"] == "ok", resp
        self.central.wait_for(lambda: self.tx.carrier_episodes() > before, 10, "the carrier up for it")

    def stays_up(self) -> None:
        """Past the watchdog's first pings, still the first process: no crash loop."""
        assert self.notify.wait(self.gw.pid, "WATCHDOG=1", 5)
        self.notify.pump(1.6)
        assert self.notify.seen(self.gw.pid, "WATCHDOG=1") >= 3
        assert self.gw.alive() and self.gw.starts == 1, self.gw.tail()

    def close(self) -> None:
        self.gw.kill()
        self.central.close()
        self.tx.close()
        self.sims.close()
        self.notify.close()


def fill(path: Path) -> Path:
    """Write until the file system says ENOSPC."""
    filler = path / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    return filler


def test_disk_full_raises_storage_alarm_keeps_broadcasting_and_recovers(tmp_path, broker):
    state = tmp_path / "state"
    state.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state))
    rig = Rig(tmp_path, broker, state, storage={"min_free_mb": 1})
    try:
        rig.start()
        rig.central.wait_for(lambda: rig.central.events("config.loaded"), 10, "the start-up events")
        filler = fill(state)
        rig.broadcast_goes_on_air()
        for _ in range(3):                         # events that must be stored: refused commands
            rig.central.post("status.get", signed=False)
        alarm = rig.central.wait_for(rig.storage_alarm, 10, "gateway.storage_low on the alarms topic")
        assert alarm["severity"] in ("critical", "major")
        rig.stays_up()
        log = rig.gw.log_events()
        assert any(e.get("event") in ("event not stored", "database write failed") and "full" in str(e.get("error"))
                   for e in log), "no log line naming the full disk"
        # space comes back: the alarm clears and the held events reach the central server
        n = len(rig.central.events("command.rejected"))
        filler.unlink()
        rig.central.wait_for(lambda: not rig.storage_alarm(), 12, "gateway.storage_low cleared")
        rig.central.wait_for(lambda: len(rig.central.events("command.rejected")) >= n + 3, 10,
                             "the events written while the disk was full")
        assert rig.gw.term() == 0
    finally:
        rig.close()
        umount(state)


def test_read_only_state_dir_runs_from_memory_with_an_alarm(tmp_path, broker):
    state = tmp_path / "state"
    state.mkdir()
    Store(state / "state.db").close()            # yesterday's database, on a disk gone read-only
    mount("--bind", str(state), str(state))
    try:
        mount("-o", "remount,bind,ro", str(state))
        rig = Rig(tmp_path, broker, state)
        try:
            rig.start()
            alarm = rig.central.wait_for(rig.storage_alarm, 10, "gateway.storage_low on the alarms topic")
            assert any("state database unavailable" in e for e in alarm["evidence"]), alarm
            assert any(e.get("event", "").startswith("state database unavailable") for e in rig.gw.log_events())
            rig.broadcast_goes_on_air()
            rig.central.wait_for(lambda: rig.central.events("broadcast.started"), 10,
                                 "broadcast events from the in-memory outbox")
            rig.stays_up()
        finally:
            rig.close()
    finally:
        umount(state)


def test_corrupt_database_is_moved_aside_and_the_daemon_starts_fresh(tmp_path, broker):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.db").write_bytes(os.urandom(64 * 1024))
    rig = Rig(tmp_path, broker, state)
    try:
        t0 = time.monotonic()
        rig.start()
        ready_s = time.monotonic() - t0
        alarm = rig.central.wait_for(rig.storage_alarm, 10, "gateway.storage_low on the alarms topic")
        assert any("corrupt" in e for e in alarm["evidence"]), alarm
        assert list(state.glob("state.db.corrupt-*")), "the corrupt file was not kept for inspection"
        assert any("corrupt" in e.get("event", "") for e in rig.gw.log_events())
        rig.broadcast_goes_on_air()
        rig.stays_up()
        assert ready_s < 10
        assert rig.gw.term() == 0
        s = Store(state / "state.db")             # the fresh one is whole and in use
        assert s.integrity_ok()
        assert s.conn.execute("SELECT COUNT(*) FROM event_log").fetchone()[0] > 0
        s.close()
    finally:
        rig.close()

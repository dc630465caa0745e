"""A broken transmitter link is an alarm, never a crash: unplugged, stuck, garbage, slow.

The exciter simulator speaks the real profile over a pty behind a stable symlink; pulling
the "cable" closes the pty (the daemon's fd hangs up) and removes the device file.
"""
from __future__ import annotations

import time

from test_faults_kill import Central, Gateway, Notify, SimLoop, Transmitter, make_site, new_key

from controller.contract import topic

# short debounce so each phase takes seconds (the defaults are 10 s / 30 s)
FAST_ALARMS = {"hysteresis": {"transmitter.unreachable": {"raise_after_s": 1, "clear_after_s": 1}}}


class Rig:
    def __init__(self, tmp_path, broker) -> None:
        self.sims, key = SimLoop(), new_key()
        self.tx = Transmitter(self.sims, tmp_path / "dev" / "transmitter")
        site = make_site(tmp_path, broker.url, key, tx_port=self.tx.link, diagnosis=FAST_ALARMS)
        self.notify = Notify(tmp_path / "notify.sock")
        self.gw = Gateway(site, tmp_path, self.notify)
        self.central = Central(broker.url, key)
        self.gw.start()
        self.gw.wait_ready()

    def alarms(self, kind: str) -> list[dict]:
        return [e for e in self.central.events(kind) if e["code"] == "transmitter.unreachable"]

    def health_tx(self) -> dict:
        """The newest retained health's transmitter section (what the central server sees)."""
        with self.central.lock:
            got = [o.payload for o in self.central.obs if o.topic == topic("minimal", "health")]
        return (got[-1] or {}).get("transmitter", {}) if got else {}

    def health_count(self) -> int:
        with self.central.lock:
            return sum(1 for o in self.central.obs if o.topic == topic("minimal", "health"))

    def close(self) -> None:
        self.gw.kill()
        self.central.close()
        self.tx.close()
        self.sims.close()
        self.notify.close()


def answering(rig: Rig, timeout: float = 10.0) -> None:
    rig.central.wait_for(lambda: rig.health_tx().get("reachable") is True
                         and rig.health_tx().get("frequency_mhz") == 98.5, timeout,
                         "the transmitter reported reachable and tuned")


def test_unplugged_and_stuck_transmitter_alarm_and_recover(tmp_path, broker):
    rig = Rig(tmp_path, broker)
    try:
        answering(rig)
        for n, (fault, heal) in enumerate([(rig.tx.unplug, rig.tx.plug),
                                           (lambda: rig.sims.call(rig.tx.sim.stuck, True),
                                            lambda: rig.sims.call(rig.tx.sim.stuck, False))], 1):
            fault()
            rig.central.wait_for(lambda n=n: len(rig.alarms("alarm.raised")) >= n, 10,
                                 "transmitter.unreachable raised")
            raised = rig.alarms("alarm.raised")
            assert rig.gw.alive(), rig.gw.tail()
            assert rig.health_tx().get("reachable") is False
            heal()
            rig.central.wait_for(lambda n=n: len(rig.alarms("alarm.cleared")) >= n, 12,
                                 "transmitter.unreachable cleared")
            # telemetry resumes: a fresh reading, and the exciter re-tuned (it may have rebooted)
            answering(rig)
            assert raised[-1]["severity"] == "critical"
        log = rig.gw.log_events()
        assert any(e.get("event") == "serial_port_lost" for e in log)
        assert any(e.get("event") == "serial_port_restored" for e in log)
        assert rig.gw.alive() and rig.gw.starts == 1
    finally:
        rig.close()


def test_garbage_and_slow_answers_are_survived_without_an_alarm(tmp_path, broker):
    rig = Rig(tmp_path, broker)
    try:
        answering(rig)
        for _ in range(3):      # bursts of line noise, each lasting less than a poll's retries
            rig.sims.call(rig.tx.sim.inject_garbage, 300)
            time.sleep(1.6)
        rig.sims.call(rig.tx.sim.slow, 0.3)      # answers late, but inside the 0.5 s timeout
        time.sleep(3.0)
        rig.sims.call(rig.tx.sim.slow, 0.0)
        n_health = rig.health_count()
        assert rig.gw.alive(), rig.gw.tail()
        assert not rig.alarms("alarm.raised"), "garbage or slow replies raised transmitter.unreachable"
        # readings go on: the next periodic health still has the exciter reachable and tuned
        rig.central.wait_for(lambda: rig.health_count() > n_health, 8, "the next health report")
        answering(rig, 1)
        log = rig.gw.log_events()
        garbage = [e for e in log if e.get("event") == "serial_garbage"]
        assert 1 <= len(garbage) <= 5, f"garbage logged once per burst, got {len(garbage)}"
        assert not [e for e in log if e.get("level") == "error" and "serial" in str(e.get("event"))]
    finally:
        rig.close()

"""A Pi without RTC boots in 1970: no schedule until NTP, then jumps of hours are survived.

The daemon runs under libfaketime (its clock only; monotonic stays real): the timestamp
file starts at an absolute 1970 time and is then rewritten to "+0" (NTP synchronised),
then "+3h" and back, as an NTP step or a technician's `date -s` would move it.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_faults_kill import Central, Gateway, Notify, SimLoop, Transmitter, make_site, new_key

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
EVERY_MINUTE = {"id": "hourly-test", "title": "Mỗi phút", "priority": "normal",
                "source": {"tts": {"text": "Kiểm tra."}}, "targets": ["fm01"],
                "schedule": {"cron": "* * * * *"}, "misfire_grace_s": 30, "max_duration_s": 10}


@pytest.mark.skipif(not FAKETIME.exists(), reason=f"libfaketime not installed ({FAKETIME})")
def test_boot_at_1970_waits_for_ntp_then_survives_jumps(tmp_path, broker):
    sims, key = SimLoop(), new_key()
    tx = Transmitter(sims, tmp_path / "dev" / "transmitter")
    site = make_site(tmp_path, broker.url, key, tx_port=tx.link, programmes=[EVERY_MINUTE])
    stamp = tmp_path / "faketime"
    # 3 s before a minute boundary (site time): an unguarded scheduler would fire at once
    stamp.write_text("@1970-01-01 00:00:57\n")
    notify = Notify(tmp_path / "notify.sock")
    gw = Gateway(site, tmp_path, notify, env={
        "LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(stamp), "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    central = Central(broker.url, key)

    def clock_alarms(kind: str) -> list[dict]:
        return [e for e in central.events(kind) if e["code"] == "gateway.clock_unsynchronised"]
    try:
        gw.start()
        gw.wait_ready()
        raised = central.wait_for(lambda: clock_alarms("alarm.raised"), 5, "gateway.clock_unsynchronised")
        assert raised[0]["ts"].startswith("1970-"), raised[0]
        time.sleep(4.0)                         # the 1970 minute boundary passes
        assert gw.alive(), gw.tail()
        assert not central.events("broadcast.started") and tx.carrier_episodes() == 0, \
            "a programme fired on an unsynchronised 1970 clock"
        stamp.write_text("+0\n")                # NTP: the true time arrives
        central.wait_for(lambda: clock_alarms("alarm.cleared"), 6, "the clock alarm cleared after sync")
        assert not central.events("broadcast.skipped"), "the 1970 minutes were replayed as skips"
        for offset in ("+3h", "-3h"):         # an NTP step forward, and back
            stamp.write_text(offset + "\n")
            time.sleep(2.0)
            assert gw.alive(), gw.tail()
        stamp.write_text("+0\n")
        time.sleep(1.5)
        jumps = [e for e in gw.log_events() if e.get("event") == "wall clock jumped"]
        assert len(jumps) >= 3, jumps           # sync (decades), +3 h, -3 h (and back)
        # hours of minutes skipped by the jump are not a burst of runs or of skip reports
        assert len(central.events("broadcast.started")) <= 2
        assert len(central.events("broadcast.skipped")) <= 2
        assert len(clock_alarms("alarm.raised")) == 1, "a jump within plausible years re-raised the alarm"
        notify.pump(0.1)
        assert notify.seen(gw.pid, "WATCHDOG=1") >= 5, "watchdog pings stopped across the jumps"
        assert gw.term() == 0, gw.tail()
    finally:
        gw.kill()
        central.close()
        tx.close()
        sims.close()
        notify.close()

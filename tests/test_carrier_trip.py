"""A VSWR carrier trip holds across a restart and is released by acknowledging the alarm."""
from __future__ import annotations

import time

import yaml
from test_faults_kill import Central, Gateway, Notify, SimLoop, Transmitter, make_site, new_key


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def test_trip_survives_restart_and_ack_after_repair_releases_it(tmp_path, broker):
    sims, key = SimLoop(), new_key()
    tx = Transmitter(sims, tmp_path / "dev" / "transmitter")
    site = make_site(tmp_path, broker.url, key, tx_port=tx.link, diagnosis={"vswr_persist_s": 1})
    data = yaml.safe_load(site.read_text())
    data["transmitter"]["carrier"] = "always"
    site.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    notify = Notify(tmp_path / "notify.sock")
    gw = Gateway(site, tmp_path, notify)
    central = Central(broker.url, key)
    try:
        gw.start()
        gw.wait_ready()
        wait(tx.carrier, 10, "carrier keyed (policy always)")
        sims.call(tx.sim.set_vswr, 3.6)  # lightning-damaged feeder
        wait(lambda: not tx.carrier(), 10, "protective carrier-off")
        wait(lambda: [e for e in central.events("alarm.raised") if e["code"] == "transmitter.vswr_high"],
             10, "vswr alarm at the central server")
        alarm = next(e for e in central.events("alarm.raised") if e["code"] == "transmitter.vswr_high")

        gw.kill()
        restarted = time.monotonic()
        gw.start()
        gw.wait_ready()
        time.sleep(3.0)  # several polls with the carrier policy 'always'
        assert not tx.carrier() and tx.carrier_episodes(since=restarted) == 0, \
            "the restarted daemon keyed a tripped transmitter"

        sims.call(tx.sim.set_vswr, 1.2)  # the crew replaced the feeder
        central.post("alarm.ack", {"alarm_id": alarm["alarm_id"], "by": "tech-binhlu"})
        wait(tx.carrier, 10, "carrier back after the acknowledged repair")
        assert gw.alive()
    finally:
        gw.kill()
        central.close()
        tx.close()
        sims.close()
        notify.close()

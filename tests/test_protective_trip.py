"""A VSWR trip keeps the carrier off across a restart: a crash-looping daemon must not
key a damaged antenna at full power on every start."""
from __future__ import annotations

from pathlib import Path

import yaml

from device_drivers.sim.record import read_record
from device_drivers.sim.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent


def test_carrier_stays_off_after_restart_until_released(tmp_path):
    site = yaml.safe_load((ROOT / "config" / "binhlu.yaml").read_text())
    site["transmitter"]["carrier"] = "always"
    site["programmes"] = []
    site["diagnosis"] = {"vswr_persist_s": 1}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site, allow_unicode=True, sort_keys=False))
    (tmp_path / "sc.yaml").write_text(
        "duration: 16s\n"
        "timing: {poll_fast: 0.5s}\n"
        "events:\n"
        "  - {at: 3s, transmitter: {vswr: 3.4}}\n"
        "  - {at: 8s, gateway_restart: {hard: true}}\n")
    assert run_scenario(tmp_path / "site.yaml", tmp_path / "sc.yaml", tmp_path / "rec.jsonl",
                        workdir=tmp_path / "w") == 0
    rec = read_record(tmp_path / "rec.jsonl")
    tx = [r for r in rec if r["kind"] == "transmitter"]
    assert any(r["carrier"] for r in tx if r["t"] < 3), "carrier policy 'always' keys it at start"
    off_at = next(r["t"] for r in tx if r["t"] >= 3 and not r["carrier"])
    assert off_at < 8, "the VSWR trip switched the carrier off before the restart"
    # ground truth is written on change: any keying after the restart would show up here
    assert not any(r["carrier"] for r in tx if r["t"] > 8), "no carrier into the bad antenna after restart"
    assert tx[-1]["carrier"] is False
    assert any(r["kind"] == "scenario" and r.get("event", {}).get("ended") == "gateway_restart" for r in rec)

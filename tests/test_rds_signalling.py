"""FM receivers switched over RDS: the wake codes travel as UECP TDC frames through the
encoder, the transmitter simulator decodes them, and only the addressed receivers play."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device_drivers.sim.record import read_record
from device_drivers.sim.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rds_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("rds")
    site = yaml.safe_load((ROOT / "config" / "binhlu.yaml").read_text())
    keep = {"fm01", "fm02", "fm06", "fm07", "ip01"}
    site["clusters"] = [c for c in site["clusters"] if c["id"] in keep]
    for c in site["clusters"]:
        if c["kind"] == "fm":
            c["profile"] = "fm-receiver-rds"
    site["programmes"] = []
    (wd / "site.yaml").write_text(yaml.safe_dump(site, allow_unicode=True, sort_keys=False))
    (wd / "sc.yaml").write_text(
        "duration: 16s\n"
        "events:\n"
        "  - at: 2s\n"
        "    command:\n"
        "      name: broadcast.start\n"
        "      args: {priority: normal, source: {tts: {text: \"Thông báo cho bản một.\"}}, targets: [ban-01]}\n"
    )
    rc = run_scenario(wd / "site.yaml", wd / "sc.yaml", wd / "rec.jsonl", workdir=wd / "work")
    assert rc == 0
    return read_record(wd / "rec.jsonl")


def test_only_rds_addressed_receivers_play(rds_run):
    played = {r["cluster"] for r in rds_run if r.get("kind") == "cluster" and r.get("playing")}
    assert played & {"fm06", "fm07"} == {"fm06", "fm07"}
    assert not played & {"fm01", "fm02", "ip01"}, played


def test_codes_went_over_rds_not_dtmf(rds_run):
    started = [r["payload"] for r in rds_run if r.get("kind") == "mqtt" and r["topic"].endswith("/events")
               and r["payload"].get("type") == "broadcast.started"]
    assert started and set(started[0]["reached"]) == {"fm06", "fm07"}
    finished = [r["payload"] for r in rds_run if r.get("kind") == "mqtt" and r["topic"].endswith("/events")
                and r["payload"].get("type") == "broadcast.finished"]
    assert finished and finished[0]["outcome"] == "finished"
    # the receivers switched off again after the programme (release codes over RDS)
    last = {}
    for r in rds_run:
        if r.get("kind") == "cluster":
            last[r["cluster"]] = r.get("playing")
    assert last["fm06"] is False and last["fm07"] is False

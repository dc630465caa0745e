"""Scenario files (simulation.md): line-accurate errors, ids checked against the site,
durations; and the record writer an outside checker tails."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from controller.config import load_site
from controller.yamlsrc import YamlError
from device_drivers.sim.record import Recorder, follow, read_record
from device_drivers.sim.scenario import (
    load_scenario,
    parse_duration,
    resolve_scenario,
    shipped_scenarios,
)

ROOT = Path(__file__).resolve().parent.parent
BINHLU = ROOT / "config" / "binhlu.yaml"


@pytest.fixture(scope="module")
def site():
    return load_site(BINHLU, check_profiles=False)   # ids only: profiles are not this test's concern


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sc.yaml"
    p.write_text(text)
    return p


def errors_of(path: Path, site=None) -> list[str]:
    with pytest.raises(YamlError) as ei:
        load_scenario(path, site)
    return ei.value.errors


@pytest.mark.parametrize("text,seconds", [
    ("5s", 5.0), ("2m", 120.0), ("1.5s", 1.5), ("500ms", 0.5), ("1h", 3600.0), (12, 12.0),
    (" 3 s ", 3.0), (0.25, 0.25),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 parsecs", "-3s", "s", "", True, -1, "1.2.3s"])
def test_bad_durations_are_rejected(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_valid_scenario_loads_with_ids_zones_and_durations(tmp_path, site):
    p = write(tmp_path, """\
duration: 1m
timing: {heartbeat_timeout: 3s, health_interval: 10s}
events:
  - at: 30s
    command: {name: status.get, signed: replay}
  - at: 5s
    lightning: {strikes: 6, distance_km: 4, near: [fm07, ban-01], damage: {fm07: [surge_protector_tripped], ip03: [dead]}}
  - at: 10s
    power_cut: {clusters: [ip01, ban-02], duration: 20s}
  - at: 20s
    command:
      name: broadcast.start
      args: {priority: emergency, source: {tts: {text: "Bão"}}, targets: [ban-03, fm01]}
""")
    sc = load_scenario(p, site)
    assert sc.duration == 60
    assert sc.timing.site_keys() == {"heartbeat_timeout_s": 3.0, "health_interval_s": 10.0}
    assert [e.kind for _, e in sc.ordered()] == ["lightning", "power_cut", "command", "command"]
    assert sc.events[2].power_cut.duration == 20.0
    rec = sc.events[1].as_record()
    assert rec["at"] == 5.0 and rec["lightning"]["damage"]["ip03"] == ["dead"]


def test_unknown_key_fails_with_line_and_hint(tmp_path, site):
    p = write(tmp_path, """\
duration: 30s
events:
  - at: 5s
    link_cut: {cluster: ip04, duration: 10s}
  - at: 8s
    broker_outage:
      durration: 5s
""")
    errs = errors_of(p, site)
    assert any(e.startswith(f"{p}:7: events[1].broker_outage.durration: unknown key")
               and "did you mean 'duration'" in e for e in errs), errs


def test_unknown_event_kind_fails_with_its_line(tmp_path):
    p = write(tmp_path, "duration: 30s\nevents:\n  - at: 5s\n    earthquake: {magnitude: 5}\n")
    errs = errors_of(p)
    assert any(e.startswith(f"{p}:4: events[0].earthquake: unknown key") for e in errs), errs


def test_bad_cluster_and_zone_ids_fail_with_their_lines(tmp_path, site):
    p = write(tmp_path, """\
duration: 30s
events:
  - at: 5s
    lightning:
      near: [fm07, fm99]
      damage:
        ip33: [dead]
  - at: 6s
    subscription_expired: {cluster: fm03}
  - at: 7s
    command:
      name: broadcast.start
      args: {targets: [ban-01, ban-77]}
""")
    errs = errors_of(p, site)
    text = "\n".join(errs)
    assert f"{p}:5: events[0].lightning.near[1]: no cluster or zone with id 'fm99'" in text
    assert f"{p}:7: events[0].lightning.damage.ip33: no cluster with id 'ip33'" in text
    assert "did you mean" in text
    assert f"{p}:9: events[1].subscription_expired.cluster: fm03 is an FM cluster" in text
    assert f"{p}:13: events[2].command.args.targets[1]: no cluster or zone with id 'ban-77'" in text
    assert len(errs) == 4


def test_event_at_or_after_the_end_fails_with_its_line(tmp_path):
    p = write(tmp_path, "duration: 10s\nevents:\n  - at: 10s\n    broker_outage: {duration: 1s}\n")
    assert errors_of(p) == [f"{p}:3: events[0].at: at 10s is not before the end of the "
                            "scenario (duration 10s)"]


def test_an_event_has_exactly_one_kind(tmp_path):
    p = write(tmp_path, """\
duration: 10s
events:
  - at: 2s
    broker_outage: {duration: 1s}
    gateway_restart: {hard: true}
  - at: 3s
    note: nothing happens
""")
    errs = "\n".join(errors_of(p))
    assert f"{p}:3: events[0]: an event needs exactly one of" in errs
    assert "got broker_outage, gateway_restart" in errs
    assert f"{p}:6: events[1]: an event needs exactly one of" in errs and "got none" in errs


def test_replay_needs_an_earlier_signed_command(tmp_path):
    p = write(tmp_path, """\
duration: 10s
events:
  - at: 1s
    command: {name: status.get, signed: false}
  - at: 2s
    command: {name: status.get, signed: replay}
  - at: 3s
    command: {name: status.get, signed: replay, replay_of: nope}
""")
    errs = "\n".join(errors_of(p))
    assert f"{p}:6: events[1].command.signed: a replay needs an earlier signed command" in errs
    assert f"{p}:8: events[2].command.replay_of: no earlier command has request_id 'nope'" in errs


def test_bad_values_say_what_is_allowed(tmp_path):
    p = write(tmp_path, """\
duration: 10s
events:
  - at: 1s
    transmitter: {vswr: 0.5}
  - at: 2s
    lightning: {damage: {fm07: [melted]}}
  - at: 3s
    command: {name: status.get, signed: maybe}
  - at: soon
    transmitter: {}
""")
    errs = "\n".join(errors_of(p))
    assert f"{p}:4: events[0].transmitter.vswr:" in errs and ">= 1" in errs
    assert f"{p}:6: events[1].lightning.damage.fm07[0]:" in errs and "surge_protector_tripped" in errs
    assert f"{p}:8: events[2].command.signed:" in errs and "'forged'" in errs
    assert f"{p}:9: events[3].at: a duration looks like 5s" in errs
    assert f"{p}:10: events[3].transmitter: give at least one of" in errs


def test_shipped_scenarios_load_against_the_example_site(site):
    names = shipped_scenarios()
    assert {"smoke", "demo-day"} <= set(names)
    smoke = load_scenario(resolve_scenario("smoke"), site)
    assert 20 <= smoke.duration <= 30
    day = load_scenario(resolve_scenario("demo-day"), site)
    assert 100 <= day.duration <= 150
    kinds = {e.kind for e in day.events}
    assert {"lightning", "subscription_expired", "broker_outage", "command"} <= kinds
    assert any(e.command and e.command.args.get("priority") == "emergency" for e in day.events)


# ---- record ------------------------------------------------------------------------------

def test_record_lines_are_flushed_in_time_order_and_parsed(tmp_path):
    seen = []
    rec = Recorder(tmp_path / "r.jsonl", on_record=seen.append, started=False)
    rec.cluster("ip01", False, None, 70)        # initial ground truth, before the start
    rec.start_clock({"start": {"site": "x"}})
    rec.mqtt("loaxa/v1/x/status", b'{"state":"online"}', retain=True, qos=1)
    rec.mqtt("loaxa/v1/x/raw", b"\xff not json", retain=False, qos=0)
    assert rec.cluster("ip01", False, None, 70) is None     # unchanged: not written again
    rec.cluster("ip01", True, "b-1", 70)
    rec.transmitter({"carrier": True, "frequency_mhz": 98.5, "power_w": 50, "rds": {"ta": False}})
    rec.transmitter({"carrier": True, "frequency_mhz": 98.5, "power_w": 50, "rds": {"ta": False}})
    # readable by another reader before close: flushed per line
    lines = read_record(tmp_path / "r.jsonl")
    assert [x["kind"] for x in lines] == ["scenario", "cluster", "mqtt", "mqtt", "cluster",
                                         "transmitter"]
    assert lines[0]["event"] == {"start": {"site": "x"}} and lines[1]["t"] <= lines[2]["t"]
    assert lines[2]["payload"] == {"state": "online"} and lines[2]["retain"] is True
    assert lines[3]["payload"].endswith("not json")
    assert lines[4] == {"t": lines[4]["t"], "kind": "cluster", "cluster": "ip01", "playing": True,
                        "programme": "b-1", "volume": 70}
    assert seen == lines
    rec.close()


def test_record_is_ordered_under_concurrent_writers_and_can_be_followed(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = Recorder(path)

    def writer(n):
        for i in range(200):
            rec.write("scenario", event={"w": n, "i": i})
    ts = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rec.close()
    got = list(follow(path, stop=lambda: True))
    assert len(got) == 800
    times = [x["t"] for x in got]
    assert times == sorted(times)
    assert all(json.dumps(x) for x in got)

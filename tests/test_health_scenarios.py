"""Health monitoring and fault diagnosis, judged from the outside.

Each case runs the real daemon against the simulated Bình Lư site (scenarios in
tests/scenarios_health/, site copies in bench.detection.HEALTH) and checks only the
record: alarm events and the retained `alarms` list the central server received, and
the simulators' ground truth. The three runs (~25 s each) start together, once, for
the tests that need them.
"""
from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.detection import (  # bench/ is importable via pytest's pythonpath setting
    HEALTH,
    events,
    read,
    retained_alarms,
    run_case,
    scenario_lines,
)

ROOT = Path(__file__).resolve().parent.parent

CASE_OF_TEST = {
    "test_storm_gives_one_lightning_alarm_per_damaged_cluster_in_one_incident": "storm",
    "test_hard_restart_neither_duplicates_nor_forgets_alarms": ("storm", "quiet-storm"),
    "test_expired_sim_is_named_and_reminders_do_not_flood": ("quiet-faults", "storm"),
    "test_power_cut_on_one_feed_is_power_loss_in_one_incident": "quiet-faults",
    "test_healed_link_cut_is_a_link_outage_never_lightning": "quiet-faults",
    "test_storm_that_damages_nothing_raises_no_cluster_alarm": "quiet-storm",
    "test_rising_vswr_folds_back_then_switches_the_carrier_off": "quiet-storm",
}


class Runs:
    """The cases the selected tests need, started in parallel on first use."""

    def __init__(self, names: set[str], out: Path):
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(names)))
        self.futures: dict[str, Future] = {n: self.pool.submit(run_case, HEALTH[n], out / n)
                                           for n in sorted(names)}
        self.cache: dict[str, list[dict]] = {}

    def record(self, name: str) -> list[dict]:
        if name not in self.cache:
            self.cache[name] = read(self.futures[name].result(timeout=120))
        return self.cache[name]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    names: set[str] = set()
    for item in request.session.items:
        want = CASE_OF_TEST.get(getattr(item, "originalname", item.name))
        if want and item.module is request.module:
            names |= {want} if isinstance(want, str) else set(want)
    r = Runs(names, tmp_path_factory.mktemp("health"))
    yield r
    r.pool.shutdown(wait=True)


# ---------------------------------------------------------------------- helpers
def alarm_events(rec: list[dict], type_: str | None = None) -> list[tuple[float, dict]]:
    return [(t, a) for t, a in events(rec) if type_ is None or a["type"] == type_]


def cluster_alarms(rec: list[dict], type_: str = "alarm.raised") -> list[tuple[float, dict]]:
    """Cluster alarm events; subscription *expiring* reminders are not fault alarms."""
    return [(t, a) for t, a in alarm_events(rec, type_)
            if a.get("cluster_id") and a["code"] != "cluster.subscription_expiring"]


def final_alarms(rec: list[dict]) -> list[dict]:
    got = retained_alarms(rec)
    assert got, "the retained alarms topic was never published"
    return got[-1][1]


def injected_at(rec: list[dict], kind: str) -> float:
    lines = scenario_lines(rec, kind)
    assert lines and "error" not in lines[0][1], f"{kind} not applied: {lines}"
    return lines[0][0]


def story(rec: list[dict]) -> str:
    """What the central server saw, for assertion messages."""
    out = [f"{t:6.2f} {a['type']} {a['code']} {a.get('cluster_id')} {a['cause']} "
           f"{a.get('incident_id')} {a['alarm_id'][:8]} {a['evidence']}" for t, a in events(rec)]
    return "\n" + "\n".join(out)


# ---------------------------------------------------------------------- 1. lightning
def test_storm_gives_one_lightning_alarm_per_damaged_cluster_in_one_incident(runs):
    rec = runs.record("storm")
    t_storm = injected_at(rec, "lightning")
    restart = injected_at(rec, "gateway_restart")
    raised = [(t, a) for t, a in cluster_alarms(rec) if t < restart]
    by_key = {(a["code"], a["cluster_id"]): a for _, a in raised}
    assert set(by_key) == {("cluster.surge_protector_tripped", "ip02"),
                           ("cluster.offline", "ip03")}, story(rec)
    assert all(t >= t_storm for t, _ in raised)
    surge, dead = by_key[("cluster.surge_protector_tripped", "ip02")], by_key[("cluster.offline", "ip03")]
    for a in (surge, dead):
        assert a["cause"] == "lightning", story(rec)
        assert any(re.match(r"storm: \d+ strikes? within 4 km", e) for e in a["evidence"]), a
    assert surge["incident_id"] and surge["incident_id"].startswith("inc-storm-")
    assert dead["incident_id"] == surge["incident_id"], story(rec)
    assert surge["alarm_id"] != dead["alarm_id"]
    assert surge["confidence"] >= 0.9 and "surge protector tripped" in surge["evidence"][0]
    assert dead["evidence"][0].startswith("connection lost (last will)")
    # the crew-facing list carries both, tied together, with every strike the sensor saw
    live = {(a["code"], a.get("cluster_id")): a for a in final_alarms(rec)}
    assert live[("cluster.offline", "ip03")]["incident_id"] == surge["incident_id"]
    assert "storm: 6 strikes within 4 km" in " ".join(live[("cluster.offline", "ip03")]["evidence"])


# ---------------------------------------------------------------------- 7. restart
@pytest.mark.parametrize("case", ["storm", "quiet-storm"])
def test_hard_restart_neither_duplicates_nor_forgets_alarms(runs, case):
    rec = runs.record(case)
    restart = scenario_lines(rec, "gateway_restart")
    assert restart and restart[0][1]["result"]["stopped_rc"] == -9
    back = next(t for t, e in scenario_lines(rec, "ended") if e["ended"] == "gateway_restart")
    ids: dict[tuple, set[str]] = {}
    for _, a in alarm_events(rec, "alarm.raised"):
        ids.setdefault((a["code"], a.get("cluster_id")), set()).add(a["alarm_id"])
    dup = {k: v for k, v in ids.items() if len(v) > 1}
    assert not dup, f"alarm raised twice with different ids: {dup}" + story(rec)
    before = {(a["code"], a.get("cluster_id")): a for t, a in alarm_events(rec, "alarm.raised")
              if t < back}
    assert len(before) >= 2 if case == "storm" else len(before) == 1, story(rec)
    # nothing changed across the restart, so nothing is re-announced (outbox redelivery of
    # an event already seen has the same event id and is not counted by events())
    after = [(t, a) for t, a in alarm_events(rec) if t > back]
    assert not after, "re-announced after the restart:" + story(rec)
    # the retained list published by the restarted daemon still has them, same diagnosis
    post = [lst for t, lst in retained_alarms(rec) if t > back]
    assert post, "the restarted daemon did not republish the active alarms"
    live = {(a["code"], a.get("cluster_id")): a for a in post[-1]}
    for key, a in before.items():
        assert key in live, f"{key} forgotten after the restart: {post[-1]}"
        assert live[key]["alarm_id"] == a["alarm_id"]
        assert live[key]["cause"] == a["cause"]
        assert live[key].get("incident_id") == a.get("incident_id")
        if a["cause"] == "lightning":
            # a restart forgets the storm itself; the alarm must not start saying "no storm"
            assert any(e.startswith("storm: ") for e in live[key]["evidence"]), live[key]
            assert not any("no storm" in e for e in live[key]["evidence"]), live[key]


# ---------------------------------------------------------------------- 2. subscription
def test_expired_sim_is_named_and_reminders_do_not_flood(runs):
    rec = runs.record("quiet-faults")
    t_sim = injected_at(rec, "subscription_expired")
    raised = {(a["code"], a["cluster_id"]): (t, a) for t, a in reversed(cluster_alarms(rec))}
    t, exp05 = raised[("cluster.subscription_expired", "ip05")]
    assert t >= t_sim and exp05["cause"] == "subscription_expired", story(rec)
    assert "modem reported SIM status 'expired'" in exp05["evidence"]
    assert any("Viettel 0987 000 105" in e for e in exp05["evidence"]), exp05
    # its link dropped with the SIM: the offline alarm says why, not "unknown"
    _, off05 = raised[("cluster.offline", "ip05")]
    assert off05["cause"] == "subscription_expired", story(rec)
    # ip06's SIM date (yesterday, per the site copy) has passed: named with its date
    _, exp06 = raised[("cluster.subscription_expired", "ip06")]
    assert exp06["cause"] == "subscription_expired"
    assert re.fullmatch(r"SIM expired on \d{4}-\d\d-\d\d \(VNPT 0987 000 106\)", exp06["evidence"][0])
    # ip05 had a reminder (expires in 3 days) until it ran out: one, then cleared
    reminders = [a for _, a in alarm_events(rec) if a["code"] == "cluster.subscription_expiring"]
    assert [(a["type"], a["cluster_id"]) for a in reminders] == [
        ("alarm.raised", "ip05"), ("alarm.cleared", "ip05")], story(rec)
    assert "(in 3 days) (Viettel 0987 000 105)" in reminders[0]["evidence"][0]
    assert reminders[1]["evidence"][-1] == "now expired"
    # across a hard restart (the storm run: ip01 expires in 5 days) still one reminder
    storm = runs.record("storm")
    again = [a for _, a in alarm_events(storm, "alarm.raised")
             if a["code"] == "cluster.subscription_expiring"]
    assert [a["cluster_id"] for a in again] == ["ip01"], story(storm)
    assert any(a["code"] == "cluster.subscription_expiring" and a["cluster_id"] == "ip01"
               for a in final_alarms(storm))


# ---------------------------------------------------------------------- 3. power
def test_power_cut_on_one_feed_is_power_loss_in_one_incident(runs):
    rec = runs.record("quiet-faults")
    t_cut = injected_at(rec, "power_cut")
    cut = scenario_lines(rec, "power_cut")[0][1]
    assert cut["result"]["clusters"] == ["ip01", "ip02", "fm01", "fm02"]
    power = [(t, a) for t, a in cluster_alarms(rec) if a["cluster_id"] in ("ip01", "ip02")]
    assert {(a["code"], a["cluster_id"]) for _, a in power} == {
        ("cluster.power_loss", "ip01"), ("cluster.power_loss", "ip02")}, story(rec)
    assert all(t >= t_cut for t, _ in power)
    incidents = {a["incident_id"] for _, a in power}
    assert len(incidents) == 1 and next(iter(incidents)).startswith("inc-feed-feed-a-"), story(rec)
    for _, a in power:
        assert a["cause"] == "power_loss"
        assert a["evidence"][0].startswith("mains supply lost at"), a
        assert "2 of 2 clusters on power feed feed-a lost power" in " ".join(a["evidence"])
    # FM receivers on the feed went dead too, but have no return channel: no guessing
    truth = [r for r in rec if r["kind"] == "cluster" and r["cluster"] in ("fm01", "fm02")
             and r.get("alive") is False]
    assert len(truth) == 2
    assert not [a for _, a in alarm_events(rec) if a.get("cluster_id") in ("fm01", "fm02")]
    # no other cluster of the site was blamed on the cut
    assert not [a for _, a in cluster_alarms(rec) if a["cause"] == "power_loss"
                and a["cluster_id"] not in ("ip01", "ip02")], story(rec)


# ---------------------------------------------------------------------- 4. link
def test_healed_link_cut_is_a_link_outage_never_lightning(runs):
    rec = runs.record("quiet-faults")
    t_cut = injected_at(rec, "link_cut")
    mine = [(t, a) for t, a in alarm_events(rec) if a.get("cluster_id") == "ip04"]
    assert mine, "a 12 s outage (heartbeat 4 s + settle 4 s) should raise an alarm" + story(rec)
    assert all(a["cause"] != "lightning" for _, a in mine), story(rec)
    assert all(t >= t_cut for t, _ in mine)
    raised = [a for _, a in mine if a["type"] == "alarm.raised"]
    cleared = [a for _, a in mine if a["type"] == "alarm.cleared"]
    assert {a["code"] for a in raised} == {"cluster.offline"}
    assert len({a["alarm_id"] for a in raised}) == 1
    assert len(cleared) == 1 and cleared[0]["alarm_id"] == raised[0]["alarm_id"], story(rec)
    assert cleared[0]["cause"] == "link_loss"
    assert re.fullmatch(r"link outage \d\d:\d\d-\d\d:\d\d \(\d+ s\); came back healthy",
                        cleared[0]["evidence"][-1]), cleared[0]
    assert not any(a.get("cluster_id") == "ip04" for a in final_alarms(rec))
    # the ground truth agrees: the cluster itself was never damaged
    assert not [r for r in rec if r["kind"] == "cluster" and r["cluster"] == "ip04"
                and r.get("alive") is False]


# ---------------------------------------------------------------------- 5. harmless storm
def test_storm_that_damages_nothing_raises_no_cluster_alarm(runs):
    rec = runs.record("quiet-storm")
    storm = scenario_lines(rec, "lightning")[0][1]
    assert storm["result"] == {"sensor": "strikes sent"} and not storm["lightning"].get("damage")
    assert not [a for _, a in alarm_events(rec) if a.get("cluster_id")], story(rec)
    assert not [a for a in final_alarms(rec) if a.get("cluster_id")]
    # not vacuous: the gateway did see the storm (the later VSWR alarm cites it), and the
    # run outlasted heartbeat timeout + settle after it
    vswr = [a for _, a in alarm_events(rec, "alarm.raised") if a["code"] == "transmitter.vswr_high"]
    assert vswr and any(e.startswith("storm: 5 strikes within 3 km") for e in vswr[0]["evidence"])
    end = next(t for t, e in scenario_lines(rec, "end"))
    assert end - injected_at(rec, "lightning") > 4 + 4 + 2
    states = {r["topic"].split("/")[-2]: r["payload"] for r in rec if r["kind"] == "mqtt"
              and r["topic"].endswith("/state")}
    assert states and all(not s.get("faults") for s in states.values())
    assert {s["availability"] for cid, s in states.items() if cid.startswith("ip")} == {"online"}


# ---------------------------------------------------------------------- 6. transmitter
def test_rising_vswr_folds_back_then_switches_the_carrier_off(runs):
    rec = runs.record("quiet-storm")
    t_vswr = injected_at(rec, "transmitter")
    tx = [r for r in rec if r["kind"] == "transmitter"]
    before = [r for r in tx if r["t"] < t_vswr - 0.01]
    assert before[-1]["carrier"] and before[-1]["power_w"] == 50.0   # carrier: always
    after = [r for r in tx if r["t"] >= t_vswr - 0.01]
    fold = next((r for r in after if r["carrier"] and r["power_w"] == 25.0), None)
    assert fold is not None, f"no foldback to half power: {after}"
    off = next((r for r in after if not r["carrier"]), None)
    assert off is not None and off["t"] > fold["t"], f"carrier not switched off: {after}"
    # 2.5 is below the 3.0 instant-off limit: off only after vswr_persist_s (3 s) folded back
    assert off["t"] - fold["t"] >= 2.0
    raised = [(t, a) for t, a in alarm_events(rec, "alarm.raised") if a["code"] == "transmitter.vswr_high"]
    assert len(raised) == 1, story(rec)
    t, a = raised[0]
    assert t >= t_vswr and t <= off["t"] + 1
    assert a["severity"] == "critical" and a.get("cluster_id") is None
    assert re.match(r"VSWR 2\.5 .*power folded back to 50%", a["evidence"][0]), a
    live = [x for x in final_alarms(rec) if x["code"] == "transmitter.vswr_high"]
    assert live and live[0]["alarm_id"] == a["alarm_id"]
    assert any("carrier switched off" in e for e in live[0]["evidence"]), live[0]
    # and it stays off until the gateway restarts; after a restart the protection re-arms
    restart = injected_at(rec, "gateway_restart")
    assert not [r for r in after if off["t"] < r["t"] < restart and r["carrier"]]
    assert not tx[-1]["carrier"], f"carrier left on after the restart: {tx[-3:]}"

"""AlarmManager on a real SQLite store: idempotence, quiet refinement, restart, ack,
hysteresis. Every emitted body is checked against the central contract's Alarm model."""
from __future__ import annotations

import datetime as dt

import pytest

from controller.alarms import AlarmManager, Hysteresis, UnknownAlarm
from controller.contract import validate_event_body
from controller.store import Store

T0 = dt.datetime(2026, 11, 1, 0, 0, tzinfo=dt.UTC).timestamp()


class Rig:
    def __init__(self, path, **kw):
        self.t = T0
        self.path = path
        self.events: list[tuple[str, dict]] = []
        self.snapshots: list[list[dict]] = []
        self.kw = kw
        self.open()

    def open(self):
        self.store = Store(self.path)
        self.am = AlarmManager(self.store, self.emit, lambda: self.t,
                               on_change=self.snapshots.append, **self.kw)

    def restart(self):
        self.store.close()
        self.open()

    def emit(self, type_, body):
        validate_event_body(type_, body)  # raises if not the contract's alarm object
        self.events.append((type_, body))

    def types(self):
        return [t for t, _ in self.events]

    def db_active(self):
        return self.store.conn.execute(
            "SELECT code, cluster_id, COUNT(*) FROM alarms WHERE active=1 "
            "GROUP BY code, cluster_id").fetchall()


@pytest.fixture
def rig(state_dir):
    r = Rig(state_dir / "state.db")
    yield r
    r.store.close()


def offline(am, cause="unknown", conf=0.3, ev=("no heartbeat since 07:01:00",), inc=None):
    return am.raise_("cluster.offline", "ip03", "major", cause, conf, list(ev), inc)


def test_raise_is_idempotent_and_refinement_is_quiet(rig):
    a = offline(rig.am)
    assert a["code"] == "cluster.offline" and a["cluster_id"] == "ip03"
    assert a["raised_at"] == "2026-11-01T00:00:00.000Z" and "cleared_at" not in a
    b = offline(rig.am)  # same again: nothing happens
    rig.t += 10
    c = offline(rig.am, ev=["no heartbeat since 07:01:00", "SIM valid until 2027-01-01"])
    assert a["alarm_id"] == b["alarm_id"] == c["alarm_id"]
    assert rig.types() == ["alarm.raised"]  # evidence refinement: persisted, not re-emitted
    assert rig.am.get("cluster.offline", "ip03")["evidence"][-1] == "SIM valid until 2027-01-01"
    d = offline(rig.am, cause="lightning", conf=0.8, ev=["storm: 6 strikes within 8 km, 14:02"],
                inc="inc-storm-1")
    assert d["alarm_id"] == a["alarm_id"]
    assert rig.types() == ["alarm.raised", "alarm.raised"]  # the cause changed: told once
    assert rig.events[-1][1]["cause"] == "lightning"
    assert rig.events[-1][1]["incident_id"] == "inc-storm-1"
    # an update without incident keeps it; the same content again is silent
    offline(rig.am, cause="lightning", conf=0.8, ev=["storm: 6 strikes within 8 km, 14:02"])
    assert len(rig.events) == 2 and rig.am.get("cluster.offline", "ip03")["incident_id"]
    assert len(rig.am.active()) == 1
    assert rig.db_active() == [("cluster.offline", "ip03", 1)]
    assert rig.snapshots[-1] == rig.am.active()  # on_change saw the final state


def test_clear_appends_note_and_final_cause(rig):
    offline(rig.am)
    rig.t += 600
    cleared = rig.am.clear("cluster.offline", "ip03", "link outage 07:01-07:11 (10 min)",
                           cause="link_loss")
    assert cleared["cause"] == "link_loss"
    assert cleared["cleared_at"] == "2026-11-01T00:10:00.000Z"
    assert cleared["evidence"][-1] == "link outage 07:01-07:11 (10 min)"
    assert rig.types() == ["alarm.raised", "alarm.cleared"]
    assert rig.am.active() == [] and rig.snapshots[-1] == []
    assert rig.am.clear("cluster.offline", "ip03") is None  # nothing active: no event
    assert len(rig.events) == 2
    again = offline(rig.am)  # a new episode is a new alarm
    assert again["alarm_id"] != cleared["alarm_id"]


def test_restart_does_not_reraise_or_duplicate(rig):
    a = offline(rig.am, cause="lightning", conf=0.7, inc="inc-storm-5")
    rig.am.raise_("transmitter.vswr_high", None, "critical", "hardware", 0.6, ["VSWR 2.4"])
    rig.restart()
    assert {x["alarm_id"] for x in rig.am.active()} == {
        a["alarm_id"], rig.am.get("transmitter.vswr_high")["alarm_id"]}
    n = len(rig.events)
    again = offline(rig.am, cause="lightning", conf=0.7, inc="inc-storm-5")
    assert again["alarm_id"] == a["alarm_id"] and len(rig.events) == n
    rig.am.condition_on("cluster.offline", "ip03", severity="major", cause="lightning",
                        confidence=0.7, evidence=list(a["evidence"]))
    assert len(rig.events) == n
    assert sorted(rig.db_active()) == [("cluster.offline", "ip03", 1),
                                      ("transmitter.vswr_high", None, 1)]


def test_ack_is_recorded_persisted_and_idempotent(rig):
    a = offline(rig.am)
    acked = rig.am.ack(a["alarm_id"], "operator-tinh")
    assert acked["acknowledged_by"] == "operator-tinh"
    assert rig.events[-1] == ("alarm.acknowledged", acked)
    rig.am.ack(a["alarm_id"], "operator-tinh")
    assert rig.types().count("alarm.acknowledged") == 1
    with pytest.raises(UnknownAlarm):
        rig.am.ack("no-such-alarm", "operator-tinh")
    with pytest.raises(ValueError, match="who acknowledges"):
        rig.am.ack(a["alarm_id"], " ")
    rig.restart()
    assert rig.am.get("cluster.offline", "ip03")["acknowledged_by"] == "operator-tinh"
    # a late ack of a cleared alarm is still recorded
    rig.am.clear("cluster.offline", "ip03")
    late = rig.am.ack(a["alarm_id"], "operator-xa")
    assert late["acknowledged_by"] == "operator-xa" and "cleared_at" in late


def test_hysteresis_prevents_flapping(state_dir):
    rig = Rig(state_dir / "s.db", hysteresis={
        "cluster.amplifier_fault": Hysteresis(raise_after_s=60, clear_after_s=300)})
    on = dict(severity="major", cause="hardware", confidence=0.6,
              evidence=["amplifier fault reported at 07:00"])
    for _ in range(30):  # flaps every 20 s: never held for 60 s
        rig.am.condition_on("cluster.amplifier_fault", "ip01", **on)
        rig.t += 20
        rig.am.tick()
        rig.am.condition_off("cluster.amplifier_fault", "ip01")
        rig.t += 20
        rig.am.tick()
    assert rig.events == [] and rig.am.pending("cluster.amplifier_fault", "ip01") is None
    rig.am.condition_on("cluster.amplifier_fault", "ip01", **on)
    rig.t += 59
    rig.am.tick()
    assert rig.events == [] and rig.am.pending("cluster.amplifier_fault", "ip01") == "raise"
    rig.t += 1
    rig.am.tick()  # held 60 s: raised by the timer, no new reading needed
    assert rig.types() == ["alarm.raised"]
    for _ in range(30):  # now it flaps the other way: never clear for 300 s
        rig.am.condition_off("cluster.amplifier_fault", "ip01", note="healthy")
        rig.t += 100
        rig.am.tick()
        rig.am.condition_on("cluster.amplifier_fault", "ip01", **on)
        rig.t += 20
        rig.am.tick()
    assert rig.types() == ["alarm.raised"]
    rig.am.condition_off("cluster.amplifier_fault", "ip01", note="healthy at 09:00")
    rig.t += 300
    rig.am.tick()
    assert rig.types() == ["alarm.raised", "alarm.cleared"]
    assert rig.events[-1][1]["evidence"][-1] == "healthy at 09:00"
    rig.store.close()


def test_technician_confirmed_alarm_is_sticky(rig):
    offline(rig.am, cause="unknown")
    rig.am.raise_("cluster.offline", "ip03", "major", "vandalism_or_unknown", 1.0,
                  ["technician report by Lo Van A on 2026-11-01: cable cut"],
                  confirmed_by="Lo Van A")
    n = len(rig.events)
    offline(rig.am, cause="lightning", conf=0.9)  # diagnosis may not overwrite the technician
    rig.am.condition_off("cluster.offline", "ip03")
    rig.t += 3600
    rig.am.tick()
    assert len(rig.events) == n
    assert rig.am.get("cluster.offline", "ip03")["cause"] == "vandalism_or_unknown"
    rig.restart()
    assert rig.am.is_confirmed("cluster.offline", "ip03")
    assert rig.am.clear("cluster.offline", "ip03", "repaired")["cleared_at"]
    assert not rig.store.kv_get("alarms.confirmed")


def test_bad_alarm_input_is_rejected_and_nothing_is_stored(rig):
    with pytest.raises(ValueError, match="cause 'storm'"):
        rig.am.raise_("cluster.offline", "ip01", "major", "storm", 0.5, [])
    with pytest.raises(ValueError, match="severity"):
        rig.am.raise_("cluster.offline", "ip01", "fatal", "unknown", 0.5, [])
    with pytest.raises(ValueError, match="confidence"):
        rig.am.raise_("cluster.offline", "ip01", "major", "unknown", 1.5, [])
    with pytest.raises(ValueError, match="evidence"):
        rig.am.raise_("cluster.offline", "ip01", "major", "unknown", 0.5, "text")
    assert rig.events == [] and rig.db_active() == []
    # gateway alarms are not restricted to the cluster causes
    rig.am.raise_("gateway.security", None, "major", "forged signature", 1.0, ["key k1"])
    assert rig.types() == ["alarm.raised"]


def test_cleared_history_is_bounded(state_dir):
    rig = Rig(state_dir / "s.db", keep_cleared=5)
    for i in range(12):
        rig.am.raise_("cluster.offline", f"ip{i:02d}", "major", "unknown", 0.3, [])
        rig.t += 1
        rig.am.clear("cluster.offline", f"ip{i:02d}")
    n = rig.store.conn.execute("SELECT COUNT(*) FROM alarms").fetchone()[0]
    assert n == 5
    rig.store.close()

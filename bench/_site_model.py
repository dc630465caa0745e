"""What one gateway publishes to the central broker, as data (for bench/scale.py).

Payloads are built from controller.contract models and serialised with `compact`, as
controller/uplink.py sends them; topics are the uplink's. A day, a storm minute and a
(re)connect are lists of (t_s, subtopic, payload, qos, retain).
"""
from __future__ import annotations

import datetime as dt
import random

from controller.contract import Alarm, BroadcastRecord, ClusterState, Health, compact, rfc3339

DAY = 86400
DAY0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)   # a fixed date: realistic timestamp lengths
BROADCASTS = [(5 * 3600 + 1800, 1800, "vov-morning"), (11 * 3600, 1200, "noon"),
              (17 * 3600, 1800, "vov-evening"), (20 * 3600, 600, "weather")]
N_IP, N_FM = 6, 29


class SiteModel:
    """One site's publishes: (t_s, subtopic, payload, qos, retain)."""

    def __init__(self, site: str, seed: int) -> None:
        self.site = site
        self.rng = random.Random(seed)
        self.ip = [f"ip{i:02d}" for i in range(1, N_IP + 1)]
        self.fm = [f"fm{i:02d}" for i in range(1, N_FM + 1)]
        self.zone = {c: f"ban-{(i % 7) + 1:02d}" for i, c in enumerate(self.ip + self.fm)}
        self.rssi = {c: round(-75 + self.rng.uniform(-8, 8)) for c in self.ip}
        self.offline: set[str] = set()
        self.faults: dict[str, list[str]] = {}
        self.alarms: list[Alarm] = []
        self.seq = 0
        self.session = 1

    def ts(self, t: float) -> str:
        return rfc3339(DAY0 + dt.timedelta(seconds=t))

    def status(self, state: str, t: float) -> bytes:
        return compact({"state": state, "session": self.session, "ts": self.ts(t),
                        "version": "0.1.0", "boot_id": "3f0b6a52-5f0e-4b8e-9d4e-0c1d2e3f4a5b"})

    def cluster(self, c: str, playing: str | None, t: float) -> tuple:
        ip = c in self.ip
        st = ClusterState(
            id=c, kind="ip" if ip else "fm", zone=self.zone[c], lat=22.3404, lon=103.5698,
            availability=("offline" if c in self.offline else "online") if ip else "unmonitored",
            last_seen=self.ts(t) if ip else None, playing=playing, volume=80,
            rssi_dbm=self.rssi[c] if ip else None,
            subscription={"expires_on": "2027-03-15", "days_left": 273} if ip else None,
            faults=self.faults.get(c, []))
        return (t, f"clusters/{c}/state", compact(st), 1, True)

    def health(self, t: float, on_air: bool) -> tuple:
        online = sum(1 for c in self.ip if c not in self.offline)
        h = Health(ts=self.ts(t),
                   gateway={"uptime_s": round(t), "cpu_temp_c": 52.0, "disk_free_mb": 5210,
                            "clock_synced": True, "outbox_depth": 0},
                   transmitter={"reachable": True, "on_air": on_air, "frequency_mhz": 98.5,
                                "forward_w": 50.0 if on_air else 0.0,
                                "reflected_w": 1.0 if on_air else 0.0, "vswr": 1.2,
                                "temperature_c": 41.0, "pll_locked": True},
                   counts={"clusters_total": N_IP + N_FM, "online": online, "offline": N_IP - online,
                           "unmonitored": N_FM, "faulty": len(self.faults)})
        return (t, "health", compact(h), 1, True)

    def alarms_state(self, t: float) -> tuple:
        return (t, "alarms", compact([a.model_dump(mode="json", exclude_none=True)
                                      for a in self.alarms]), 1, True)

    def event(self, t: float, etype: str, body: dict) -> tuple:
        self.seq += 1
        env = {"id": f"{self.rng.getrandbits(128):032x}", "seq": self.seq, "ts": self.ts(t),
               "type": etype, **body, "historical": False}
        return (t, "events", compact(env), 1, False)

    def broadcast(self, t: float, pid: str, ended: bool, priority: str = "normal") -> tuple:
        rec = BroadcastRecord(
            broadcast_id=f"b-{pid}-{self.site}", programme_id=pid, title=pid, priority=priority,
            source={"stream": {"url": "http://relay.province.example/vov1.mp3"}},
            ordered_by="schedule", targets=self.ip + self.fm,
            reached=[c for c in self.ip + self.fm if c not in self.offline], unreached=[],
            started_at=self.ts(t), ended_at=self.ts(t) if ended else None)
        return self.event(t, "broadcast.finished" if ended else "broadcast.started",
                          rec.model_dump(mode="json", exclude_none=True))

    def alarm(self, t: float, c: str, code: str, cause: str, cleared: bool = False) -> Alarm:
        return Alarm(alarm_id=f"a-{self.seq + 1}", code=code, severity="major", cluster_id=c,
                     cause=cause, confidence=0.8, evidence=[f"{c}: {code} ({cause})"],
                     raised_at=self.ts(t), cleared_at=self.ts(t) if cleared else None)

    # ---- scripts ---------------------------------------------------------------------
    def birth(self, t: float, backlog: int = 0) -> list[tuple]:
        out = [(t, "status", self.status("online", t), 1, True)]
        out += [self.cluster(c, None, t) for c in self.ip + self.fm]
        out += [self.health(t, False), self.alarms_state(t)]
        for i in range(backlog):
            out.append(self.event(t, "alarm.cleared" if i % 2 else "alarm.raised",
                                  self.alarm(t, self.ip[i % N_IP], "cluster.offline", "link_loss",
                                             cleared=bool(i % 2)).model_dump(mode="json", exclude_none=True)))
        return out

    def day(self) -> list[tuple]:
        out = self.birth(0.0)
        jit = self.rng.uniform(2.0, 4.0)   # pre-roll + wake codes after the scheduled second
        on_air = set()
        for start, dur, pid in BROADCASTS:
            for t, ended in ((start + jit, False), (start + dur + jit, True)):
                out.append(self.broadcast(t, pid, ended))
                out += [self.cluster(c, None if ended else f"b-{pid}-{self.site}", t + 0.01)
                        for c in self.ip + self.fm]
                (on_air.discard if ended else on_air.add)(pid)
                out.append(self.health(t + 0.02, bool(on_air)))
        for t in range(0, DAY, 300):
            out.append(self.health(t + self.rng.uniform(0, 1), any(
                s <= t < s + d for s, d, _ in BROADCASTS)))
        for c in self.ip:
            for _ in range(2):
                t = self.rng.uniform(0, DAY)
                self.rssi[c] += self.rng.choice((-7, 7))
                out.append(self.cluster(c, None, t))
        t = self.rng.uniform(9 * 3600, 16 * 3600)
        c = self.rng.choice(self.ip)
        a = self.alarm(t, c, "cluster.offline", "link_loss")
        self.offline.add(c)
        self.alarms, self.faults[c] = [a], ["cluster.offline"]
        out += [self.event(t, "alarm.raised", a.model_dump(mode="json", exclude_none=True)),
                self.alarms_state(t), self.cluster(c, None, t), self.health(t, False)]
        t += 1200
        self.offline.discard(c)
        self.alarms, self.faults = [], {}
        out += [self.event(t, "alarm.cleared", self.alarm(t, c, "cluster.offline", "link_loss", True)
                           .model_dump(mode="json", exclude_none=True)),
                self.alarms_state(t), self.cluster(c, None, t), self.health(t, False)]
        for _ in range(2):   # responses to central commands
            t = self.rng.uniform(0, DAY)
            out.append((t, f"resp/{self.rng.getrandbits(64):016x}",
                        compact({"status": "ok", "data": {"programmes": 3}}), 1, False))
        return sorted(out, key=lambda x: x[0])

    def storm(self) -> list[tuple]:
        out = [self.broadcast(1.0, "emergency", False, "emergency")]
        out += [self.cluster(c, f"b-emergency-{self.site}", 1.0) for c in self.ip + self.fm]
        out.append(self.health(1.0, True))
        for i, c in enumerate(self.ip):
            t = 5.0 + i * 5
            code, cause = (("cluster.surge_protector_tripped", "lightning") if i % 2
                           else ("cluster.offline", "lightning"))
            a = self.alarm(t, c, code, cause)
            self.alarms.append(a)
            self.faults[c] = [code]
            if code == "cluster.offline":
                self.offline.add(c)
            out += [self.event(t, "alarm.raised", a.model_dump(mode="json", exclude_none=True)),
                    self.alarms_state(t), self.cluster(c, f"b-emergency-{self.site}", t),
                    self.health(t, True)]
        out.append(self.broadcast(50.0, "emergency", True, "emergency"))
        out += [self.cluster(c, None, 50.0) for c in self.ip + self.fm]
        out.append(self.health(50.0, False))
        return out


def publish_wire(topic_: str, payload: bytes, qos: int) -> int:
    """MQTT 5 PUBLISH (no properties) + PUBACK for QoS 1."""
    rem = 2 + len(topic_.encode()) + (2 if qos else 0) + 1 + len(payload)
    return 1 + (1 if rem < 128 else 2 if rem < 16384 else 3) + rem + (4 if qos else 0)

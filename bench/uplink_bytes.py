"""Bytes per day on the central link for a 35-cluster site: report-by-exception vs naive dumps.

A simulated day of typical telemetry (4 broadcasts, IP-cluster RSSI drifting, one 4G
outage with its alarm) drives real payloads built from controller.contract models and
serialised exactly as the uplink sends them (compact JSON). MQTT 5 framing is added per
packet (PUBLISH QoS 1 + PUBACK, PINGREQ/PINGRESP when the link is idle for a keepalive),
and TCP/IPv4 headers (52 bytes per segment with timestamps) for the on-air estimate.
Report by exception: a retained topic is published only when its payload changes (RSSI
with a 3 dB dead band, transmitter power rounded to 10 W), health on significant change
and every 300 s. Baseline: health + every cluster state + alarms every 10 s.
"""
from __future__ import annotations

import argparse
import random
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta

from controller.contract import (
    Alarm,
    BroadcastRecord,
    ClusterState,
    Health,
    compact,
    rfc3339,
    topic,
)

SITE = "binhlu"
DAY0 = datetime(2026, 6, 1, tzinfo=UTC)
BROADCASTS = [(6 * 3600, 1800, "morning-news"), (11 * 3600, 1200, "noon"),
              (17 * 3600, 1800, "evening-news"), (20 * 3600, 600, "weather")]
OUTAGE = ("ip05", 14 * 3600, 14 * 3600 + 1200)
TCPIP = 52


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def publish_bytes(t: str, payload: bytes) -> int:
    """MQTT 5 PUBLISH QoS 1 (no properties) + its 4-byte PUBACK."""
    remaining = 2 + len(t.encode()) + 2 + 1 + len(payload)
    return 1 + _varint_len(remaining) + remaining + 4


def simulate(seed: int, naive: bool, keepalive_s: int, step: int = 10) -> Counter:
    rng = random.Random(seed)
    ip = [f"ip{i:02d}" for i in range(1, 7)]
    fm = [f"fm{i:02d}" for i in range(1, 30)]
    zone = {c: f"ban-{(i % 7) + 1}" for i, c in enumerate(ip + fm)}
    rssi = {c: -75.0 + rng.uniform(-8, 8) for c in ip}
    reported = {c: round(v) for c, v in rssi.items()}
    last: dict[str, bytes] = {}
    cache: dict[tuple, bytes] = {}  # same inputs, same bytes: only speeds the simulation up
    out: Counter = Counter()
    last_health_t = -1e9
    last_sig = None
    last_tx_t = -1e9
    seq = 0
    alarm = Alarm(alarm_id="a-1", code="cluster.offline", severity="major", cluster_id="ip05",
                  cause="link_loss", confidence=0.8,
                  evidence=["ip05 heartbeat lost; no storm, supply normal"],
                  raised_at=rfc3339(DAY0 + timedelta(seconds=OUTAGE[1])))

    def send(kind: str, sub: str, payload: bytes, now: int) -> None:
        nonlocal last_tx_t
        out[kind] += publish_bytes(topic(SITE, sub), payload)
        out["packets"] += 2
        last_tx_t = now

    def event(now: int, type_: str, body) -> None:
        nonlocal seq
        seq += 1
        env = {"id": f"{rng.getrandbits(128):032x}", "seq": seq,
               "ts": rfc3339(DAY0 + timedelta(seconds=now)), "type": type_,
               **body.model_dump(mode="json", exclude_none=True), "historical": False}
        send("events", "events", compact(env), now)

    for now in range(0, 86400, step):
        when = DAY0 + timedelta(seconds=now)
        on_air = next((b for b in BROADCASTS if b[0] <= now < b[0] + b[1]), None)
        down = OUTAGE[1] <= now < OUTAGE[2]
        for c in ip:
            rssi[c] += rng.gauss(0, 0.3) + (-75.0 - rssi[c]) * 0.02  # ~1.5 dB spread
        # broadcast and alarm events (identical in both modes)
        for start, dur, pid in BROADCASTS:
            if now in (start, start + dur):
                typ = "broadcast.started" if now == start else "broadcast.finished"
                event(now, typ, BroadcastRecord(
                    broadcast_id=f"{pid}-0601", programme_id=pid, priority="normal",
                    source={"media": {"url": f"http://gw/media/{pid}.ogg", "sha256": "a" * 64}},
                    targets=ip + fm, reached=[c for c in ip + fm if not (down and c == "ip05")],
                    started_at=rfc3339(DAY0 + timedelta(seconds=start)),
                    ended_at=rfc3339(when) if now != start else None))
        if now in (OUTAGE[1], OUTAGE[2]):
            a = alarm if now == OUTAGE[1] else alarm.model_copy(update={"cleared_at": rfc3339(when)})
            event(now, "alarm.raised" if now == OUTAGE[1] else "alarm.cleared", a)
        alarms = [alarm] if down else []
        # retained state
        states = {}
        for c in ip + fm:
            is_ip = c in ip
            avail = ("offline" if down and c == "ip05" else "online") if is_ip else "unmonitored"
            if is_ip and abs(rssi[c] - reported[c]) >= 3:
                reported[c] = round(rssi[c])
            key = (c, avail, on_air[2] if on_air and avail != "offline" else None,
                   (round(rssi[c], 1) if naive else reported[c]) if is_ip else None)
            if key not in cache:
                cache[key] = compact(ClusterState(
                    id=c, kind="ip" if is_ip else "fm", zone=zone[c], lat=22.3, lon=103.5,
                    availability=avail, playing=key[2], volume=80, rssi_dbm=key[3],
                    subscription={"expires_on": "2027-03-01", "days_left": 273} if is_ip else None,
                    faults=["cluster.offline"] if avail == "offline" else []))
            states[f"clusters/{c}/state"] = cache[key]
        fwd = (500 + rng.gauss(0, 3)) if on_air else 0.0
        online = sum(1 for c in ip if not (down and c == "ip05"))
        sig = (bool(on_air), round(fwd, -1), online)
        health = Health(
            ts=rfc3339(when), gateway={"uptime_s": now, "cpu_temp_c": 52.0, "disk_free_mb": 5210,
                                       "clock_synced": True, "outbox_depth": 0},
            transmitter={"reachable": True, "on_air": bool(on_air), "frequency_mhz": 98.5,
                         "forward_w": round(fwd, 1 if naive else -1), "reflected_w": 4.0 if on_air else 0.0,
                         "vswr": 1.2, "temperature_c": 41.0, "pll_locked": True},
            counts={"clusters_total": 35, "online": online, "offline": 6 - online,
                    "unmonitored": 29, "faulty": 6 - online})
        if naive:
            send("health", "health", compact(health), now)
            for sub, p in states.items():
                send("clusters", sub, p, now)
            send("alarms", "alarms", compact([a.model_dump(mode="json", exclude_none=True)
                                              for a in alarms]), now)
        else:
            if sig != last_sig or now - last_health_t >= 300:
                send("health", "health", compact(health), now)
                last_sig, last_health_t = sig, now
            for sub, p in states.items():
                if last.get(sub) != p:
                    send("clusters", sub, p, now)
                    last[sub] = p
            ap = compact([a.model_dump(mode="json", exclude_none=True) for a in alarms])
            if last.get("alarms") != ap:
                send("alarms", "alarms", ap, now)
                last["alarms"] = ap
        if now - last_tx_t >= keepalive_s:  # idle link: PINGREQ + PINGRESP
            out["keepalive"] += 4
            out["packets"] += 2
            last_tx_t = now
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keepalive", type=int, default=30)
    a = ap.parse_args()
    rows = []
    for naive in (False, True):
        runs = [simulate(seed, naive, a.keepalive) for seed in range(a.runs)]
        mqtt = statistics.median(sum(v for k, v in r.items() if k != "packets") for r in runs)
        wire = statistics.median(sum(v for k, v in r.items() if k != "packets")
                                 + TCPIP * r["packets"] for r in runs)
        parts = {k: statistics.median(r[k] for r in runs)
                 for k in ("health", "clusters", "alarms", "events", "keepalive")}
        rows.append((naive, mqtt, wire, parts))
    print(f"uplink bytes/day, 35-cluster site (6 IP + 29 FM), keepalive {a.keepalive} s, "
          f"median of {a.runs} simulated days")
    for naive, mqtt, wire, parts in rows:
        name = "naive full state every 10 s" if naive else "report by exception"
        print(f"  {name:30s} MQTT {mqtt / 1e6:8.3f} MB/day   with TCP/IP {wire / 1e6:8.3f} MB/day"
              f"   ({wire * 30 / 1e6:7.1f} MB/30 d)")
        print("      " + "  ".join(f"{k} {v / 1e3:.1f} kB" for k, v in parts.items()))
    print(f"  ratio naive/RBE: MQTT {rows[1][1] / rows[0][1]:.0f}x, "
          f"with TCP/IP {rows[1][2] / rows[0][2]:.0f}x")


if __name__ == "__main__":
    main()

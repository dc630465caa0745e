"""Many gateways, one broker: what the central MQTT side must carry per 100 communes.

A light gateway model (not the daemon) publishes what a real gateway publishes
(controller/uplink.py): retained `status` (with its will), `clusters/{id}/state`,
`health` and `alarms` on change, QoS 1 `events`, one MQTT 5 connection per site, payloads
built from controller.contract models and serialised as the uplink does. A simulated
central server reads everything through a shared subscription
(`$share/central/loaxa/v1/+/#`, two consumers in another process). One mosquitto on a
free loopback port, started here, with `sys_interval 1`; its $SYS byte and message
counters and its CPU time (/proc) are the measurement.

Per site and day (the model behind uplink_bytes.py): 4 programmes to all 35 clusters at
the same minutes in every commune (province-wide relays: the day's peak), health every
300 s and on change, IP RSSI moving past the dead band twice a day per IP cluster, one 4G
outage (alarm raised/cleared), two commands answered, a reconnect. Storm burst per site:
an emergency broadcast to all, lightning alarms on the 6 IP clusters (surge trip / offline)
with their state, alarms and health updates, all inside one minute. Reconnect storm: every
site's connection drops at once (wills), then all reconnect and republish state plus a
backlog of 10 events.

Phases, each measured at the broker: connect + birth, a typical day replayed at high
speed, the storm burst and the reconnect storm sent as fast as the sites can (QoS 1, 20 in
flight each, as the uplink). Figures are scaled per 100 sites and extrapolated to a
province (150 communes) and the country (10,000); broker CPU per message gives cores.

    .venv/bin/python -m bench.scale [--quick] [--sites 200]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.subscribeoptions import SubscribeOptions

from bench._site_model import DAY, N_IP, SiteModel, publish_wire
from controller.contract import topic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.broker import Mosquitto  # noqa: E402

PROVINCE, COUNTRY = 150, 10_000
IP_TELEMETRY_S = 30            # IP cluster heartbeat/telemetry period (heartbeat_timeout 90 s / 3)
KEEPALIVE_S = 30


# ---------------------------------------------------------------------- central
def central_proc(port: int, conn, ready) -> None:
    """Two shared-subscription consumers and a $SYS reader, counting; answers 'snap'."""
    import threading

    lock = threading.Lock()
    counts = {"msgs": 0, "bytes": 0, "wills": 0, "last": 0.0}
    sysv: dict[str, float] = {}
    clients = []

    def on_msg(client, ud, msg):
        with lock:
            if msg.topic.startswith("$SYS/"):
                try:
                    sysv[msg.topic] = float(msg.payload)
                except ValueError:
                    pass
                return
            counts["msgs"] += 1
            counts["bytes"] += len(msg.topic) + len(msg.payload)
            counts["last"] = time.time()
            if msg.topic.endswith("/status") and b'"offline"' in msg.payload:
                counts["wills"] += 1

    subs = [("$share/central/loaxa/v1/+/#", SubscribeOptions(qos=1))] * 2 + [
        ("$SYS/broker/#", SubscribeOptions(qos=0))]
    for i, (t, opts) in enumerate(subs):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"central-{i}",
                        protocol=mqtt.MQTTv5)
        c.on_message = on_msg
        c.connect("127.0.0.1", port, keepalive=30)
        c.subscribe(t, options=opts)
        c.loop_start()
        clients.append(c)
    time.sleep(0.5)
    ready.set()
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        with lock:
            conn.send({**counts, "sys": dict(sysv)})
    for c in clients:
        c.disconnect()
        c.loop_stop()


class Central:
    def __init__(self, port: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        ready = ctx.Event()
        self.p = ctx.Process(target=central_proc, args=(port, child, ready), daemon=True)
        self.p.start()
        if not ready.wait(15):
            raise RuntimeError("central consumers did not start")

    def snap(self) -> dict:
        self.conn.send("snap")
        return self.conn.recv()

    def wait_count(self, n: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.snap()
            if s["msgs"] >= n or time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.p.join(5)
        if self.p.is_alive():
            self.p.kill()


# ---------------------------------------------------------------------- gateways
class Gateway:
    """One site's MQTT 5 connection on the shared asyncio loop (paho external-loop API)."""

    def __init__(self, model: SiteModel, port: int) -> None:
        self.m, self.port = model, port
        self.acked = 0
        self.sent = 0
        self.connected: asyncio.Future | None = None
        self.c: mqtt.Client | None = None

    def _client(self) -> mqtt.Client:
        loop = asyncio.get_running_loop()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"loaxa-{self.m.site}",
                        protocol=mqtt.MQTTv5)
        c.will_set(topic(self.m.site, "status"), self.m.status("offline", 0), qos=1, retain=True)
        c.max_inflight_messages_set(20)
        c.max_queued_messages_set(0)
        c.on_socket_open = lambda cl, ud, s: loop.add_reader(s, cl.loop_read)
        c.on_socket_close = lambda cl, ud, s: loop.remove_reader(s)
        c.on_socket_register_write = lambda cl, ud, s: loop.add_writer(s, cl.loop_write)
        c.on_socket_unregister_write = lambda cl, ud, s: loop.remove_writer(s)

        def on_connect(cl, ud, flags, rc, props):
            if self.connected is not None and not self.connected.done():
                self.connected.set_result(rc)
        c.on_connect = on_connect
        c.on_publish = lambda *a: self._ack()
        return c

    def _ack(self) -> None:
        self.acked += 1

    async def connect(self) -> None:
        self.connected = asyncio.get_running_loop().create_future()
        self.c = self._client()
        self.c.connect("127.0.0.1", self.port, keepalive=KEEPALIVE_S, clean_start=True)
        await asyncio.wait_for(self.connected, 30)

    def publish(self, item: tuple) -> None:
        _t, sub, payload, qos, retain = item
        self.c.publish(topic(self.m.site, sub), payload, qos=qos, retain=retain)
        self.sent += 1

    def drop(self) -> None:
        """The 4G link dies: no DISCONNECT, the broker fires the will."""
        sock = self.c.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self.c is not None:
            try:
                self.c.disconnect()
            except Exception:
                pass


async def misc_loop(gws: list[Gateway]) -> None:
    while True:
        await asyncio.sleep(1.0)
        for g in gws:
            if g.c is not None:
                g.c.loop_misc()


async def wait_acked(gws: list[Gateway], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(g.acked < g.sent for g in gws) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------- phases
def cpu_s(pid: int) -> float:
    import os

    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Broker-side deltas of one phase: $SYS counters, central counts, broker CPU."""

    def __init__(self, central: Central, broker_pid: int) -> None:
        self.central, self.pid = central, broker_pid

    def begin(self) -> None:
        time.sleep(1.6)   # $SYS counters are refreshed every second
        self.s0, self.c0, self.t0 = self.central.snap(), cpu_s(self.pid), time.monotonic()

    def end(self, expected: int, timeout: float) -> dict:
        s = self.central.wait_count(self.s0["msgs"] + expected, timeout)
        t1 = s["last"] if s["last"] else time.time()
        wall = time.monotonic() - self.t0 - (time.time() - t1)
        cpu = cpu_s(self.pid) - self.c0
        time.sleep(1.6)
        s = self.central.snap()

        def d(k: str) -> float:
            return s["sys"].get(k, 0.0) - self.s0["sys"].get(k, 0.0)
        return {"expected": expected, "delivered": s["msgs"] - self.s0["msgs"],
                "wills": s["wills"] - self.s0["wills"],
                "payload_bytes": s["bytes"] - self.s0["bytes"], "seconds": max(wall, 1e-6),
                "broker_cpu_s": cpu,
                "broker_bytes_in": d("$SYS/broker/bytes/received"),
                "broker_bytes_out": d("$SYS/broker/bytes/sent")}


async def run_phases(port: int, broker_pid: int, central: Central, n_sites: int,
                     day_s: float) -> dict:
    meter = Meter(central, broker_pid)
    models = [SiteModel(f"site{i:05d}", i) for i in range(n_sites)]
    gws = [Gateway(m, port) for m in models]
    misc = asyncio.create_task(misc_loop(gws))
    res: dict = {}
    try:
        # 1. connect + birth
        meter.begin()
        t0 = time.monotonic()
        await asyncio.gather(*(g.connect() for g in gws))
        res["connect_s"] = time.monotonic() - t0
        births = [m.birth(0.0) for m in models]
        for g, items in zip(gws, births, strict=True):
            for it in items:
                g.publish(it)
        await wait_acked(gws, 60)
        res["birth"] = meter.end(sum(map(len, births)), 60)
        # 2. a typical day, replayed fast: every site's day on one merged timeline
        days = [(it[0], i, it) for i, m in enumerate(models) for it in m.day()[len(births[i]):]]
        days.sort(key=lambda x: x[0])
        speed = DAY / day_s
        meter.begin()
        t0 = time.monotonic()
        for t, i, it in days:
            ahead = t / speed - (time.monotonic() - t0)
            if ahead > 0.002:
                await asyncio.sleep(ahead)
            gws[i].publish(it)
        await wait_acked(gws, 60)
        res["day"] = meter.end(len(days), 60)
        res["day"]["speed"] = speed
        res["day"]["per_site"] = len(days) / n_sites + len(births[0])
        res["day"]["payload_per_site"] = (sum(len(it[1]) + len(it[2]) + len(topic("site00000", ""))
                                              for _, _, it in days) / n_sites
                                          + sum(len(it[1]) + len(it[2]) + len(topic("site00000", ""))
                                                for it in births[0]))
        res["day"]["wire_per_site"] = (sum(publish_wire(topic(models[i].site, it[1]), it[2], it[3])
                                           for _, i, it in days)
                                       + sum(publish_wire(topic(m.site, it[1]), it[2], it[3])
                                             for m, b in zip(models, births, strict=True) for it in b)
                                       ) / n_sites
        # peak minute of the day at the broker (synchronised relays)
        per_min: dict[int, int] = {}
        for t, _, _ in days:
            per_min[int(t // 60)] = per_min.get(int(t // 60), 0) + 1
        res["day"]["peak_minute_per_site"] = max(per_min.values()) / n_sites
        per_5s: dict[int, int] = {}
        for t, _, _ in days:
            per_5s[int(t // 5)] = per_5s.get(int(t // 5), 0) + 1
        res["day"]["peak_5s_per_site"] = max(per_5s.values()) / n_sites
        # 3. storm burst, as fast as the sites can send it
        storms = [m.storm() for m in models]
        meter.begin()
        for g, items in zip(gws, storms, strict=True):
            for it in items:
                g.publish(it)
        await wait_acked(gws, 60)
        res["storm"] = meter.end(sum(map(len, storms)), 60)
        res["storm"]["per_site"] = len(storms[0])
        res["storm"]["payload_per_site"] = statistics.mean(
            sum(len(topic(m.site, it[1])) + len(it[2]) for it in s) for m, s in zip(models, storms, strict=True))
        # 4. reconnect storm: every link drops (wills), all come back with state + backlog
        meter.begin()
        for g in gws:
            g.drop()
        s = central.wait_count(meter.s0["msgs"] + n_sites, 30)
        res["wills_s"] = time.monotonic() - meter.t0
        for g in gws:
            g.close()
        for m in models:
            m.session += 1
        gws[:] = [Gateway(m, port) for m in models]
        await asyncio.gather(*(g.connect() for g in gws))
        rebirth = [m.birth(0.0, backlog=10) for m in models]
        for g, items in zip(gws, rebirth, strict=True):
            for it in items:
                g.publish(it)
        await wait_acked(gws, 60)
        res["reconnect"] = meter.end(n_sites + sum(map(len, rebirth)), 60)
        res["reconnect"]["per_site"] = 1 + len(rebirth[0])
        del s
    finally:
        misc.cancel()
        for g in gws:
            g.close()
    return res


# ---------------------------------------------------------------------- report
def extrapolate(res: dict, n: int) -> dict:
    day, storm, rec = res["day"], res["storm"], res["reconnect"]
    per_msg_cpu = statistics.median(
        [p["broker_cpu_s"] / max(1, p["delivered"]) for p in (res["birth"], day, storm, rec)])
    wire_in = day["broker_bytes_in"] / max(1, day["delivered"])   # per message, measured at the broker
    telemetry = n * N_IP * DAY / IP_TELEMETRY_S
    return {
        "sites": n,
        "connections": n,
        "day_msgs": day["per_site"] * n,
        "day_avg_msg_s": day["per_site"] * n / DAY,
        "day_avg_bytes_s": day["per_site"] * n * wire_in / DAY,
        "pings_s": n / KEEPALIVE_S,
        "peak_5s_msg_s": day["peak_5s_per_site"] * n / 5,
        "peak_minute_msgs": day["peak_minute_per_site"] * n,
        "storm_msgs": storm["per_site"] * n,
        "storm_msg_s_over_minute": storm["per_site"] * n / 60,
        "reconnect_msgs": rec["per_site"] * n,
        "ip_telemetry_msg_s": telemetry / DAY,
        "broker_cpu_s_per_msg": per_msg_cpu,
        "reconnect_cpu_s": rec["per_site"] * n * 2 * per_msg_cpu,   # in + out to central
        "peak_cores": day["peak_5s_per_site"] * n / 5 * 2 * per_msg_cpu,
    }


def report(res: dict) -> None:
    n = res["sites"]
    b, day, st, rc = res["birth"], res["day"], res["storm"], res["reconnect"]
    print(f"{n} simulated gateways (one MQTT 5 connection each) -> one mosquitto on loopback -> "
          f"central via $share (2 consumers)")
    for name, p in (("connect + birth", b), (f"typical day at x{day['speed']:.0f}", day),
                    ("storm burst, flat out", st), ("reconnect storm", rc)):
        lost = p["expected"] - p["delivered"]
        print(f"  {name:24s} {p['delivered']:7.0f} msgs in {p['seconds']:5.2f} s = "
              f"{p['delivered'] / p['seconds']:7.0f} msg/s at central"
              f"{'' if lost <= 0 else f', {lost:.0f} NOT DELIVERED'}; broker in "
              f"{p['broker_bytes_in'] / 1e6:6.2f} MB, out {p['broker_bytes_out'] / 1e6:6.2f} MB, "
              f"CPU {p['broker_cpu_s']:.2f} s ({p['broker_cpu_s'] / p['seconds'] * 100:.0f} % of a core)")
    print(f"  connect of {n} sites {res['connect_s']:.2f} s; {n} wills delivered in {res['wills_s']:.2f} s")
    print(f"  per site: day {day['per_site']:.0f} msgs, {day['payload_per_site'] / 1e3:.0f} kB payload+topic, "
          f"{day['wire_per_site'] / 1e3:.0f} kB MQTT (PUBLISH+PUBACK); peak minute "
          f"{day['peak_minute_per_site']:.0f} msgs; storm {st['per_site']} msgs "
          f"({st['payload_per_site'] / 1e3:.0f} kB); reconnect {rc['per_site']} msgs")
    print(f"  {'':26s}{'per 100 sites':>16s}{'province ' + str(PROVINCE):>18s}{'country ' + str(COUNTRY):>18s}")
    ex = [res["extrapolated"][k] for k in ("100", str(PROVINCE), str(COUNTRY))]
    rows = [("day avg msg/s", "day_avg_msg_s", "{:.2f}"), ("day avg kB/s (MQTT in)", "day_avg_bytes_s", "{:.2f}", 1e3),
            ("keepalive pings/s", "pings_s", "{:.1f}"),
            ("relay peak msg/s (5 s)", "peak_5s_msg_s", "{:.0f}"),
            ("relay peak minute msgs", "peak_minute_msgs", "{:.0f}"),
            ("storm msgs (1 min)", "storm_msgs", "{:.0f}"), ("storm msg/s", "storm_msg_s_over_minute", "{:.0f}"),
            ("reconnect storm msgs", "reconnect_msgs", "{:.0f}"),
            ("reconnect broker CPU s", "reconnect_cpu_s", "{:.1f}"),
            ("relay peak broker cores", "peak_cores", "{:.2f}"),
            ("IP-cluster telemetry msg/s", "ip_telemetry_msg_s", "{:.0f}")]
    for row in rows:
        name, key, f = row[0], row[1], row[2]
        div = row[3] if len(row) > 3 else 1
        print(f"  {name:26s}" + "".join(f"{f.format(e[key] / div):>18s}" if i else f"{f.format(e[key] / div):>16s}"
                                       for i, e in enumerate(ex)))
    print(f"  broker CPU per message (in + delivery): {ex[0]['broker_cpu_s_per_msg'] * 1e6:.0f} µs "
          f"(one mosquitto thread on this machine, median over phases); IP-cluster telemetry assumes "
          f"{N_IP} clusters per site every {IP_TELEMETRY_S} s on the same broker (site default "
          f"clusters_mqtt = central broker)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 sites, day in 8 s")
    ap.add_argument("--sites", type=int, default=None, help="simulated gateways (200)")
    ap.add_argument("--day-seconds", type=float, default=None, help="replay a day in this many s (15)")
    a = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    n = a.sites or (100 if a.quick else 200)
    day_s = a.day_seconds or (8.0 if a.quick else 15.0)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loaxa-scale-") as d:
        broker = Mosquitto(Path(d) / "broker", extra_conf="sys_interval 1\nmax_queued_messages 0\n"
                           "max_inflight_messages 100\n").start()
        central = None
        try:
            central = Central(broker.port)
            res = asyncio.run(run_phases(broker.port, broker.proc.pid, central, n, day_s))
        finally:
            if central is not None:
                central.stop()
            broker.proc.kill()
            broker.proc.wait()
    res["sites"] = n
    res["quick"] = a.quick
    res["extrapolated"] = {str(k): extrapolate(res, k) for k in (100, PROVINCE, COUNTRY)}
    res["elapsed_s"] = time.monotonic() - t0
    report(res)
    from bench._simsite import write_results

    path = write_results("scale", res)
    print(f"  ({res['elapsed_s']:.0f} s; figures in {path.relative_to(path.parents[2])})")


if __name__ == "__main__":
    main()

"""Replay of a 10,000-event outage backlog through the uplink vs a bare paho QoS 1 loop.

Both sides publish to the same local mosquitto with one subscriber attached and the same
in-flight window (20, mosquitto's receive maximum), and both wait until every message is
acknowledged; the uplink additionally commits each acknowledgement batch to SQLite
(synchronous=FULL), which is the price of losing nothing. Prints medians of N runs.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.broker import Mosquitto  # noqa: E402

from controller.contract import compact  # noqa: E402
from controller.outbox import Outbox  # noqa: E402
from controller.store import Store  # noqa: E402
from controller.uplink import Uplink, UplinkSettings  # noqa: E402

SITE = "bench"
BODY = {"cluster": "fm07", "rssi_dbm": -71.5, "note": "telemetry sample"}


def subscriber(port: int) -> tuple[mqtt.Client, list[int]]:
    got = [0]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda *a: got.__setitem__(0, got[0] + 1)
    c.connect("127.0.0.1", port)
    c.subscribe(f"loaxa/v1/{SITE}/#", qos=1)
    c.loop_start()
    time.sleep(0.2)
    return c, got


def run_uplink(port: int, n: int, workdir: Path) -> float:
    store = Store(workdir / f"s{time.monotonic_ns()}.db")
    outbox = Outbox(store, batch_max=n + 1, max_rows=n * 2)
    for i in range(n):  # the backlog written during the outage
        outbox.append("telemetry.sample", {**BODY, "i": i}, droppable=True)
    outbox.flush()

    async def main() -> float:
        up = Uplink(SITE, UplinkSettings(broker=f"mqtt://127.0.0.1:{port}"), outbox, store,
                    backoff_initial_s=0.05)
        t0 = time.perf_counter()
        up.start()
        while outbox.depth:
            await asyncio.sleep(0.001)
        dt = time.perf_counter() - t0
        await up.stop()
        return dt

    dt = asyncio.run(main())
    store.close()
    return dt


def run_bare(port: int, n: int) -> float:
    payloads = [compact({"id": f"{i:032x}", "seq": i + 1, "ts": "2026-01-01T00:00:00.000Z",
                         "type": "telemetry.sample", **BODY, "i": i, "historical": True})
                for i in range(n)]
    done = threading.Event()
    acked = [0]

    def on_publish(*_a):
        acked[0] += 1
        if acked[0] == n:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_publish = on_publish
    c.max_inflight_messages_set(20)
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    for p in payloads:
        c.publish(f"loaxa/v1/{SITE}/events", p, qos=1)
    done.wait(120)
    dt = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        broker = Mosquitto(work / "broker").start()
        sub, got = subscriber(broker.port)
        try:
            up, bare = [], []
            for _ in range(a.runs):  # interleaved so drift hits both sides alike
                up.append(run_uplink(broker.port, a.events, work))
                bare.append(run_bare(broker.port, a.events))
        finally:
            sub.loop_stop()
            broker.kill()
    mu, mb = statistics.median(up), statistics.median(bare)
    print(f"outbox replay: {a.events} events, median of {a.runs} runs")
    print(f"  uplink (durable outbox, acks committed): {mu:.3f} s  {a.events / mu:,.0f} events/s")
    print(f"  bare paho QoS 1 publish loop:            {mb:.3f} s  {a.events / mb:,.0f} events/s")
    print(f"  ratio uplink/bare throughput: {mb / mu:.2f}")
    print(f"  (a slow Python subscriber got {got[0]} messages: mosquitto drops QoS 1 messages"
          " beyond its per-client queue of 1000; the publisher side is what is measured)")


if __name__ == "__main__":
    main()

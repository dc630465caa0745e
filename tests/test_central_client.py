"""Reference central client end to end: signed commands answered over v5 and v3, loss detection."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import paho.mqtt.client as mqtt
import pytest

from controller.central import CentralClient, SigningKey, keygen, load_private_key, sign_command
from controller.commands import CommandGate
from controller.outbox import Outbox
from controller.store import Store
from controller.uplink import Uplink, UplinkSettings

SITE = "binhlu"


async def until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def gateway(broker, state_dir, pub_b64: str, protocol: str = "5"):
    store = Store(state_dir / "state.db")
    outbox = Outbox(store, flush_interval_s=0.05)
    gate = CommandGate(SITE, {"k1": pub_b64}, store, outbox)
    up = Uplink(SITE, UplinkSettings(broker=broker.url, protocol=protocol), outbox, store,
                on_command=gate.handle, version="t", boot_id="b", backoff_initial_s=0.05)
    gate.register_builtin(rebirth=up.rebirth, status_provider=up.snapshot)
    up.publish_state("health", {"gateway": {"uptime_s": 1}})
    up.start()
    await until(up.connected.is_set, what="gateway connected")
    return up


@pytest.mark.parametrize("gw_proto,client_proto", [("5", "5"), ("5", "3.1.1"), ("3.1.1", "3.1.1")])
def test_signed_command_answered_on_response_topic_or_resp_fallback(
        broker, state_dir, ed25519_keypair, gw_proto, client_proto):
    priv, pub = ed25519_keypair
    events: list[dict] = []

    async def main():
        up = await gateway(broker, state_dir, pub, gw_proto)
        loop = asyncio.get_running_loop()
        with CentralClient(broker.url, SITE, protocol=client_proto,
                           key=SigningKey(priv, "k1")) as c:
            c.watch(lambda o: events.append(o.payload) if o.kind == "event" else None)
            resp = await loop.run_in_executor(None, lambda: c.send("status.get", {}, timeout=5))
            forged = sign_command(priv, SITE, "status.get", {}, "k1")
            forged["args"] = {"evil": True}
            bad = await loop.run_in_executor(None, lambda: c.request("status.get", forged, 5))
            await until(lambda: events, what="command.rejected event")
        await up.stop()
        return resp, bad, forged

    resp, bad, forged = asyncio.run(main())
    assert resp["status"] == "ok"
    assert resp["data"] == {"health": {"gateway": {"uptime_s": 1}}, "clusters": [], "alarms": []}
    assert bad == {"request_id": forged["request_id"], "status": "error",
                   "error": {"code": "bad_signature", "message": "signature does not verify"}}
    assert events[0]["type"] == "command.rejected" and events[0]["reason"] == "bad_signature"
    assert events[0]["request_id"] == forged["request_id"]


def test_malformed_command_over_v5_still_gets_an_answer(broker, state_dir, ed25519_keypair):
    async def main():
        up = await gateway(broker, state_dir, ed25519_keypair[1])
        loop = asyncio.get_running_loop()
        with CentralClient(broker.url, SITE) as c:
            r = await loop.run_in_executor(None, lambda: c.request("rebirth", b"\xff{", 5))
        await up.stop()
        return r

    r = asyncio.run(main())
    assert r["request_id"] is None and r["error"]["code"] == "invalid_json"


def test_keygen_files_sign_commands_the_gateway_accepts(tmp_path, state_dir):
    key_path, pub = keygen(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert (tmp_path / "keys" / "central.pub").read_text().strip() == pub
    store = Store(state_dir / "s.db")
    gate = CommandGate(SITE, {"ops": pub}, store, Outbox(store))
    gate.register_builtin(rebirth=lambda: {"session": 1})
    cmd = sign_command(load_private_key(key_path), SITE, "rebirth", {}, "ops")
    resp = asyncio.run(gate.handle(f"loaxa/v1/{SITE}/cmd/rebirth", json.dumps(cmd).encode()))
    assert resp["status"] == "ok"


def test_watch_reports_gaps_duplicates_and_late_fills(broker):
    seen = []
    with CentralClient(broker.url, SITE, expect_seq=1) as c:
        c.watch(seen.append)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for seq, eid in [(1, "a"), (2, "b"), (2, "b"), (5, "e"), (3, "c"), (6, "f")]:
            pub.publish(f"loaxa/v1/{SITE}/events", json.dumps(
                {"id": eid, "seq": seq, "ts": "2026-01-01T00:00:00.000Z", "type": "x",
                 "historical": False}), qos=1).wait_for_publish(5)
        asyncio.run(until(lambda: sum(o.kind == "event" for o in seen) == 6))
        pub.loop_stop()
        pub.disconnect()
    notes = [(o.kind, o.detail) for o in seen if o.kind != "event"]
    assert notes == [
        ("duplicate", {"id": "b", "seq": 2, "first_seq": 2}),
        ("gap", {"expected": 3, "got": 5, "missing": 2}),
        ("gap_filled", {"seq": 3}),
    ]
    assert c.tracker.missing == {4}

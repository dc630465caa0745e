"""The simulated central server: hears everything a site publishes, sends it commands.

It signs with `controller.central.sign_command` (the reference central client's code, so
the simulation signs exactly as the real server must) and can also send what a real
server never would: unsigned commands, commands signed with the wrong key ("forged")
and byte-for-byte resends of an earlier request ("replay").

It keeps its own small paho client rather than `CentralClient` because it must survive
a broker outage: on every (re)connect it subscribes again, since the simulation's broker
keeps no sessions across a restart. Callbacks run on paho's network thread; the
Recorder is thread-safe.
"""
from __future__ import annotations

import base64
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from controller.contract import compact, rfc3339, topic
from device_drivers.sim.record import Recorder, parse_payload

log = structlog.get_logger(__name__)

Signed = Literal[True, False, "forged", "replay"]


def _sign_command(priv: Ed25519PrivateKey, site_id: str, command: str, args: dict,
                  key_id: str, request_id: str, issued_at: str) -> dict:
    from controller.central import sign_command

    return sign_command(priv, site_id, command, args, key_id, request_id=request_id,
                        issued_at=issued_at)


class CentralSim:
    """One simulated central server for one site, on the simulation's broker."""

    KEY_ID = "sim-central"

    def __init__(self, site_id: str, broker_url: str, recorder: Recorder, *,
                 key_id: str = KEY_ID, private_key: Ed25519PrivateKey | None = None):
        from device_drivers.ip_cluster import parse_broker_url

        self.site_id = site_id
        self.recorder = recorder
        self.key_id = key_id
        self.private_key = private_key or Ed25519PrivateKey.generate()
        self.host, self.port, tls = parse_broker_url(broker_url)
        self.client_id = f"sim-central-{uuid.uuid4().hex[:8]}"
        self.response_topic = f"loaxa-central/{self.client_id}/resp"
        self.root = topic(site_id, "")
        self.sent: dict[str, tuple[str, bytes]] = {}   # request_id -> (command, exact bytes)
        self.last_signed_id: str | None = None   # what a "replay" resends by default
        self.connected = threading.Event()
        self.gateway_online = threading.Event()  # the gateway's retained status says online
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set()
        c.reconnect_delay_set(0.2, 1)   # a short outage heals within a second of the broker
        c.on_connect, c.on_disconnect, c.on_message = (
            self._on_connect, self._on_disconnect, self._on_message)
        self.client = c

    @property
    def public_key_b64(self) -> str:
        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    # ---- connection -------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> None:
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise RuntimeError(f"simulated central server: no CONNACK from {self.host}:{self.port}")

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if rc.is_failure:
            return
        # retain-as-published: the record shows whether the gateway retained a message,
        # not merely whether it was delivered from the broker's store
        client.subscribe([(self.root + "#", SubscribeOptions(qos=1, retainAsPublished=True)),
                          (self.response_topic, SubscribeOptions(qos=1))])
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if msg.topic.startswith(self.root):
            self.recorder.mqtt(msg.topic, payload, retain=msg.retain, qos=msg.qos)
            if msg.topic == self.root + "status":
                st = parse_payload(payload)
                online = isinstance(st, dict) and st.get("state") == "online"
                (self.gateway_online.set if online else self.gateway_online.clear)()
        is_resp = msg.topic == self.response_topic or msg.topic.startswith(self.root + "resp/")
        if not is_resp:
            return
        parsed = parse_payload(payload)
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        rid = parsed.get("request_id") if isinstance(parsed, dict) else None
        if rid is None and corr is not None:
            rid = bytes(corr).decode("utf-8", errors="replace")
        self.recorder.response(rid, parsed)

    # ---- commands ---------------------------------------------------------------------
    def send(self, name: str, args: dict | None = None, *, signed: Signed = True,
             request_id: str | None = None, replay_of: str | None = None,
             issued_ago_s: float = 0.0) -> dict[str, Any]:
        """Publish one command; returns what was sent ({request_id, command, signed, bytes}).
        Never waits for the answer: responses land in the record as they come."""
        if signed == "replay":
            rid = replay_of or self.last_signed_id
            if rid is None or rid not in self.sent:
                raise ValueError(f"nothing to replay (request_id {rid!r} was never sent)")
            name, data = self.sent[rid]
            self._publish(name, data, rid)
            return {"request_id": rid, "command": name, "signed": "replay", "bytes": len(data)}
        rid = request_id or str(uuid.uuid4())
        issued = rfc3339(datetime.now(UTC) - timedelta(seconds=issued_ago_s))
        args = args or {}
        if signed is True:
            env = _sign_command(self.private_key, self.site_id, name, args, self.key_id, rid, issued)
        elif signed == "forged":   # right key id, wrong private key
            env = _sign_command(Ed25519PrivateKey.generate(), self.site_id, name, args,
                                self.key_id, rid, issued)
        else:
            env = {"request_id": rid, "site_id": self.site_id, "command": name,
                   "issued_at": issued, "args": args}
        data = compact(env)
        self.sent[rid] = (name, data)
        if signed is True:
            self.last_signed_id = rid
        self._publish(name, data, rid)
        return {"request_id": rid, "command": name, "signed": signed, "bytes": len(data)}

    def _publish(self, name: str, data: bytes, rid: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.response_topic
        props.CorrelationData = rid.encode()
        info = self.client.publish(topic(self.site_id, f"cmd/{name}"), data, qos=1,
                                   properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:   # queued by paho, sent after the reconnect
            log.info("central_sim.command_queued", command=name, request_id=rid, rc=info.rc)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.wait(0.05):
                return True
        return False

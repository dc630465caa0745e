"""Reference central-server client: keys, signed commands, and a watcher that notices loss.

Used by `loaxa keygen` / `loaxa send` and by the scenario runner's simulated central
server, so it speaks the contract exactly as the real central server must. It is a
plain blocking client (paho's own network thread); callbacks run on that thread.
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.contract import compact, rfc3339, signing_bytes, topic
from controller.uplink import parse_broker


# ------------------------------------------------------------------ keys and signing
def public_key_b64(priv: Ed25519PrivateKey) -> str:
    return base64.b64encode(priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def keygen(out_dir: str | Path, name: str = "central") -> tuple[Path, str]:
    """Write NAME.key (PEM, mode 0600) and NAME.pub (base64 raw); return (key path, public b64)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv = Ed25519PrivateKey.generate()
    key_path = out / f"{name}.key"
    pem = priv.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_key_b64(priv)
    (out / f"{name}.pub").write_text(pub + "\n")
    return key_path, pub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


@dataclass
class SigningKey:
    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_file(cls, path: str | Path, key_id: str) -> SigningKey:
        return cls(load_private_key(path), key_id)


def sign_command(
    priv: Ed25519PrivateKey,
    site_id: str,
    command: str,
    args: dict | None,
    key_id: str,
    request_id: str | None = None,
    issued_at: str | datetime | None = None,
) -> dict:
    """A complete command envelope, signed over the canonical JSON of all other fields."""
    if isinstance(issued_at, datetime):
        issued_at = rfc3339(issued_at)
    env = {
        "request_id": request_id or str(uuid.uuid4()),
        "site_id": site_id,
        "command": command,
        "issued_at": issued_at or rfc3339(datetime.now(UTC)),
        "args": args or {},
        "key_id": key_id,
    }
    env["signature"] = base64.b64encode(priv.sign(signing_bytes(env))).decode()
    return env


# ------------------------------------------------------------------ watching
@dataclass
class Observation:
    """One thing the central server noticed. kind: status, health, cluster, alarms, event,
    response, gap, gap_filled, duplicate, seq_regression, other."""

    kind: str
    topic: str
    payload: Any
    retain: bool = False
    qos: int = 0
    detail: dict = field(default_factory=dict)
    t: float = field(default_factory=time.time)


class SeqTracker:
    """Gap/duplicate bookkeeping over `events` (the central server's loss detector)."""

    def __init__(self, expect_seq: int | None = None, remember: int = 100000):
        self.last: int | None = None if expect_seq is None else expect_seq - 1
        self.ids: dict[str, int] = {}
        self._order: deque[str] = deque()
        self.remember = remember
        self.missing: set[int] = set()

    def feed(self, ev: dict) -> list[tuple[str, dict]]:
        seq, eid = ev.get("seq"), ev.get("id")
        if not isinstance(seq, int) or not isinstance(eid, str):
            return [("other", {"error": "event without int seq / str id"})]
        if eid in self.ids:
            return [("duplicate", {"id": eid, "seq": seq, "first_seq": self.ids[eid]})]
        self.ids[eid] = seq
        self._order.append(eid)
        if len(self._order) > self.remember:
            self.ids.pop(self._order.popleft(), None)
        if self.last is None or seq == self.last + 1:
            self.last = seq
            return []
        if seq > self.last + 1:
            gap = list(range(self.last + 1, seq))
            self.missing.update(gap)
            self.last = seq
            return [("gap", {"expected": gap[0], "got": seq, "missing": len(gap)})]
        if seq in self.missing:
            self.missing.discard(seq)
            return [("gap_filled", {"seq": seq})]
        return [("seq_regression", {"seq": seq, "last": self.last})]


class CentralClient:
    """Connect to the broker as the central server for one site."""

    def __init__(
        self,
        broker_url: str,
        site_id: str,
        *,
        protocol: str = "5",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        key: SigningKey | None = None,
        expect_seq: int | None = None,
    ):
        self.site_id, self.key = site_id, key
        self.host, self.port, tls = parse_broker(broker_url)
        self.v5 = protocol != "3.1.1"
        self.client_id = client_id or f"central-{uuid.uuid4().hex[:8]}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311)
        if username:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect, c.on_message, c.on_subscribe = self._on_connect, self._on_message, self._on_sub
        self.client = c
        self.response_topic = f"loaxa-central/{self.client_id}/resp"
        self.tracker = SeqTracker(expect_seq)
        self._cond = threading.Condition()
        self._subacked: set[int] = set()
        self._connected = threading.Event()
        self._pending: dict[bytes | str, tuple[threading.Event, list]] = {}
        self._watchers: list[Callable[[Observation], None]] = []

    # ------------------------------------------------------------ connection
    def connect(self, timeout: float = 5.0) -> CentralClient:
        self.client.connect(self.host, self.port, 30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port}")
        if self.v5:
            self._subscribe(self.response_topic, timeout)
        return self

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> CentralClient:
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if not rc.is_failure:
            self._connected.set()

    def _on_sub(self, client, userdata, mid, rcs, props) -> None:
        with self._cond:
            self._subacked.add(mid)
            self._cond.notify_all()

    def _subscribe(self, sub: str, timeout: float) -> None:
        rc, mid = self.client.subscribe(sub, qos=1)
        with self._cond:  # the SUBACK may arrive before subscribe() returns: hence the set
            ok = self._cond.wait_for(lambda: mid in self._subacked, timeout)
            self._subacked.discard(mid)
        if rc != mqtt.MQTT_ERR_SUCCESS or not ok:
            raise TimeoutError(f"subscribe {sub} not acknowledged")

    # ------------------------------------------------------------ commands
    def send(self, command: str, args: dict | None = None, key: SigningKey | None = None,
             timeout: float = 10.0, *, request_id: str | None = None,
             issued_at: str | datetime | None = None) -> dict:
        """Sign and send a command; return the gateway's response (TimeoutError if none)."""
        key = key or self.key
        if key is None:
            raise ValueError("no signing key")
        env = sign_command(key.private_key, self.site_id, command, args, key.key_id,
                           request_id=request_id, issued_at=issued_at)
        return self.request(command, env, timeout)

    def request(self, command: str, payload: dict | bytes, timeout: float = 10.0,
                request_id: str | None = None) -> dict:
        """Publish any payload on cmd/{command} (tests send forged ones) and await the answer."""
        if isinstance(payload, dict):
            request_id = request_id or payload.get("request_id")
            payload = compact(payload)
        corr: bytes | str
        ev, box = threading.Event(), []
        if self.v5:
            corr = uuid.uuid4().bytes
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = self.response_topic, corr
        else:
            if not request_id:
                raise ValueError("MQTT 3.1.1 responses need a request_id")
            corr = topic(self.site_id, f"resp/{request_id}")
            props = None
        self._pending[corr] = (ev, box)
        try:
            if not self.v5:
                self._subscribe(str(corr), timeout)
            self.client.publish(topic(self.site_id, f"cmd/{command}"), payload, qos=1,
                                properties=props)
            if not ev.wait(timeout):
                raise TimeoutError(f"no response to {command} within {timeout} s")
            return box[0]
        finally:
            self._pending.pop(corr, None)
            if not self.v5:
                self.client.unsubscribe(str(corr))

    # ------------------------------------------------------------ watching
    def watch(self, callback: Callable[[Observation], None], timeout: float = 5.0) -> None:
        """Report everything under loaxa/v1/{site}/# plus seq gaps and duplicates."""
        self._watchers.append(callback)
        self._subscribe(topic(self.site_id, "#"), timeout)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            payload: Any = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            payload = bytes(msg.payload)
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        key = corr if corr is not None and msg.topic == self.response_topic else msg.topic
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting[1].append(payload)
            waiting[0].set()
        if not self._watchers:
            return
        obs = [Observation(_kind(self.site_id, msg.topic), msg.topic, payload, bool(msg.retain),
                           msg.qos)]
        if obs[0].kind == "event" and isinstance(payload, dict):
            obs += [Observation(k, msg.topic, payload, False, msg.qos, d)
                    for k, d in self.tracker.feed(payload)]
        for o in obs:
            for w in list(self._watchers):
                w(o)


def _kind(site_id: str, t: str) -> str:
    root = topic(site_id, "")
    if not t.startswith(root):
        return "response"
    sub = t[len(root):]
    if sub in ("status", "health", "alarms"):
        return sub
    if sub == "events":
        return "event"
    if sub.startswith("clusters/") and sub.endswith("/state"):
        return "cluster"
    if sub.startswith("resp/"):
        return "response"
    return "other"

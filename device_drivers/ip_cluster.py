"""IP (4G) loudspeaker clusters over MQTT.

`IpClusterDriver` is pure translation between the controller's verbs and one firmware's MQTT
scheme, entirely driven by the profile's `mqtt:` section; it owns no socket, so it can be
tested byte for byte.  `IpClusterLink` owns the single paho connection to the clusters broker
for the whole site and turns acknowledgements into reached/unreached answers.
"""
from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from device_drivers.ip_profile import (
    IpMqttSpec,
    decode_field,
    get_path,
    match,
    placeholders,
    render,
)

log = structlog.get_logger(__name__)

Publish = tuple[str, bytes, int, bool]  # topic, payload, qos, retain


@dataclass(frozen=True)
class Observation:
    """What one incoming message told us about one cluster."""
    cluster_id: str
    kind: Literal["liveness", "telemetry", "ack", "malformed"]
    online: bool | None = None                       # liveness
    telemetry: dict[str, Any] = field(default_factory=dict)  # telemetry (normalised fields)
    command: str | None = None                       # ack: play | stop | volume
    ok: bool | None = None                           # ack
    broadcast_id: str | None = None                  # ack (play)
    error: str | None = None                         # ack refused: device's reason
    reason: str | None = None                        # malformed: what was wrong
    topic: str = ""


def spec_of(profile: Any) -> IpMqttSpec:
    """Accept a full Profile (with `.mqtt`) or a bare IpMqttSpec."""
    spec = profile if isinstance(profile, IpMqttSpec) else getattr(profile, "mqtt", None)
    if not isinstance(spec, IpMqttSpec):
        raise ValueError("profile has no mqtt section (is it kind ip_cluster?)")
    return spec


class IpClusterDriver:
    """One cluster: verbs -> MQTT publishes, MQTT messages -> Observations.  Never raises on
    what arrives from the device; nonsense becomes a `malformed` observation and is counted."""

    _URL_MEMORY = 32

    def __init__(self, cluster_id: str, device_id: str, profile: Any):
        self.cluster_id = cluster_id
        self.device_id = device_id
        self.spec = spec_of(profile)
        t = lambda tpl: self.spec.topic(tpl, device_id)  # noqa: E731
        self.lwt_topic = t(self.spec.liveness.topic)
        self.ack_topic = t(self.spec.ack_topic)
        self.tele_topics = {t(ts.topic): ts for ts in self.spec.telemetry}
        self.cmd_topics = {name: t(c.topic) for name, c in self.spec.commands.items()}
        self.malformed = 0
        self.state: dict[str, Any] = {"online": None}   # merged latest normalised telemetry
        self._url_to_id: OrderedDict[str, str] = OrderedDict()

    def subscriptions(self) -> list[str]:
        return list(dict.fromkeys([self.lwt_topic, self.ack_topic, *self.tele_topics]))

    # ---- verbs ------------------------------------------------------------------------
    def _cmd(self, name: str, **values: Any) -> list[Publish]:
        c = self.spec.commands[name]
        values |= {"device_id": self.device_id, "prefix": self.spec.prefix}
        return [(self.cmd_topics[name], render(c.payload, values), c.qos, c.retain)]

    def play(self, url: str, volume: int, broadcast_id: str) -> list[Publish]:
        _check_volume(volume)
        self._url_to_id[url] = broadcast_id
        self._url_to_id.move_to_end(url)
        while len(self._url_to_id) > self._URL_MEMORY:
            self._url_to_id.popitem(last=False)
        pubs = self._cmd("play", url=url, volume=volume, id=broadcast_id)
        if "volume" not in placeholders(self.spec.commands["play"].payload):
            pubs = self._cmd("volume", volume=volume) + pubs   # firmware plays at set volume
        return pubs

    def stop(self) -> list[Publish]:
        return self._cmd("stop")

    def set_volume(self, volume: int) -> list[Publish]:
        _check_volume(volume)
        return self._cmd("volume", volume=volume)

    # ---- incoming ---------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> list[Observation]:
        try:
            return self._handle(topic, payload)
        except Exception as e:  # a driver bug must not take the link down
            log.exception("ip_cluster.handle_failed", cluster=self.cluster_id, topic=topic)
            return [self._bad(topic, f"internal error: {e}")]

    def _bad(self, topic: str, reason: str) -> Observation:
        self.malformed += 1
        if self.malformed == 1 or self.malformed % 100 == 0:
            log.warning("ip_cluster.malformed", cluster=self.cluster_id, topic=topic,
                        reason=reason, count=self.malformed)
        return Observation(self.cluster_id, "malformed", reason=reason, topic=topic)

    def _handle(self, topic: str, payload: bytes) -> list[Observation]:
        out: list[Observation] = []
        if topic == self.lwt_topic:
            text = payload.decode(errors="replace").strip()
            lv = self.spec.liveness
            if text in (lv.online, lv.offline):
                self.state["online"] = text == lv.online
                out.append(Observation(self.cluster_id, "liveness",
                                       online=self.state["online"], topic=topic))
            else:
                out.append(self._bad(topic, f"liveness payload {text[:40]!r}"))
        if topic == self.ack_topic:
            out.extend(self._ack(topic, payload))
        if topic in self.tele_topics:
            out.extend(self._telemetry(topic, payload))
        return out

    def _ack(self, topic: str, payload: bytes) -> list[Observation]:
        for name, cmd in self.spec.commands.items():
            for outcome in ("error", "ok"):
                tpl = cmd.replies.get(outcome)
                got = match(tpl, payload) if tpl is not None else None
                if got is None:
                    continue
                bid = got.get("id") or self._url_to_id.get(got.get("url", ""))
                return [Observation(self.cluster_id, "ack", command=name, ok=outcome == "ok",
                                    broadcast_id=bid, error=got.get("error"), topic=topic)]
        try:
            json.loads(payload)
        except ValueError:
            return [self._bad(topic, f"result is not JSON: {payload[:40]!r}")]
        # Firmwares publish results for commands we never send (e.g. Tasmota's POWER): ignore.
        log.debug("ip_cluster.unmatched_result", cluster=self.cluster_id, payload=payload[:80])
        return []

    def _telemetry(self, topic: str, payload: bytes) -> list[Observation]:
        try:
            obj = json.loads(payload)
        except ValueError:
            return [self._bad(topic, f"telemetry is not JSON: {payload[:40]!r}")]
        if not isinstance(obj, dict):
            return [self._bad(topic, f"telemetry is not an object: {payload[:40]!r}")]
        tel: dict[str, Any] = {}
        errors: list[str] = []
        for name, fm in self.tele_topics[topic].fields.items():
            try:
                raw = get_path(obj, fm.path)
            except KeyError:
                continue
            try:
                tel[name] = decode_field(fm, raw)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        if tel.get("playing") is False:
            tel.setdefault("playing_url", None)
            tel.setdefault("playing_id", None)
        elif tel.get("playing_url") and "playing_id" not in tel:
            tel["playing_id"] = self._url_to_id.get(tel["playing_url"])
        if "volume" in tel and not 0 <= tel["volume"] <= 100:
            errors.append(f"volume {tel.pop('volume')} outside 0-100")
        self.state.update(tel)
        out = []
        if tel:
            out.append(Observation(self.cluster_id, "telemetry", telemetry=tel, topic=topic))
        if errors or not tel:
            out.append(self._bad(topic, "; ".join(errors) or "no known field in telemetry"))
        return out


def _check_volume(volume: int) -> None:
    if isinstance(volume, bool) or not isinstance(volume, int) or not 0 <= volume <= 100:
        raise ValueError(f"volume must be an integer 0-100 (got {volume!r})")


@dataclass(frozen=True)
class CommandResult:
    """Answer to one command sent to one cluster."""
    cluster_id: str
    reached: bool
    reason: str = ""        # why not reached: not connected / no ack / device refused


class IpClusterLink:
    """One paho client (own network thread) to the clusters broker for every IP cluster of the
    site.  paho callbacks only hand bytes to the asyncio loop; all state lives on the loop."""

    def __init__(self, broker_url: str, drivers: list[IpClusterDriver], on_observation=None, *,
                 client_id: str = "loaxa-clusters", username: str | None = None,
                 password: str | None = None, ca_file: str | None = None,
                 keepalive_s: int = 30, backoff_s: tuple[int, int] = (1, 30),
                 on_link=None):
        self.broker_url = broker_url
        self.on_link = on_link  # called with True/False when the broker link comes and goes
        self.drivers = {d.cluster_id: d for d in drivers}
        self._by_topic: dict[str, list[IpClusterDriver]] = {}
        for d in drivers:
            for t in d.subscriptions():
                self._by_topic.setdefault(t, []).append(d)
        self.on_observation = on_observation
        self._opts = dict(client_id=client_id, username=username, password=password,
                          ca_file=ca_file, keepalive=keepalive_s, backoff=backoff_s)
        self.connected = False
        self._client = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Observation] = asyncio.Queue()
        self._consumer: asyncio.Task | None = None
        self._waiters: dict[tuple, list[asyncio.Future]] = {}
        self._connected_evt = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        import paho.mqtt.client as mqtt

        self._loop = asyncio.get_running_loop()
        host, port, tls = parse_broker_url(self.broker_url)
        o = self._opts
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=o["client_id"],
                        protocol=mqtt.MQTTv311)
        if o["username"]:
            c.username_pw_set(o["username"], o["password"])
        if tls:
            c.tls_set(ca_certs=o["ca_file"])
        c.reconnect_delay_set(*o["backoff"])
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c
        self._consumer = asyncio.create_task(self._consume(), name="ip-cluster-observations")
        c.connect_async(host, port, keepalive=o["keepalive"])
        c.loop_start()

    async def wait_connected(self, timeout: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(self._connected_evt.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.disconnect()
            await asyncio.to_thread(c.loop_stop)
        if self._consumer:
            self._consumer.cancel()
        for futs in self._waiters.values():
            for f in futs:
                if not f.done():
                    f.cancel()

    # ---- paho thread: hand over only ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("ip_link.connect_refused", reason=str(reason_code))
            return
        if self._by_topic:
            client.subscribe([(t, 1) for t in self._by_topic])
        self._loop.call_soon_threadsafe(self._set_connected, True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self._loop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._set_connected, False)

    def _on_message(self, client, userdata, msg):
        self._loop.call_soon_threadsafe(self._dispatch, msg.topic, bytes(msg.payload))

    # ---- loop side ----------------------------------------------------------------------
    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            log.info("ip_link.connected" if up else "ip_link.disconnected", broker=self.broker_url)
        changed = up != self.connected
        self.connected = up
        (self._connected_evt.set if up else self._connected_evt.clear)()
        if changed and self.on_link is not None:
            try:
                self.on_link(up)
            except Exception:
                log.exception("ip_link.on_link_failed")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        for d in self._by_topic.get(topic, ()):
            for obs in d.handle(topic, payload):
                if obs.kind == "ack":
                    self._resolve(obs)
                self._queue.put_nowait(obs)

    async def _consume(self) -> None:
        while True:
            obs = await self._queue.get()
            if self.on_observation is None:
                continue
            try:
                await self.on_observation(obs)
            except Exception:
                log.exception("ip_link.observer_failed", cluster=obs.cluster_id, kind=obs.kind)

    def _resolve(self, obs: Observation) -> None:
        keys = [(obs.cluster_id, obs.command, obs.broadcast_id)] if obs.command == "play" \
            else [(obs.cluster_id, obs.command, None)]
        for key in keys:
            futs = self._waiters.get(key) or []
            while futs:
                f = futs.pop(0)
                if not f.done():
                    f.set_result(obs)
                    return

    async def _send(self, cluster_id: str, command: str, pubs: list[Publish],
                    key_id: str | None, timeout: float | None) -> CommandResult:
        d = self.drivers[cluster_id]
        if self._client is None or not self.connected:
            return CommandResult(cluster_id, False, "clusters broker not connected")
        key = (cluster_id, command, key_id)
        fut = self._loop.create_future()
        self._waiters.setdefault(key, []).append(fut)
        try:
            for topic, payload, qos, retain in pubs:
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
                if info.rc != 0:
                    return CommandResult(cluster_id, False, f"publish failed (rc={info.rc})")
            wait = timeout if timeout is not None else d.spec.ack_timeout_s
            try:
                obs: Observation = await asyncio.wait_for(fut, wait)
            except TimeoutError:
                hint = " (cluster reported offline)" if d.state.get("online") is False else ""
                return CommandResult(cluster_id, False, f"no acknowledgement within {wait:g}s{hint}")
            if not obs.ok:
                return CommandResult(cluster_id, False, f"refused by cluster: {obs.error or '?'}")
            return CommandResult(cluster_id, True)
        finally:
            lst = self._waiters.get(key)
            if lst and fut in lst:
                lst.remove(fut)
            if not lst:
                self._waiters.pop(key, None)

    async def play(self, cluster_id: str, url: str, volume: int, broadcast_id: str, *,
                   timeout: float | None = None) -> CommandResult:
        pubs = self.drivers[cluster_id].play(url, volume, broadcast_id)
        return await self._send(cluster_id, "play", pubs, broadcast_id, timeout)

    async def stop(self, cluster_id: str, *, timeout: float | None = None) -> CommandResult:
        return await self._send(cluster_id, "stop", self.drivers[cluster_id].stop(), None, timeout)

    async def set_volume(self, cluster_id: str, volume: int, *,
                         timeout: float | None = None) -> CommandResult:
        pubs = self.drivers[cluster_id].set_volume(volume)
        return await self._send(cluster_id, "volume", pubs, None, timeout)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """mqtt://host[:port] or mqtts://host[:port] -> (host, port, tls)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:1883 (got {url!r})")
    tls = u.scheme == "mqtts"
    return u.hostname, u.port or (8883 if tls else 1883), tls

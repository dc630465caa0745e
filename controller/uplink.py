"""The one MQTT connection to the central broker, driven from the asyncio loop.

paho-mqtt runs as an *external-loop* client: its socket is watched with
`loop.add_reader/add_writer` and `loop_read/loop_write/loop_misc` run on the loop thread,
so every paho callback already runs on the loop and may touch state directly. Only the
blocking TCP/TLS connect runs in an executor thread. A fresh paho Client is made for every
connection attempt: the will must carry the new session, and paho's own resend queue
must not duplicate the outbox, which is the only durability mechanism (persistent MQTT
sessions are allowed but never relied on).
"""
from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.contract import compact, rfc3339, topic

log = structlog.get_logger(__name__)

CommandHandler = Callable[[str, bytes], Awaitable[dict | None]]


class CentralSettings(Protocol):
    """The `central` section of the site file (controller/config.py) as the uplink reads it."""

    broker: str
    client_id: str | None
    username: str | None
    password_file: str | None
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    protocol: str
    keepalive_s: int


@dataclass
class UplinkSettings:
    """Stand-alone CentralSettings (tests, benches) until the site config supplies one."""

    broker: str
    client_id: str | None = None
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    protocol: str = "5"
    keepalive_s: int = 30


def parse_broker(url: str) -> tuple[str, int, bool]:
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(f"broker URL must be mqtt://host[:port] or mqtts://host[:port], got {url!r}")
    tls = u.scheme == "mqtts"
    return u.hostname, u.port or (8883 if tls else 1883), tls


class Uplink:
    def __init__(
        self,
        site_id: str,
        settings: CentralSettings | Any,
        outbox: Any,
        store: Any,
        *,
        on_command: CommandHandler | None = None,
        version: str = "0",
        boot_id: str = "",
        backoff_initial_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        inflight_window: int = 20,
        state_min_interval_s: float = 1.0,
        connect_timeout_s: float = 10.0,
        ack_delay_s: float = 0.05,
        rng: Callable[[], float] = random.random,
    ):
        self.site_id, self.settings, self.outbox, self.store = site_id, settings, outbox, store
        self.on_command = on_command
        self.version, self.boot_id = version, boot_id
        self.host, self.port, self.tls = parse_broker(settings.broker)
        self.v5 = str(getattr(settings, "protocol", "5")) != "3.1.1"
        self.backoff_initial_s, self.backoff_cap_s = backoff_initial_s, backoff_cap_s
        self.window = inflight_window
        self.state_min_interval_s = state_min_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.ack_delay_s = ack_delay_s
        self._rng = rng
        self.session = 0
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._connack: asyncio.Future | None = None
        self._watermark = 0
        self._events_window = inflight_window
        self._sent_upto = 0
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._acks: list[int] = []
        self._ack_scheduled = False
        self._waiters: dict[int, asyncio.Future] = {}  # mid -> future (non-event publishes)
        self._states: dict[str, bytes] = {}
        self._published: dict[str, bytes] = {}
        self._last_pub: dict[str, float] = {}
        self._state_timers: dict[str, asyncio.TimerHandle] = {}
        self._forced: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        outbox.add_listener(self._wake.set)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> asyncio.Task:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = self._loop.create_task(self._run(), name="uplink")
        return self._task

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        """Deliver what is pending (bounded wait), publish offline, wait for it, disconnect."""
        if self._task is None:
            return
        deadline = time.monotonic() + drain_timeout_s
        while (self.connected.is_set() and (self.outbox.depth or self._inflight)
               and time.monotonic() < deadline):
            self.outbox.flush()
            await asyncio.sleep(0.02)
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, drain_timeout_s + 3)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None

    async def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                await self._connect_once()
            except Exception as e:  # network, TLS, refused CONNACK: all retried
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("uplink_connect_failed", error=self.last_error, attempt=attempt,
                            broker=f"{self.host}:{self.port}")
                self._teardown()
                delay = self._rng() * min(self.backoff_cap_s, self.backoff_initial_s * 2 ** attempt)
                attempt = min(attempt + 1, 30)
                await self._sleep_or_stop(delay)
                continue
            attempt = 0
            self.last_error = None
            await self._serve()
            self._teardown()
            if not self._stop.is_set():
                await self._sleep_or_stop(self._rng() * self.backoff_initial_s)

    async def _sleep_or_stop(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
        except TimeoutError:
            pass

    # ------------------------------------------------------------ connecting
    def _status(self, state: str) -> bytes:
        return compact({"state": state, "session": self.session, "ts": rfc3339(),
                        "version": self.version, "boot_id": self.boot_id})

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=getattr(s, "client_id", None) or f"loaxa-{self.site_id}",
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            **({} if self.v5 else {"clean_session": True}),
        )
        c.enable_logger(None)
        c.max_inflight_messages_set(self.window)
        c.max_queued_messages_set(0)
        c.will_set(topic(self.site_id, "status"), self._status("offline"), qos=1, retain=True)
        if getattr(s, "username", None):
            c.username_pw_set(s.username, _read_secret(getattr(s, "password_file", None)))
        if self.tls:
            c.tls_set(ca_certs=getattr(s, "ca_file", None), certfile=getattr(s, "cert_file", None),
                      keyfile=getattr(s, "key_file", None), cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    async def _connect_once(self) -> None:
        self.session = self.store.kv_incr("mqtt_session")
        client = self._client = self._make_client()
        loop = asyncio.get_running_loop()
        self._lost.clear()
        self._connack = loop.create_future()
        keepalive = int(getattr(self.settings, "keepalive_s", 30))
        kwargs = {"clean_start": True} if self.v5 else {}
        fut = loop.run_in_executor(None, lambda: client.connect(
            self.host, self.port, keepalive, **kwargs))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.connect_timeout_s)
        except BaseException:
            # the executor may still finish later: close its socket then, and collect its
            # outcome so asyncio does not report an unretrieved exception
            def _late(f: asyncio.Future) -> None:
                if not f.cancelled():
                    f.exception()
                _close_quietly(client)
            fut.add_done_callback(_late)
            raise
        sock = client.socket()
        if sock is None:
            raise ConnectionError("no socket after connect")
        loop.add_reader(sock, self._readable, client)
        loop.add_writer(sock, self._writable, client)
        rc, props = await asyncio.wait_for(self._connack, self.connect_timeout_s)
        if rc.is_failure:
            raise ConnectionRefusedError(f"CONNACK {rc}")
        recv_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self._events_window = max(1, min(self.window, (recv_max or 65535) - 2))
        self._watermark = self.outbox.last_seq  # everything queued so far is historical
        log.info("uplink_connected", broker=f"{self.host}:{self.port}", session=self.session,
                 backlog=self.outbox.depth, protocol="5" if self.v5 else "3.1.1")

    async def _serve(self) -> None:
        """One established connection: birth, state, subscribe, then stream events."""
        client = self._client
        assert client is not None
        self._flush_acks()
        self._inflight.clear()
        self._sent_upto = 0
        self._published.clear()
        client.publish(topic(self.site_id, "status"), self._status("online"), qos=1, retain=True)
        for sub in list(self._states):
            self._publish_state_now(sub)
        client.subscribe(topic(self.site_id, "cmd/+"), qos=1)
        self.connected.set()
        misc = asyncio.create_task(self._misc(client))
        pump = asyncio.create_task(self._pump(client))
        stop = asyncio.create_task(self._stop.wait())
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait({stop, lost, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and pump.exception():
                log.error("uplink_pump_failed", error=repr(pump.exception()))
            if self._stop.is_set() and not self._lost.is_set():
                await self._clean_disconnect(client)
        finally:
            self.connected.clear()
            for t in (misc, pump, stop, lost):
                t.cancel()

    async def _clean_disconnect(self, client: mqtt.Client) -> None:
        info = client.publish(topic(self.site_id, "status"), self._status("offline"),
                              qos=1, retain=True)
        fut = self._waiter(info.mid)
        try:
            await asyncio.wait_for(asyncio.wait({fut, asyncio.ensure_future(self._lost.wait())},
                                                return_when=asyncio.FIRST_COMPLETED), 3.0)
        except TimeoutError:
            log.warning("uplink_offline_not_acknowledged")
        if not self._lost.is_set():
            client.disconnect()
            try:
                await asyncio.wait_for(self._lost.wait(), 2.0)
            except TimeoutError:
                pass
        log.info("uplink_stopped", session=self.session)

    def _teardown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._unwatch(client.socket())
            _close_quietly(client)
        self.connected.clear()
        self._inflight.clear()
        for f in self._waiters.values():
            if not f.done():
                f.cancel()
        self._waiters.clear()

    async def _misc(self, client: mqtt.Client) -> None:
        while True:
            await asyncio.sleep(1.0)
            client.loop_misc()  # keepalive pings and dead-connection detection

    # ------------------------------------------------------------ paho socket glue
    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _readable(self, client: mqtt.Client) -> None:
        rc = client.loop_read()
        sock = client.socket()
        # TLS may hold decrypted bytes the selector cannot see: drain them now
        while rc == mqtt.MQTT_ERR_SUCCESS and sock is not None and getattr(sock, "pending", None) \
                and sock.pending() > 0:
            rc = client.loop_read()
            sock = client.socket()

    def _writable(self, client: mqtt.Client) -> None:
        client.loop_write()

    def _on_socket_open(self, client, userdata, sock) -> None:
        pass  # registered by _connect_once once connect() has returned to the loop

    def _on_socket_close(self, client, userdata, sock) -> None:
        if self._on_loop_thread():
            self._unwatch(sock)

    def _on_register_write(self, client, userdata, sock) -> None:
        if self._on_loop_thread() and self._loop is not None and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._writable, client)

    def _on_unregister_write(self, client, userdata, sock) -> None:
        if self._on_loop_thread() and self._loop is not None:
            self._loop.remove_writer(sock)

    def _unwatch(self, sock: Any) -> None:
        if sock is None or self._loop is None:
            return
        try:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        except (ValueError, OSError):
            pass

    # ------------------------------------------------------------ paho callbacks (loop thread)
    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if client is self._client and self._connack is not None and not self._connack.done():
            self._connack.set_result((rc, props))

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:
        if client is not self._client:
            return
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(f"disconnected before CONNACK: {rc}"))
        if self.connected.is_set():
            log.warning("uplink_disconnected", reason=str(rc), inflight=len(self._inflight))
        self.connected.clear()
        self._lost.set()
        self._wake.set()

    def _on_publish(self, client, userdata, mid, rc, props) -> None:
        if client is not self._client:
            return
        seq = self._inflight.pop(mid, None)
        if seq is None:
            fut = self._waiters.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(rc)
            return
        if rc.is_failure:  # e.g. not authorised: keep it, retry on a new connection later
            log.error("uplink_publish_refused", seq=seq, reason=str(rc))
            client.disconnect()
            return
        self._acks.append(seq)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            # one transaction (one fsync) per batch of PUBACKs; a crash before it only
            # means those events are sent again, with the same ids
            asyncio.get_running_loop().call_later(self.ack_delay_s, self._flush_acks)
        self._wake.set()

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        acks, self._acks = self._acks, []
        if acks:
            try:
                self.outbox.ack(acks)
            except Exception:  # a failed ack only means a duplicate delivery later
                log.exception("outbox_ack_failed", count=len(acks))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            log.warning("retained_command_ignored", topic=msg.topic)
            return
        props = getattr(msg, "properties", None)
        resp_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        self._spawn(self._run_command(msg.topic, bytes(msg.payload), resp_topic, corr))

    def _spawn(self, coro: Awaitable) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _waiter(self, mid: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiters[mid] = fut
        return fut

    # ------------------------------------------------------------ events
    async def _pump(self, client: mqtt.Client) -> None:
        events_topic = topic(self.site_id, "events")
        while self.connected.is_set():
            self._wake.clear()
            room = self._events_window - len(self._inflight)
            try:
                rows = self.outbox.pending_raw(room, self._sent_upto) if room > 0 else []
            except Exception:  # e.g. a disk error: keep the connection, retry shortly
                log.exception("outbox_read_failed")
                await asyncio.sleep(1.0)
                continue
            for seq, payload in rows:
                hist = "true" if seq <= self._watermark else "false"
                data = payload[:-1] + ',"historical":' + hist + "}"
                info = client.publish(events_topic, data.encode(), qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection going down; _on_disconnect wakes us
                self._inflight[info.mid] = seq
                self._sent_upto = seq
            await self._wake.wait()

    # ------------------------------------------------------------ commands
    async def _run_command(self, cmd_topic: str, payload: bytes, resp_topic: str | None,
                           corr: bytes | None) -> None:
        if self.on_command is None:
            return
        try:
            resp = await self.on_command(cmd_topic, payload)
        except Exception:
            log.exception("command_dispatch_failed", topic=cmd_topic)
            return
        client = self._client
        if resp is None or client is None or not self.connected.is_set():
            return
        data = compact(resp)
        try:
            if resp_topic and self.v5:
                props = Properties(PacketTypes.PUBLISH)
                if corr is not None:
                    props.CorrelationData = corr
                client.publish(resp_topic, data, qos=1, properties=props)
                return
            rid = resp.get("request_id")
            if isinstance(rid, str) and not set(rid) & {"+", "#", "\0"}:
                client.publish(topic(self.site_id, f"resp/{rid}"), data, qos=1)
        except ValueError as e:  # a response topic that is not a valid topic name
            log.warning("command_response_unpublishable", error=str(e))

    # ------------------------------------------------------------ retained state
    def publish_state(self, subtopic: str, payload: Any, *, force: bool = False) -> None:
        """Retained `health`, `alarms`, `clusters/{id}/state`: on change, coalesced per topic."""
        data = compact(payload)
        self._states[subtopic] = data
        if force:
            self._forced.add(subtopic)
        elif self._published.get(subtopic) == data:
            return
        if not self.connected.is_set() or subtopic in self._state_timers:
            return  # published at (re)connect, or by the pending timer with the newest payload
        wait = self._last_pub.get(subtopic, -1e18) + self.state_min_interval_s - time.monotonic()
        if wait <= 0:
            self._publish_state_now(subtopic)
        else:
            self._state_timers[subtopic] = asyncio.get_running_loop().call_later(
                wait, self._state_timer, subtopic)

    def _state_timer(self, subtopic: str) -> None:
        self._state_timers.pop(subtopic, None)
        if subtopic in self._forced or self._published.get(subtopic) != self._states.get(subtopic):
            self._publish_state_now(subtopic)

    def _publish_state_now(self, subtopic: str) -> None:
        client = self._client
        data = self._states.get(subtopic)
        if client is None or data is None:
            return
        client.publish(topic(self.site_id, subtopic), data, qos=1, retain=True)
        self._published[subtopic] = data
        self._last_pub[subtopic] = time.monotonic()
        self._forced.discard(subtopic)

    def clear_state(self, subtopic: str) -> None:
        """Delete a retained state (e.g. a cluster removed from the site file)."""
        self._states.pop(subtopic, None)
        self._published.pop(subtopic, None)
        if self._client is not None and self.connected.is_set():
            self._client.publish(topic(self.site_id, subtopic), b"", qos=1, retain=True)

    def rebirth(self) -> dict:
        """Republish status, health, every cluster state and alarms (the `rebirth` command)."""
        client = self._client
        if client is not None and self.connected.is_set():
            client.publish(topic(self.site_id, "status"), self._status("online"), qos=1,
                           retain=True)
            for sub in list(self._states):
                self._publish_state_now(sub)
        return {"session": self.session, "topics": len(self._states) + 1}

    def snapshot(self) -> dict:
        """health + cluster states + alarms as last published (for `status.get`)."""
        def load(sub: str) -> Any:
            d = self._states.get(sub)
            return json.loads(d) if d else None
        clusters = [load(s) for s in sorted(self._states) if s.startswith("clusters/")]
        return {"health": load("health"), "clusters": clusters, "alarms": load("alarms") or []}

    def stats(self) -> dict:
        return {"connected": self.connected.is_set(), "session": self.session,
                "outbox_depth": self.outbox.depth, "inflight": len(self._inflight),
                "outbox_dropped": getattr(self.outbox, "dropped_total", 0),
                "last_error": self.last_error}


def _read_secret(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _close_quietly(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass

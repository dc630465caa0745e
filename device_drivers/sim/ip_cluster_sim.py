"""Simulated IP (4G) loudspeaker cluster, speaking its firmware profile's MQTT scheme.

It plays only what it could really fetch over HTTP and decode with soundfile, so a "reached"
in a test means the media server, the URL token and the audio file all worked.  Ground truth
(`on_change(cluster_id, playing, programme, volume)`) reports what the cluster itself
observes, never what the controller claims; `programme` is the broadcast id when the firmware's
play command carries one, else the media URL it is playing (Tasmota-style PLAY has no id).

Fault model (documented for scenario authors):
- kill(): dies abruptly (TCP dropped, no DISCONNECT) -> the broker publishes the LWT.
- link_cut(s): same, then reconnects healthy after s seconds (state kept, playback stopped).
- power_cut(s): mains_ok false, runs on battery, whose voltage falls linearly from
  `battery_full_v` to `battery_empty_v` over `battery_runtime_s`.  If mains returns first the
  unit just carries on; otherwise it dies when the battery is empty (LWT fires) and reboots
  (uptime 0, idle) when mains returns.
- sim_expire(): telemetry reports sim_status "expired" once, then the data link drops (LWT);
  it stays off until sim_renew().
- surge_trip(), amp_fault(), impedance_step(pct): telemetry changes; the unit keeps running
  (with a faulty amplifier it still decodes and "plays": the fault is in the telemetry).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt
import soundfile as sf
import structlog

from device_drivers.ip_cluster import parse_broker_url, spec_of
from device_drivers.ip_profile import encode_field, match, render, set_path

log = structlog.get_logger(__name__)

MAX_MEDIA_BYTES = 64 * 1024 * 1024
MAX_PROBE_BYTES = 1024 * 1024


def _decode(data: bytes, *, whole: bool) -> float:
    """Seconds of audio soundfile decodes from `data` (a prefix of a stream if not whole)."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        frames = f.read(dtype="int16") if whole else f.read(4096, dtype="int16")
        return len(frames) / f.samplerate


def fetch_and_decode(url: str, timeout: float = 10.0) -> tuple[float | None, Any]:
    """Blocking: fetch `url` and decode it.  A file (Content-Length known) is read whole and
    its duration returned with no response; a live stream (chunked) is probed until its first
    audio decodes, and returned as (None, open response) for the caller to drain.
    Raises RuntimeError with a short, device-like error text."""
    try:
        r = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"http {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RuntimeError(f"fetch failed: {getattr(e, 'reason', e)}") from None
    try:
        if r.headers.get("Content-Length") is not None:
            data = r.read(MAX_MEDIA_BYTES + 1)
            r.close()
            if len(data) > MAX_MEDIA_BYTES:
                raise RuntimeError("media too large")
            return _checked(data, whole=True), None
        buf, deadline = bytearray(), time.monotonic() + timeout
        while True:
            chunk = r.read1(16384)
            if not chunk:                      # the "stream" ended: it was a short file
                r.close()
                return _checked(bytes(buf), whole=True), None
            buf += chunk
            try:
                if _decode(bytes(buf), whole=False) > 0:
                    return None, r
            except Exception:
                pass
            if len(buf) > MAX_PROBE_BYTES or time.monotonic() > deadline:
                raise RuntimeError("undecodable audio stream")
    except (OSError, ValueError) as e:
        r.close()
        raise RuntimeError(f"fetch failed: {e}") from None
    except RuntimeError:
        r.close()
        raise


def _checked(data: bytes, *, whole: bool) -> float:
    try:
        seconds = _decode(data, whole=whole)
    except Exception as e:
        raise RuntimeError(f"undecodable audio: {str(e).splitlines()[0][:80]}") from None
    if seconds <= 0:
        raise RuntimeError("no audio in media")
    return seconds


def drain(resp, stop: threading.Event) -> None:
    """Blocking: consume a live stream until it ends, stalls past the timeout, or `stop`."""
    try:
        while not stop.is_set() and resp.read1(16384):
            pass
    except (OSError, ValueError):
        pass
    finally:
        resp.close()


class IpClusterSim:
    """One simulated cluster; all of its state lives on the asyncio loop."""

    def __init__(self, cluster_id: str, device_id: str, profile: Any, broker_url: str,
                 on_change=None, *, telemetry_interval: float = 5.0,
                 battery_runtime_s: float = 30.0, battery_full_v: float = 12.8,
                 battery_empty_v: float = 11.0, sim_expires_on: dt.date | None = None):
        self.cluster_id, self.device_id = cluster_id, device_id
        self.spec = spec_of(profile)
        self.broker_url = broker_url
        self.on_change = on_change
        self.telemetry_interval = telemetry_interval
        self.battery_runtime_s = battery_runtime_s
        self.battery_full_v, self.battery_empty_v = battery_full_v, battery_empty_v
        self.state: dict[str, Any] = {
            "playing": False, "playing_url": None, "playing_id": None, "volume": 70,
            "rssi_dbm": -71, "amplifier_ok": True, "line_impedance_ohm": 8.0,
            "surge_protector_ok": True, "mains_ok": True, "battery_v": battery_full_v,
            "sim_status": "ok", "sim_expires_on": sim_expires_on or dt.date(2030, 12, 31),
            "balance_vnd": 50000, "uptime_s": 0,
        }
        self.alive = False
        self.commands_seen = 0
        self.errors: list[str] = []       # play refusals, newest last (for tests and demo)
        self._t = lambda tpl: self.spec.topic(tpl, device_id)
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping: list[asyncio.Task] = []   # paho threads of dropped connections
        self._tele_task: asyncio.Task | None = None
        self._play_task: asyncio.Task | None = None   # the running playback's end timer
        self._gen = 0                                  # bumped by each play/stop/death
        self._boot = time.monotonic()
        self._battery_started: float | None = None
        self.connected = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._boot = time.monotonic()
        self.alive = True
        self._connect()
        self._tele_task = asyncio.create_task(self._telemetry_loop())

    def _connect(self) -> None:
        host, port, tls = parse_broker_url(self.broker_url)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=f"sim-{self.cluster_id}-{time.monotonic_ns() % 10**9}",
                        protocol=mqtt.MQTTv311)
        lv = self.spec.liveness
        c.will_set(self._t(lv.topic), lv.offline, qos=lv.qos, retain=lv.retain)
        if tls:
            c.tls_set()
        c.reconnect_delay_set(1, 5)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self._loop.call_soon_threadsafe(self.connected.clear)
        c.on_message = lambda cl, ud, msg: self._loop.call_soon_threadsafe(
            self._on_command, msg.topic, bytes(msg.payload))
        self._client = c
        c.connect_async(host, port, keepalive=10)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        lv = self.spec.liveness
        client.publish(self._t(lv.topic), lv.online, qos=lv.qos, retain=lv.retain)
        client.subscribe([(self._t(c.topic), 1) for c in self.spec.commands.values()])
        self._loop.call_soon_threadsafe(self._connected)

    def _connected(self) -> None:
        self.connected.set()
        self.publish_telemetry()

    async def stop(self) -> None:
        """Clean shutdown (publishes offline, as a firmware's orderly reboot would)."""
        self.alive = False
        self._cancel_tasks()
        c, self._client = self._client, None
        if c is not None:
            lv = self.spec.liveness
            c.publish(self._t(lv.topic), lv.offline, qos=lv.qos, retain=lv.retain)
            c.disconnect()
            await asyncio.to_thread(c.loop_stop)
        if self._stopping:
            await asyncio.gather(*self._stopping)
            self._stopping.clear()

    def _cancel_tasks(self) -> None:
        for t in [self._tele_task, self._play_task, *self._tasks]:
            if t and not t.done() and t is not asyncio.current_task():
                t.cancel()

    async def _die(self) -> None:
        """Drop the TCP connection without DISCONNECT so the broker fires the will."""
        self.alive = False
        self._gen += 1
        self.connected.clear()
        if self._play_task and not self._play_task.done():
            self._play_task.cancel()
        if self.state["playing"]:
            self._set_playing(False)
        c, self._client = self._client, None
        if c is None:
            return
        sock = c.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)   # broker sees EOF without DISCONNECT
        # paho's thread notices the dead socket; stopping it may take a second: not awaited
        self._stopping.append(asyncio.create_task(asyncio.to_thread(c.loop_stop)))

    def _revive(self, *, reboot: bool) -> None:
        if reboot:
            self._boot = time.monotonic()
        self.alive = True
        self._connect()

    def _later(self, delay: float, coro_fn) -> None:
        async def run():
            await asyncio.sleep(delay)
            await coro_fn()
        self._spawn(run())

    def _spawn(self, aw) -> None:
        t = asyncio.ensure_future(aw)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- commands ---------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes) -> None:
        if not self.alive:
            return
        self.commands_seen += 1
        for name, cmd in self.spec.commands.items():
            if self._t(cmd.topic) != topic:
                continue
            got = match(cmd.payload, payload)
            if got is None:
                continue
            if name == "play":
                self._gen += 1   # the latest command wins; current playback goes on meanwhile
                self._spawn(self._play(got, self._gen))
            elif name == "stop":
                self._gen += 1
                if self._play_task and not self._play_task.done():
                    self._play_task.cancel()
                if self.state["playing"]:
                    self._set_playing(False)
                self._reply("stop", "ok", {})
            else:
                v = got.get("volume")
                if not isinstance(v, int) or not 0 <= v <= 100:
                    self._reply("volume", "error", {"error": f"bad volume {v!r}"})
                else:
                    self.state["volume"] = v
                    self._notify()
                    self._reply("volume", "ok", {"volume": v})
            return
        log.info("ip_sim.unknown_command", cluster=self.cluster_id, topic=topic,
                 payload=payload[:60])

    async def _play(self, got: dict[str, Any], gen: int) -> None:
        url, bid = got["url"], got.get("id")
        values = {"url": url, "id": bid}
        try:
            duration, stream = await asyncio.to_thread(fetch_and_decode, url)
        except RuntimeError as e:
            self.errors.append(str(e))
            self._reply("play", "error", values | {"error": str(e)})
            return
        if not self.alive or gen != self._gen:
            if stream is not None:
                stream.close()
            if self.alive:
                self._reply("play", "error", values | {"error": "superseded by a later command"})
            return
        if isinstance(got.get("volume"), int) and 0 <= got["volume"] <= 100:
            self.state["volume"] = got["volume"]
        if self._play_task and not self._play_task.done():
            self._play_task.cancel()
        self.state.update(playing_url=url, playing_id=bid)
        self._set_playing(True)
        self._reply("play", "ok", values)
        self.publish_telemetry()
        self._play_task = asyncio.create_task(self._play_out(duration, stream))

    async def _play_out(self, duration: float | None, stream) -> None:
        """Plays until the file's duration has passed or the live stream ends."""
        stop = threading.Event()
        try:
            if stream is None:
                await asyncio.sleep(duration)
            else:
                await asyncio.to_thread(drain, stream, stop)
        finally:
            stop.set()
        self._set_playing(False)
        self.publish_telemetry()

    def _reply(self, command: str, outcome: str, values: dict[str, Any]) -> None:
        tpl = self.spec.commands[command].replies.get(outcome)
        if tpl is None or self._client is None or not self.alive:
            return
        values = values | {"device_id": self.device_id, "prefix": self.spec.prefix}
        self._client.publish(self._t(self.spec.ack_topic), render(tpl, values), qos=1)

    def _set_playing(self, playing: bool) -> None:
        self.state["playing"] = playing
        if not playing:
            self.state.update(playing_url=None, playing_id=None)
        self._notify()

    def _notify(self) -> None:
        if self.on_change is None:
            return
        programme = self.state["playing_id"] or self.state["playing_url"]
        r = self.on_change(self.cluster_id, self.state["playing"], programme, self.state["volume"])
        if inspect.isawaitable(r):
            self._spawn(r)

    # ---- telemetry --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Normalised ground-truth telemetry as this unit would report it now."""
        s = dict(self.state)
        s["uptime_s"] = int(time.monotonic() - self._boot)
        if self._battery_started is not None:
            frac = min(1.0, (time.monotonic() - self._battery_started) / self.battery_runtime_s)
            s["battery_v"] = round(self.battery_full_v - frac *
                                   (self.battery_full_v - self.battery_empty_v), 3)
        return s

    def publish_telemetry(self) -> None:
        if self._client is None or not self.alive:
            return
        snap = self.snapshot()
        for ts in self.spec.telemetry:
            obj: dict[str, Any] = {}
            for name, fm in ts.fields.items():
                if snap.get(name) is not None:
                    set_path(obj, fm.path, encode_field(fm, snap[name]))
            payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
            self._client.publish(self._t(ts.topic), payload, qos=ts.qos, retain=ts.retain)

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Test hook: put arbitrary bytes on the wire as this device (e.g. garbage telemetry)."""
        if self._client is not None:
            self._client.publish(topic, payload, qos=1)

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.telemetry_interval)
            self.publish_telemetry()

    # ---- fault injection --------------------------------------------------------------
    async def kill(self) -> None:
        await self._die()

    async def link_cut(self, seconds: float) -> None:
        await self._die()

        async def back():
            self._revive(reboot=False)
        self._later(seconds, back)

    async def power_cut(self, seconds: float) -> None:
        self.state["mains_ok"] = False
        self._battery_started = time.monotonic()
        self.publish_telemetry()

        async def mains_back():
            self.state["mains_ok"] = True
            self._battery_started = None
            self.state["battery_v"] = self.battery_full_v
            if self.alive:
                self.publish_telemetry()
            else:
                self._revive(reboot=True)

        async def battery_flat():
            if not self.state["mains_ok"]:
                await self._die()
        if seconds > self.battery_runtime_s:
            self._later(self.battery_runtime_s, battery_flat)
        self._later(seconds, mains_back)

    async def sim_expire(self, grace_s: float = 0.5) -> None:
        self.state.update(sim_status="expired", balance_vnd=0)
        self.publish_telemetry()
        self._later(grace_s, self._die)

    async def sim_renew(self) -> None:
        self.state["sim_status"] = "ok"
        if not self.alive:
            self._revive(reboot=False)

    def surge_trip(self) -> None:
        self.state["surge_protector_ok"] = False
        self.publish_telemetry()

    def amp_fault(self) -> None:
        self.state["amplifier_ok"] = False
        self.publish_telemetry()

    def impedance_step(self, percent: float) -> None:
        self.state["line_impedance_ohm"] = round(
            self.state["line_impedance_ohm"] * (1 + percent / 100), 3)
        self.publish_telemetry()

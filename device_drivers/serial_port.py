"""Async serial transport: pyserial at the edge, frames and events on the asyncio loop.

pyserial blocks, so one reader thread owns the port: it opens it, reads, and hands bytes
to the loop with ``call_soon_threadsafe``; all framing, matching and callbacks run on the
loop.  A USB-serial adapter that is unplugged makes reads fail (EIO, or "readiness to
read but returned no data") and its device file vanish; the thread then closes the
port, reports ``port_lost`` and retries opening with exponential backoff until the file
is back (``port_restored``).  Requests are serialised by one lock, with the device's
minimum gap between commands, a per-command timeout and retries.

Events (``on_event(kind, details)``): ``port_lost``, ``port_restored``, ``garbage`` (once
per burst of dropped input; a burst ends with the next good frame).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import serial
import structlog

from device_drivers.framing import drops

log = structlog.get_logger(__name__)

EventCb = Callable[[str, dict[str, Any]], None]


class Decoder(Protocol):
    stats: dict[str, int]

    def feed(self, data: bytes) -> list[Any]: ...


class PortUnavailable(ConnectionError):
    """The port is not open (unplugged, or not there yet): nothing was sent."""


class NoReply(TimeoutError):
    """No matching reply after every retry."""


class SerialTransport:
    def __init__(self, url: str, decoder: Decoder, *, baud: int = 9600, parity: str = "N",
                 bytesize: int = 8, stopbits: float = 1, on_frame: Callable[[Any], None] | None = None,
                 on_event: EventCb | None = None, min_gap_s: float = 0.0,
                 backoff_min_s: float = 0.1, backoff_max_s: float = 5.0, name: str = "serial"):
        self.url = url
        self.decoder = decoder
        self.settings = {"baudrate": baud, "parity": parity, "bytesize": bytesize,
                         "stopbits": stopbits}
        self.on_frame = on_frame
        self.on_event = on_event
        self.min_gap_s = min_gap_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.name = name
        self.connected = False
        self.counters = {"bytes_in": 0, "bytes_out": 0, "port_lost": 0, "garbage_bursts": 0,
                         "unexpected_frames": 0}
        self._ser: serial.SerialBase | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = asyncio.Lock()
        self._last_tx_end = 0.0
        self._waiter: tuple[Callable[[Any], bool], asyncio.Future] | None = None
        self._ever_open = False
        self._lost_reported = False
        self._burst_base: dict[str, int] | None = None
        self._opened = asyncio.Event()

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-reader", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 3.0)
            self._thread = None
        self._close_port()

    async def wait_open(self, timeout: float) -> bool:
        """True once the port is open (start() does not wait: a missing port is not fatal)."""
        try:
            await asyncio.wait_for(self._opened.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ---- reader thread --------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.backoff_min_s
        while not self._stop.is_set():
            try:
                ser = serial.serial_for_url(self.url, timeout=0.1, write_timeout=1.0,
                                            **self.settings)
            except (serial.SerialException, OSError, ValueError) as e:
                self._post(self._on_open_failed, str(e))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            backoff = self.backoff_min_s
            self._ser = ser
            self._post(self._on_opened)
            try:
                while not self._stop.is_set():
                    data = ser.read(max(1, ser.in_waiting))
                    if data:
                        self._post(self._on_bytes, data)
            except Exception as e:  # pyserial raises SerialException, OSError, TypeError...
                if not self._stop.is_set():
                    self._post(self._on_read_error, str(e) or type(e).__name__)
            finally:
                self._ser = None
                with contextlib.suppress(Exception):
                    ser.close()
            self._stop.wait(backoff)

    def _post(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            loop.call_soon_threadsafe(fn, *args)

    def _close_port(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            with contextlib.suppress(Exception):
                ser.close()

    # ---- loop side -------------------------------------------------------------------
    def _emit(self, kind: str, **details: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, {"port": self.url, **details})
            except Exception:
                log.exception("serial_event_callback_failed", kind=kind)

    def _on_opened(self) -> None:
        self.connected = True
        self._opened.set()
        if self._lost_reported:
            self._lost_reported = False
            log.info("serial_port_restored", port=self.url)
            self._emit("port_restored")
        else:
            log.info("serial_port_open", port=self.url)
        self._ever_open = True

    def _on_open_failed(self, error: str) -> None:
        if not self._lost_reported:
            self._lost_reported = True
            self.counters["port_lost"] += 1
            log.warning("serial_port_unavailable", port=self.url, error=error)
            self._emit("port_lost", error=error, opened_before=self._ever_open)

    def _on_read_error(self, error: str) -> None:
        self.connected = False
        self._opened.clear()
        self._fail_waiter(PortUnavailable(f"{self.url}: {error}"))
        if not self._lost_reported:
            self._lost_reported = True
            self.counters["port_lost"] += 1
            log.warning("serial_port_lost", port=self.url, error=error)
            self._emit("port_lost", error=error, opened_before=True)

    def _on_bytes(self, data: bytes) -> None:
        self.counters["bytes_in"] += len(data)
        before = drops(self.decoder.stats) + self.decoder.stats.get("garbage_bytes", 0)
        try:
            frames = self.decoder.feed(data)
        except Exception:  # a decoder must not raise; if one does, the bytes are garbage
            log.exception("serial_decoder_failed", port=self.url)
            frames = []
        after = drops(self.decoder.stats) + self.decoder.stats.get("garbage_bytes", 0)
        if after > before:
            self._garbage()
        for f in frames:
            self._deliver(f)
        if frames and after == before:
            self._end_burst()

    def _garbage(self) -> None:
        if self._burst_base is None:
            self._burst_base = dict(self.decoder.stats)
            self.counters["garbage_bursts"] += 1
            log.warning("serial_garbage", port=self.url, stats=dict(self.decoder.stats))
            self._emit("garbage", stats=dict(self.decoder.stats))

    def _end_burst(self) -> None:
        if self._burst_base is not None:
            base, self._burst_base = self._burst_base, None
            diff = {k: v - base.get(k, 0) for k, v in self.decoder.stats.items()
                    if k != "frames" and v != base.get(k, 0)}
            log.info("serial_garbage_burst_end", port=self.url, dropped=diff)

    def _deliver(self, frame: Any) -> None:
        w = self._waiter
        if w is not None and not w[1].done():
            try:
                ok = w[0](frame)
            except Exception:
                ok = False
            if ok:
                w[1].set_result(frame)
                return
        if self.on_frame is not None:
            try:
                self.on_frame(frame)
            except Exception:
                log.exception("serial_frame_callback_failed", port=self.url)
        else:
            self.counters["unexpected_frames"] += 1
            log.debug("serial_unexpected_frame", port=self.url, frame=repr(frame)[:80])

    def _fail_waiter(self, exc: Exception) -> None:
        w = self._waiter
        if w is not None and not w[1].done():
            w[1].set_exception(exc)

    # ---- writing ---------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Send raw bytes; PortUnavailable if the port is not open."""
        ser = self._ser
        if ser is None or not self.connected:
            raise PortUnavailable(f"{self.url} is not open")
        try:
            if len(data) <= 64:
                ser.write(data)  # a short write to a tty does not block
            else:
                await asyncio.get_running_loop().run_in_executor(None, ser.write, data)
        except Exception as e:
            raise PortUnavailable(f"{self.url}: write failed: {e}") from e
        self.counters["bytes_out"] += len(data)

    async def transact(self, data: bytes | None, match: Callable[[Any], bool] | None, *,
                       timeout: float = 1.0, retries: int = 0) -> Any:
        """Send `data` (None = just listen) and wait for the first frame `match` accepts.

        Frames that do not match go to `on_frame` (unsolicited output, stray replies).
        With `match` None nothing is awaited (fire and forget, still gap-spaced).
        Raises NoReply after 1 + retries attempts, PortUnavailable if the port is gone.
        """
        async with self._lock:
            try:
                for attempt in range(retries + 1):
                    gap = self._last_tx_end + self.min_gap_s - time.monotonic()
                    if gap > 0:
                        await asyncio.sleep(gap)
                    if match is None:
                        await self.write(data or b"")
                        return None
                    fut: asyncio.Future = asyncio.get_running_loop().create_future()
                    self._waiter = (match, fut)
                    if data:
                        await self.write(data)
                    try:
                        return await asyncio.wait_for(fut, timeout)
                    except TimeoutError:
                        log.debug("serial_no_reply", port=self.url, attempt=attempt + 1,
                                  request=bytes(data or b"")[:40])
                    finally:
                        self._waiter = None
                        self._last_tx_end = time.monotonic()
                raise NoReply(f"{self.url}: no reply to {bytes(data or b'')[:40]!r} after "
                              f"{retries + 1} attempt(s) of {timeout:g} s")
            finally:
                self._last_tx_end = time.monotonic()


class SerialDevice:
    """What the profile-driven serial drivers share: the transport built from the profile's
    transport and timeouts, start/stop, and an event callback that can never break them."""

    device_name = "device"
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    def _open(self, port_url: str, profile: Any, decoder: Decoder, baud: int | None, *,
              on_frame: Callable[[Any], None] | None = None,
              on_port_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        t, to = profile.transport, profile.timeouts
        self.transport = SerialTransport(
            port_url, decoder, baud=baud or t.baud, parity=t.parity, bytesize=t.bytesize,
            stopbits=t.stopbits, on_frame=on_frame, on_event=on_port_event or self._emit,
            min_gap_s=to.min_gap_ms / 1000, backoff_max_s=to.reconnect_max_s,
            name=self.device_name)

    async def start(self) -> None:
        await self.transport.start()

    async def stop(self) -> None:
        await self.transport.stop()

    def _emit(self, kind: str, details: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, details)
            except Exception:
                log.exception("device_event_callback_failed", device=self.device_name, kind=kind)

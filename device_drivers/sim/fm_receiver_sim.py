"""Simulated FM receiver clusters, switched only by what they actually hear.

Ground truth for tests and `loaxa simulate`: a receiver plays because it decoded its code
from the captured air audio (DTMF) or from the RDS data the transmitter simulator decoded
out of the UECP frames, and then heard programme audio — never because the daemon said so.

One `FmAirMonitor` tails the growing raw S16_LE capture file, runs ONE DtmfDecoder and an
energy meter over it and fans the results out to every `FmReceiverSim`.  The capture sink
is unpaced, so timing between keys and audio comes from sample positions; only the
carrier (a wall-clock fact polled from the transmitter simulator) uses the clock.

Receiver state: asleep (no carrier, if the model sleeps) -> awake (carrier up for the
wake delay) -> enabled (its page/group/all-call code decoded) -> playing (programme
energy above the profile threshold while enabled).  Off/group-off/all-off codes disable;
the carrier dropping mutes at once and disables after `sleep_after_carrier_drop_s`.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import structlog

from device_drivers.dtmf import DtmfDecoder
from device_drivers.fm_profile import FmReceiverSpec
from device_drivers.fm_signalling import parse_rds_payload

log = structlog.get_logger(__name__)

OnChange = Callable[[str, bool, "int | None"], None]
BLOCK_MS = 20
PLAY_AFTER_MS = 100     # programme audio needed before the horn counts as playing
_code_tables: dict[int, dict[str, tuple[str, str | None]]] = {}


def _code_table(spec: FmReceiverSpec) -> dict[str, tuple[str, str | None]]:
    """Every code the profile can produce -> (command, value); shared by receivers of a profile."""
    key = id(spec)
    if key not in _code_tables:
        c = spec.codes
        table: dict[str, tuple[str, str | None]] = {}
        for v in _digits(spec.address_digits):
            table[c.render("page", v)] = ("page", v)
            table[c.render("page_off", v)] = ("page_off", v)
        for g in _digits(spec.group_digits):
            table[c.render("group", g)] = ("group", g)
            table[c.render("group_off", g)] = ("group_off", g)
        if c.volume is not None:
            for lv in range(spec.volume_levels):
                table[c.render("volume", lv)] = ("volume", str(lv))
        table[c.all_call] = ("all_call", None)
        table[c.all_off] = ("all_off", None)
        _code_tables[key] = table
    return _code_tables[key]


def _digits(n: int) -> Iterable[str]:
    return (str(i).zfill(n) for i in range(10 ** n))


class FmReceiverSim:
    def __init__(self, cluster_id: str, address: str, groups: Iterable[str], spec: FmReceiverSpec,
                 *, rate: int = 48000, on_change: OnChange | None = None, silence_s: float = 2.0) -> None:
        self.cluster_id = cluster_id
        self.address = address
        self.groups = frozenset(groups)
        self.spec = spec
        self.rate = rate
        self.on_change = on_change
        self.silence_samples = int(silence_s * rate)
        self._table = _code_table(spec)
        self._maxlen = max(len(k) for k in self._table)
        self._keys = ""
        self._last_key_pos = -(10 ** 12)
        self.carrier = False
        self._carrier_pos = 0
        self._carrier_wall = 0.0
        self._drop_wall: float | None = None
        self.enabled = False
        self.playing = False
        self.volume: int | None = None
        self._prog_samples = 0
        self._last_prog_pos = 0
        self.log: list[str] = []  # decoded codes acted upon, for tests and debugging

    # ----- state -----------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.playing:
            return "playing"
        if self.enabled:
            return "enabled"
        return "awake" if (self.carrier or not self.spec.wake_on_carrier) else "asleep"

    def _ready(self, pos: int, now: float) -> bool:
        if not self.spec.wake_on_carrier:
            return True
        if not self.carrier:
            return False
        delay = self.spec.wake_delay_ms / 1000
        return pos - self._carrier_pos >= delay * self.rate or now - self._carrier_wall >= delay

    def _set(self, *, enabled: bool | None = None, playing: bool | None = None,
             volume: int | None = None) -> None:
        before = (self.playing, self.volume)
        if enabled is not None:
            self.enabled = enabled
            if not enabled:
                playing = False
        if playing is not None:
            self.playing = playing
            if not playing:
                self._prog_samples = 0
        if volume is not None:
            self.volume = volume
        if (self.playing, self.volume) != before and self.on_change is not None:
            try:
                self.on_change(self.cluster_id, self.playing, self.volume)
            except Exception:
                log.exception("fm_sim_on_change_failed", cluster=self.cluster_id)

    # ----- inputs ----------------------------------------------------------------------
    def set_carrier(self, on: bool, pos: int, now: float) -> None:
        if on == self.carrier:
            return
        self.carrier = on
        if on:
            self._carrier_pos, self._carrier_wall, self._drop_wall = pos, now, None
        else:
            self._drop_wall = now
            self._keys = ""
            self._set(playing=False)

    def tick(self, now: float) -> None:
        if (not self.carrier and self._drop_wall is not None and self.enabled
                and now - self._drop_wall >= self.spec.sleep_after_carrier_drop_s):
            self._set(enabled=False)

    def key(self, digit: str, pos: int, now: float) -> None:
        if self.spec.signalling != "dtmf" or not self._ready(pos, now):
            return
        interdigit = self.spec.dtmf.interdigit_timeout_ms * self.rate / 1000
        if pos - self._last_key_pos > interdigit:
            self._keys = ""
        self._last_key_pos = pos
        self._keys = (self._keys + digit)[-self._maxlen:]
        for n in range(min(len(self._keys), self._maxlen), 0, -1):
            hit = self._table.get(self._keys[-n:])
            if hit is not None:
                self._keys = ""  # a whole code was heard (ours or not): start afresh
                self._apply(*hit)
                return

    def code(self, text: str, pos: int, now: float) -> None:
        """A whole code, as carried by RDS."""
        if self.spec.signalling != "rds" or not self._ready(pos, now):
            return
        hit = self._table.get(text)
        if hit is not None:
            self._apply(*hit)

    def _apply(self, cmd: str, value: str | None) -> None:
        mine = (cmd == "all_call" or cmd == "all_off" or cmd == "volume"
                or (cmd in ("page", "page_off") and value == self.address)
                or (cmd in ("group", "group_off") and value in self.groups))
        if not mine:
            return
        self.log.append(f"{cmd} {value}" if value is not None else cmd)
        if cmd in ("page", "group", "all_call"):
            self._set(enabled=True)
        elif cmd in ("page_off", "group_off", "all_off"):
            self._set(enabled=False)
        elif cmd == "volume" and self.enabled:
            self._set(volume=int(value))

    def audio(self, pos: int, n: int, level_dbfs: float, tone: bool) -> None:
        """One block of air audio: its level and whether DTMF tones were in it."""
        if not (self.enabled and self.carrier):
            return
        if tone:  # code tones are signalling, not programme
            if not self.playing:
                self._prog_samples = 0
            return
        if level_dbfs >= self.spec.play_threshold_dbfs:
            self._prog_samples += n
            self._last_prog_pos = pos + n
            if not self.playing and self._prog_samples >= PLAY_AFTER_MS * self.rate / 1000:
                self._set(playing=True)
        elif self.playing and pos + n - self._last_prog_pos >= self.silence_samples:
            self._set(playing=False)  # amplifier on, but dead air: nobody hears anything
        elif not self.playing and pos + n - self._last_prog_pos >= PLAY_AFTER_MS * self.rate / 1000:
            self._prog_samples = 0


class FmAirMonitor:
    """Tails the capture file (raw S16_LE mono) and feeds every receiver sim.

    `poll()` processes whatever has been written so far (synchronous; tests may call it);
    `start()`/`stop()` run it in a thread.  `rds_data(payload)` is the entry point for
    TDC payloads the transmitter simulator decoded from UECP.  Thread-safe.
    """

    def __init__(self, path: str | os.PathLike, receivers: Iterable[FmReceiverSim], *, rate: int = 48000,
                 carrier_on: Callable[[], bool] | None = None, on_change: OnChange | None = None,
                 poll_s: float = 0.02, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.receivers = list(receivers)
        self.rate = rate
        self.carrier_on = carrier_on or (lambda: True)
        self.poll_s = poll_s
        self.clock = clock
        if on_change is not None:
            for r in self.receivers:
                r.on_change = on_change
        dt = [r.spec.dtmf for r in self.receivers if r.spec.dtmf is not None and r.spec.signalling == "dtmf"]
        self._dtmf_args = {"min_tone_ms": min((d.tone_ms for d in dt), default=40),
                           "min_gap_ms": min((d.gap_ms for d in dt), default=40)}
        self._decoder = DtmfDecoder(rate, **self._dtmf_args)
        self._block = int(rate * BLOCK_MS / 1000)
        self._lock = threading.RLock()
        self._offset = 0          # bytes of the current file consumed
        self._base = 0            # sample position of the current file's start (file may restart)
        self._decoded = 0         # samples fed to the decoder, current file
        self._pending = np.zeros(0, dtype=np.float32)  # decoded but not yet energy-metered
        self._pending_pos = 0
        self._spans: deque[tuple[int, int]] = deque(maxlen=256)
        self._odd = b""
        self._ino: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.keys: list[tuple[str, int]] = []  # every key heard (absolute sample position)

    @property
    def position(self) -> int:
        return self._base + self._decoded

    def receiver(self, cluster_id: str) -> FmReceiverSim:
        return next(r for r in self.receivers if r.cluster_id == cluster_id)

    # ----- inputs ----------------------------------------------------------------------
    def rds_data(self, payload: bytes) -> None:
        with self._lock:
            now = self.clock()
            self._carrier(now)
            for r in self.receivers:
                text = parse_rds_payload(bytes(payload), r.spec)
                if text is not None:
                    r.code(text, self.position, now)

    def _carrier(self, now: float) -> None:
        try:
            on = bool(self.carrier_on())
        except Exception:
            log.exception("fm_sim_carrier_probe_failed")
            return
        for r in self.receivers:
            r.set_carrier(on, self.position, now)
            r.tick(now)

    def poll(self, max_bytes: int = 1 << 20) -> int:
        """Process newly written audio; returns the number of samples processed."""
        with self._lock:
            now = self.clock()
            self._carrier(now)
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return 0
            size = st.st_size
            if size < self._offset or st.st_ino != self._ino:  # recreated (device reopened)
                if self._ino is not None:
                    self._restart()
                self._ino = st.st_ino
            if size <= self._offset:
                return 0
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(min(size - self._offset, max_bytes))
            self._offset += len(data)
            data = self._odd + data
            cut = len(data) - len(data) % 2
            self._odd = data[cut:]
            x = np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) / 32768.0
            self._process(x, now)
            return len(x)

    def _restart(self) -> None:
        self._base += self._decoded
        self._offset = self._decoded = 0
        self._odd = b""
        self._decoder = DtmfDecoder(self.rate, **self._dtmf_args)
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_pos = self._base
        self._spans.clear()

    def _process(self, x: np.ndarray, now: float) -> None:
        events: list[tuple[int, int, object]] = []
        for digit, p in self._decoder.feed_timed(x):
            events.append((self._base + p, 0, digit))
            self.keys.append((digit, self._base + p))
        self._spans.extend((self._base + a, self._base + b) for a, b in self._decoder.tone_spans)
        self._decoded += len(x)
        # meter only what the decoder has classified (its windows lag the input)
        self._pending = np.concatenate((self._pending, x))
        classified = self._base + self._decoder.position
        margin = self._decoder.win // 2  # tone ramps spill past the windows that caught them
        n_blocks = max(0, (classified - self._pending_pos) // self._block)
        n_blocks = min(n_blocks, len(self._pending) // self._block)
        for i in range(n_blocks):
            blk = self._pending[i * self._block:(i + 1) * self._block]
            start = self._pending_pos + i * self._block
            rms = float(np.sqrt(np.mean(blk.astype(np.float64) ** 2)))
            level = 20 * np.log10(rms) if rms > 1e-9 else -180.0
            tone = any(a - margin < start + self._block and start < b + margin for a, b in self._spans)
            events.append((start, 1, (len(blk), level, tone)))
        self._pending = self._pending[n_blocks * self._block:]
        self._pending_pos += n_blocks * self._block
        for pos, kind, ev in sorted(events, key=lambda e: (e[0], e[1])):
            for r in self.receivers:
                if kind == 0:
                    r.key(ev, pos, now)
                else:
                    n, level, tone = ev
                    r.audio(pos, n, level, tone)

    # ----- thread ----------------------------------------------------------------------
    def start(self) -> FmAirMonitor:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fm-air-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.poll() > 0 and not self._stop.is_set():
                    pass
            except Exception:
                log.exception("fm_air_monitor_poll_failed")
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self.poll()

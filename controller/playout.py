"""Audio playout: one writer thread feeding a PortAudio output stream, paced by the clock.

Why a thread with blocking writes and its own pacing: a real sound card paces blocking
writes by itself, but the ALSA file/null sink used in tests (and some USB devices that
buffer deeply) does not, and a schedule needs a stable notion of "on air now". So the
writer keeps at most `lead_s` of audio ahead of time.monotonic(), re-anchoring to the
device when the device is the one blocking (no drift over hours of relay).

The asyncio loop owns all state; it hands a job to the thread and gets results back with
`loop.call_soon_threadsafe`. The thread's hot path slices numpy arrays into preallocated
buffers, never logs per block and takes no lock the loop holds.
sounddevice is imported lazily so the daemon starts (and reports
`gateway.audio_device_missing`) on a machine with no PortAudio device at all.
"""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass

import numpy as np
import structlog

log = structlog.get_logger(__name__)
# Blocking waits in the playout thread. Not time.sleep: under libfaketime (the simulator's
# clock jumps) Python's time.sleep fails with EINVAL; an Event that is never set waits alike.
_pause = threading.Event().wait

FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
IDLE_POLICIES = ("close", "silence")


class AudioDeviceMissing(Exception):
    """No usable output device (PortAudio missing, device absent or unopenable)."""


@dataclass
class PlayResult:
    outcome: str  # finished | stopped | failed
    reason: str | None
    broadcast_id: str | None
    started_at: float | None  # monotonic time the first sample went on air (None: never)
    frames: int  # programme frames written (excluding idle silence)
    duration_s: float


def _sd():
    try:
        import sounddevice
    except OSError as e:  # libportaudio2 missing
        raise AudioDeviceMissing(f"PortAudio library not available: {e}") from e
    return sounddevice


def list_devices() -> list[dict]:
    """Output-capable devices as PortAudio sees them (the list is fixed at PortAudio init)."""
    try:
        sd = _sd()
        devs = sd.query_devices()
        apis = sd.query_hostapis()
    except AudioDeviceMissing:
        return []
    out = []
    for d in devs:
        if d["max_output_channels"] > 0:
            out.append(
                {
                    "index": d["index"],
                    "name": d["name"],
                    "hostapi": apis[d["hostapi"]]["name"],
                    "channels": d["max_output_channels"],
                    "default_samplerate": d["default_samplerate"],
                }
            )
    return out


def device_present(name: str | int | None = None) -> bool:
    """True if `name` (index, name substring, or None for the default) is an output device."""
    try:
        sd = _sd()
        sd.query_devices(name, "output")
        return True
    except (AudioDeviceMissing, ValueError):
        return False
    except Exception:  # PortAudioError and friends
        return False


class _Job:
    def __init__(self, loop, source, broadcast_id, on_started, on_level):
        self.loop = loop
        self.array: np.ndarray | None = source if isinstance(source, np.ndarray) else None
        self.queue: collections.deque | None = None if self.array is not None else collections.deque()
        self.src_done = self.array is not None
        self.src_error: str | None = None
        self.stop_req = 0  # 0 play, 1 stop with fade, 2 preempt (very short fade)
        self.broadcast_id = broadcast_id
        self.on_started = on_started
        self.on_level = on_level
        self.future: asyncio.Future = loop.create_future()
        self.started_at: float | None = None
        self.frames = 0
        self.progress = time.monotonic()


class Player:
    """Plays arrays or async iterators of float32 mono blocks at the device rate."""

    def __init__(
        self,
        device: str | int | None = None,
        rate: int = 48000,
        blocksize: int | None = None,
        *,
        lead_s: float = 0.1,
        latency: float | str = 0.1,
        idle_policy: str = "close",
        idle_close_s: float = 1.0,
        level_interval_s: float = 0.2,
        fade_s: float = 0.05,
        preempt_fade_s: float = 0.005,
        stall_timeout_s: float = 2.0,
        queue_blocks: int = 64,
        prefill_s: float = 0.1,
    ) -> None:
        if idle_policy not in IDLE_POLICIES:
            raise ValueError(f"idle_policy must be one of {IDLE_POLICIES} (got {idle_policy!r})")
        self.device = device
        self.rate = int(rate)
        self.blocksize = int(blocksize or self.rate // 50)  # 20 ms
        self.lead_s = float(lead_s)
        self.latency = latency
        self.idle_policy = idle_policy
        self.idle_close_s = idle_close_s
        self.stall_timeout_s = stall_timeout_s
        self.queue_blocks = queue_blocks
        self.prefill_frames = int(prefill_s * self.rate)
        self.level_frames = max(1, int(level_interval_s * self.rate))
        n = max(1, int(fade_s * self.rate))
        self._fade = (0.5 * (1 + np.cos(np.pi * np.arange(1, n + 1) / n))).astype(np.float32)
        n = max(1, int(preempt_fade_s * self.rate))
        self._pfade = (0.5 * (1 + np.cos(np.pi * np.arange(1, n + 1) / n))).astype(np.float32)
        self.level_dbfs: float = -math.inf  # last measured level of the programme on air
        self.underflows = 0
        self.device_error: str | None = None  # last device error seen (None when healthy)
        self._job: _Job | None = None
        self._wake = threading.Event()
        self._closing = False
        self._writer: _Writer | None = None
        self.wedged = False  # a writer was abandoned inside PortAudio (see _abandon_thread)

    # ---- loop-side API -------------------------------------------------------------
    @property
    def playing(self) -> bool:
        return self._job is not None

    def check_device(self) -> None:
        if not device_present(self.device):
            which = "default output" if self.device is None else repr(self.device)
            raise AudioDeviceMissing(f"audio device {which} not found")

    async def play(
        self,
        source: np.ndarray | AsyncIterable[np.ndarray],
        *,
        broadcast_id: str | None = None,
        on_started: Callable[[float], None] | None = None,
        on_level: Callable[[float], None] | None = None,
    ) -> PlayResult:
        """Play `source` to the end (or until stop/preempt/failure) and say how it ended.

        A job already playing is preempted first. Raises AudioDeviceMissing up front when
        there is no device; failures after that come back as outcome "failed".
        """
        self.check_device()
        loop = asyncio.get_running_loop()
        if isinstance(source, np.ndarray):
            source = _mono(source)
        elif not hasattr(source, "__aiter__"):
            raise TypeError("source must be a numpy array or an async iterable of blocks")
        prev = self._job
        if prev is not None:
            prev.stop_req = 2
            await asyncio.shield(prev.future)
        job = _Job(loop, source, broadcast_id, on_started, on_level)
        pump = None
        if job.queue is not None:
            pump = asyncio.create_task(self._pump(job, source))
        self._ensure_thread()
        self._job = job
        self._wake.set()
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    break
                if time.monotonic() - job.progress > self.stall_timeout_s:
                    self._abandon_thread(job, "audio device stalled (write blocked)")
        finally:
            if not job.future.done():  # we were cancelled: take the programme off air
                job.stop_req = 2
            if pump is not None and not pump.done():
                pump.cancel()
        res: PlayResult = job.future.result()
        return res

    def start(self) -> None:
        """Open the output now (with idle_policy "silence" it then carries silence)."""
        self.check_device()
        self._ensure_thread()
        self._wake.set()

    def stop(self) -> None:
        """Fade out (~50 ms) and end the current programme with outcome "stopped"."""
        if self._job is not None and self._job.stop_req == 0:
            self._job.stop_req = 1

    def preempt(self) -> None:
        """End the current programme at once (5 ms de-click ramp), outcome "stopped"."""
        if self._job is not None:
            self._job.stop_req = 2

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        w, self._writer = self._writer, None
        if w is not None:
            w.thread.join(timeout=2.0)

    # ---- loop-side internals -------------------------------------------------------
    async def _pump(self, job: _Job, source: AsyncIterable[np.ndarray]) -> None:
        block_s = self.blocksize / self.rate
        try:
            async for block in source:
                if job.stop_req or job.future.done():
                    break
                b = _mono(np.asarray(block))
                if len(b) == 0:
                    continue
                while len(job.queue) >= self.queue_blocks and not job.stop_req:
                    await asyncio.sleep(block_s)
                job.queue.append(b)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            job.src_error = f"source failed: {type(e).__name__}: {e}"
        finally:
            job.src_done = True
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass

    def _ensure_thread(self) -> None:
        if self._writer is None or not self._writer.thread.is_alive():
            self._closing = False
            self._writer = _Writer(self)
            self._writer.thread.start()

    def _abandon_thread(self, job: _Job, reason: str) -> None:
        # The writer is stuck inside PortAudio: leave it (daemon thread), start afresh later.
        log.error("playout.stalled", broadcast_id=job.broadcast_id, reason=reason)
        self.device_error = reason
        # PortAudio's atexit Pa_Terminate may then block too: the daemon should exit with
        # os._exit when `wedged` (systemd restarts it with a fresh audio stack).
        job.stop_req = 2
        self.wedged = True
        self._writer = None
        self._finish(job, FAILED, reason)

    def _finish(self, job: _Job, outcome: str, reason: str | None) -> None:
        if job.future.done():
            return
        if self._job is job:
            self._job = None
        job.future.set_result(
            PlayResult(
                outcome, reason, job.broadcast_id, job.started_at, job.frames, job.frames / self.rate
            )
        )

    def _post(self, job: _Job, fn, *args) -> None:
        try:
            job.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: nobody to tell
            pass


class _Writer:
    """The writer thread and everything only it touches (stream, clock anchor, buffers).

    Abandoned wholesale if PortAudio hangs, so a stale thread can never touch the state of
    the writer that replaced it.
    """

    def __init__(self, player: Player) -> None:
        self.p = player
        self.stream = None
        self.t0: float | None = None
        self.sent = 0
        self.idle_until = 0.0
        self.buf = np.empty(player.blocksize, dtype=np.float32)
        self.silence = np.zeros(player.blocksize, dtype=np.float32)
        self.thread = threading.Thread(target=self.run, name="loaxa-playout", daemon=True)

    @property
    def current(self) -> bool:
        return self.p._writer is self and not self.p._closing

    def run(self) -> None:
        p = self.p
        while self.current:
            job = p._job
            if job is not None:
                self.play_job(job)
                self.idle_until = time.monotonic() + p.idle_close_s
                continue
            if p.idle_policy == "silence":
                try:
                    self.open()
                    self.write(self.silence)
                except Exception as e:
                    self.device_failed(e)
                    p._wake.wait(1.0)
                continue
            if self.stream is not None and time.monotonic() >= self.idle_until:
                self.close_stream()
            p._wake.wait(0.1 if self.stream is not None else 0.5)
            p._wake.clear()
        self.close_stream()

    def open(self) -> None:
        if self.stream is not None:
            return
        p = self.p
        st = _sd().OutputStream(
            samplerate=p.rate,
            channels=1,
            dtype="float32",
            device=p.device,
            blocksize=p.blocksize,
            latency=p.latency,
        )
        st.start()
        self.stream = st
        self.t0 = None
        self.sent = 0
        if p.device_error and self.current:
            log.info("playout.device_ok", device=p.device)
            p.device_error = None

    def close_stream(self) -> None:
        st, self.stream = self.stream, None
        if st is not None:
            try:
                st.stop()
                st.close()
            except Exception:
                pass

    def device_failed(self, e: Exception) -> str:
        p = self.p
        msg = f"audio device error: {e}"
        if p.device_error != msg:
            log.warning("playout.device_error", device=p.device, error=str(e))
        if self.current:
            p.device_error = msg
        st, self.stream = self.stream, None
        if st is not None:
            try:
                st.abort()
                st.close()
            except Exception:
                pass
        return msg

    def write(self, block: np.ndarray) -> None:
        """Write one block, keeping at most lead_s ahead of the monotonic clock."""
        rate = self.p.rate
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
            self.sent = 0
        ahead = self.sent / rate - (now - self.t0)
        if ahead > self.p.lead_s:
            _pause(ahead - self.p.lead_s)
        elif ahead < -self.p.lead_s:  # fell behind (stall, underrun): re-anchor, never burst
            self.t0 = now - self.sent / rate
        before = time.monotonic()
        if self.stream.write(block):
            self.p.underflows += 1
        after = time.monotonic()
        n = len(block)
        self.sent += n
        if after - before > 0.5 * n / rate:
            # The device blocked us, so it is the clock: about its latency is queued.
            self.t0 = after - self.sent / rate + self.stream.latency

    def out_latency(self) -> float:
        try:
            return float(self.stream.latency)
        except Exception:
            return 0.0

    def next_on_air(self) -> float:
        """Monotonic time the next sample written will be heard."""
        now = time.monotonic()
        t = now if self.t0 is None else max(now, self.t0 + self.sent / self.p.rate)
        return t + self.out_latency()

    def drain(self) -> None:
        """Return only once the last sample written has been played (by the clock)."""
        if self.t0 is None:
            return
        end = self.t0 + self.sent / self.p.rate + self.out_latency()
        while self.current:
            left = end - time.monotonic()
            if left <= 0:
                break
            _pause(min(left, 0.05))

    def play_job(self, job: _Job) -> None:
        p = self.p
        try:
            self.open()
        except Exception as e:
            self.end(job, FAILED, self.device_failed(e))
            return
        bs = p.blocksize
        chunk = job.array
        off = 0
        ramp = None
        roff = 0
        sumsq = 0.0
        nlev = 0
        outcome, reason = FINISHED, None
        try:
            while True:
                job.progress = time.monotonic()
                if job.stop_req and ramp is None:
                    reason = "preempted" if job.stop_req == 2 else "stopped"
                    if job.started_at is None:
                        outcome = STOPPED
                        break
                    ramp = p._fade if job.stop_req == 1 else p._pfade
                if chunk is None or off >= len(chunk):
                    if job.started_at is None and not self.prefilled(job):
                        if p.idle_policy == "silence":
                            self.write(self.silence)  # the carrier keeps its silence
                        else:
                            _pause(0.005)  # go on air only with some audio in hand
                        continue
                    if job.queue:
                        chunk, off = job.queue.popleft(), 0
                    elif job.src_done:
                        if job.src_error:
                            outcome, reason = FAILED, job.src_error
                        break
                    else:  # source late: silence on air (and in the level: dead air shows)
                        chunk, off = self.silence, 0
                n = min(bs, len(chunk) - off)
                view = chunk[off : off + n]
                off += n
                if ramp is not None:
                    n = min(n, len(ramp) - roff)
                    block = self.buf[:n]
                    np.multiply(view[:n], ramp[roff : roff + n], out=block)
                    roff += n
                else:
                    block = view
                if job.started_at is None:
                    job.started_at = self.next_on_air()
                    if job.on_started is not None:
                        p._post(job, job.on_started, job.started_at)
                self.write(block)
                if chunk is not self.silence:
                    job.frames += n
                sumsq += float(np.dot(block, block))
                nlev += n
                if nlev >= p.level_frames:
                    p.level_dbfs = 10.0 * math.log10(sumsq / nlev + 1e-20)
                    if job.on_level is not None:
                        p._post(job, job.on_level, p.level_dbfs)
                    sumsq, nlev = 0.0, 0
                if ramp is not None and roff >= len(ramp):
                    outcome = STOPPED
                    break
            if outcome != FAILED and job.started_at is not None:
                self.drain()
        except Exception as e:  # PortAudioError: device gone mid-play
            outcome, reason = FAILED, self.device_failed(e)
        self.end(job, outcome, reason)

    def prefilled(self, job: _Job) -> bool:
        if job.queue is None or job.src_done:
            return True
        return sum(len(b) for b in job.queue) >= self.p.prefill_frames

    def end(self, job: _Job, outcome: str, reason: str | None) -> None:
        if self.p._job is job:
            self.p._job = None
        self.p._post(job, self.p._finish, job, outcome, reason)


def _mono(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"audio block must be 1-D or (frames, channels), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)

"""No clock, no schedule: a Pi has no RTC, so wall time is trusted only once synchronised.

`ClockGuard` answers two questions for the scheduler: may scheduled programmes run
(the clock is synchronised and plausible), and did wall time just jump relative to
the monotonic clock (NTP step, a technician's `date -s`) so the schedule must be
rebuilt rather than fire a burst of "missed" programmes.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("loaxa.clock")

TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
EARLIEST_PLAUSIBLE = 1767225600  # 2026-01-01T00:00:00Z: a Pi booting at 1970 is not "synced"


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("pad", ctypes.c_long * 30)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def kernel_synced() -> bool:
    """The kernel's own verdict (adjtimex: STA_UNSYNC clear), which any NTP daemon maintains.

    Under the unit's ProtectClock=yes even the read-only adjtimex is refused (EPERM); then
    ask timedated over D-Bus (`timedatectl`), which reads the same flag outside our sandbox.
    """
    t = _Timex()
    rc = _libc().adjtimex(ctypes.byref(t))
    if rc == -1 and ctypes.get_errno() == errno.EPERM:
        return _timedatectl_synced()
    return rc not in (-1, 5) and not t.status & 0x40  # 5 = TIME_ERROR, 0x40 = STA_UNSYNC


def _timedatectl_synced() -> bool:
    try:
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "yes"


def make_check(spec: str) -> Callable[[], bool]:
    """`auto` (timesyncd's flag where timesyncd runs, else the kernel's NTP status),
    `timesyncd`, `kernel`, `none` (trust the clock), or `file:PATH` (a flag file)."""
    if spec == "auto":
        return TIMESYNCD_FLAG.exists if TIMESYNCD_FLAG.parent.is_dir() else kernel_synced
    if spec == "kernel":
        return kernel_synced
    if spec == "none":
        return lambda: True
    if spec.startswith("file:"):
        p = Path(spec[5:])
        return p.exists
    if spec == "timesyncd":
        return TIMESYNCD_FLAG.exists
    raise ValueError(f"unknown clock check {spec!r}: use timesyncd, none or file:/path")


class ClockGuard:
    def __init__(self, check: Callable[[], bool], *, jump_threshold_s: float = 30.0,
                 interval_s: float = 1.0,
                 on_sync_change: Callable[[bool], None] | None = None,
                 on_jump: Callable[[float], None] | None = None) -> None:
        self.check = check
        self.jump_threshold_s = jump_threshold_s
        self.interval_s = interval_s
        self.on_sync_change = on_sync_change
        self.on_jump = on_jump
        self.synced = self._evaluate()
        self._checked = time.monotonic()
        self._offset = time.time() - time.monotonic()
        self.last_jump_s: float = 0.0
        self._task: asyncio.Task | None = None

    def _evaluate(self) -> bool:
        try:
            flag = bool(self.check())
        except OSError:
            flag = False
        return flag and time.time() >= EARLIEST_PLAUSIBLE

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clock-guard")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def poll(self) -> None:
        """One check; called every interval (and directly by tests)."""
        offset = time.time() - time.monotonic()
        delta = offset - self._offset
        self._offset = offset
        if abs(delta) >= self.jump_threshold_s:
            self.last_jump_s = delta
            log.warning("wall clock jumped", seconds=round(delta, 1))
            if self.on_jump:
                self.on_jump(delta)
        now = time.monotonic()
        if now - self._checked < self.interval_s * 0.9:
            return  # the sync check may be a syscall or a subprocess: once per interval is plenty
        self._checked = now
        synced = self._evaluate()
        if synced != self.synced:
            self.synced = synced
            log.info("clock synchronisation changed", synced=synced)
            if self.on_sync_change:
                self.on_sync_change(synced)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.poll()
            except Exception:  # a callback bug must not stop the guard
                log.exception("clock guard callback failed")



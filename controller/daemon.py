"""`loaxa run`: one asyncio loop that owns the site, from start to a clean stop.

Offline-first: the daemon starts and keeps broadcasting with no broker, no audio
device and a missing serial port; each absent part is reported, never fatal.
The watchdog ping rides on the event loop, so a hung loop stops the pings and
systemd restarts us.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import structlog

from controller import __version__
from controller.config import SiteConfig, load_site
from controller.sdnotify import Notifier
from controller.store import Store, StoreError
from controller.yamlsrc import YamlError

log = structlog.get_logger("loaxa.daemon")

STOP_TIMEOUT_S = 4.0


def open_store(state_dir: Path) -> tuple[Store, str | None]:
    """The state database, or an in-memory one with the reason, so broadcasting goes on."""
    path = Path(state_dir) / "state.db"
    try:
        store = Store(path)
        if not store.integrity_ok():
            raise StoreError(f"{path}: integrity check failed")
        return store, None
    except StoreError as e:
        reason = str(e)
        if path.exists() and ("malformed" in reason or "not a database" in reason or "integrity" in reason):
            aside = path.with_name(f"state.db.corrupt-{int(time.time())}")
            try:
                path.rename(aside)
                for suffix in ("-wal", "-shm"):
                    side = Path(str(path) + suffix)
                    if side.exists():
                        side.rename(Path(str(aside) + suffix))
                log.error("state database corrupt; moved aside and started fresh", moved_to=str(aside))
                return Store(path), f"database was corrupt, moved to {aside.name}"
            except (OSError, StoreError) as e2:
                reason = f"{reason}; {e2}"
    except OSError as e:
        reason = f"{path}: {e.strerror or e}"
    log.error("state database unavailable; keeping state in memory until restart", reason=reason)
    return Store(":memory:"), reason


class Daemon:
    """Owns the config, the store and the components; reacts to signals."""

    def __init__(self, config_path: str | Path, *, log_level: str | None = None) -> None:
        self.config_path = Path(config_path)
        self.log_level = log_level
        self.notifier = Notifier()
        self.boot_id = str(uuid.uuid4())
        self.started_mono = time.monotonic()
        self.cfg: SiteConfig | None = None
        self.store: Store | None = None
        self.storage_problem: str | None = None
        self.runtime = None  # controller.runtime.Runtime once built
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.cfg = load_site(self.config_path)  # YamlError handled by the CLI (exit 2)
        if self.log_level is None and self.cfg.log_level != "info":
            from controller import logs

            logs.setup(self.cfg.log_level)  # the site file's level unless --log-level was given
        for w in self.cfg.warnings:
            log.warning("config warning", detail=w)
        self.store, self.storage_problem = open_store(self.cfg.storage.state_dir)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

        from controller.runtime import Runtime

        self.runtime = Runtime(self.cfg, self.store, daemon=self)
        await self.runtime.start()
        log.info("loaxa started", version=__version__, site=self.cfg.site.id,
                 clusters=len(self.cfg.clusters), pid=os.getpid())
        self.notifier.send("READY=1", f"STATUS=running site {self.cfg.site.id}")
        wd = self.notifier.watchdog_interval()
        if wd:
            self._tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
        await self._stop.wait()
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        try:
            await asyncio.wait_for(self.runtime.stop(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("components did not stop in time; exiting anyway")
        for t in self._tasks:
            t.cancel()
        self.store.close()
        log.info("loaxa stopped")
        if self.runtime is not None and getattr(self.runtime.player, "wedged", False):
            # a thread stuck inside PortAudio would hang interpreter exit; systemd restarts us
            log.error("audio thread wedged; exiting hard so the watchdog/systemd get a fresh audio stack")
            os._exit(0)
        return 0

    def request_stop(self, why: str = "request") -> None:
        if not self._stop.is_set():
            log.info("stopping", reason=why)
            self._stop.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def reload(self) -> bool:
        """SIGHUP: a broken new file keeps the running config and logs every error."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            new = load_site(self.config_path)
        except YamlError as e:
            for line in e.errors:
                log.error("config reload rejected; keeping the running config", error=line)
            self.notifier.send("READY=1", "STATUS=running (reload rejected, see log)")
            if self.runtime:
                self.runtime.emit("config.rejected", {"errors": e.errors[:50]})
            return False
        for w in new.warnings:
            log.warning("config warning", detail=w)
        self.cfg = new
        if self.runtime:
            await self.runtime.reload(new)
        log.info("config reloaded", hash=new.source_hash)
        self.notifier.send("READY=1", f"STATUS=running site {new.site.id} (reloaded)")
        return True


def main(config_path: str, log_level: str | None = None) -> int:
    d = Daemon(config_path, log_level=log_level)
    return asyncio.run(d.run())

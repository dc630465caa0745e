"""The running site: wires config, store and components on the one event loop."""
from __future__ import annotations

from typing import Any

import structlog

from controller.config import SiteConfig
from controller.store import Store

log = structlog.get_logger("loaxa.runtime")


class Runtime:
    def __init__(self, cfg: SiteConfig, store: Store, *, daemon: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.daemon = daemon

    async def start(self) -> None:
        self.emit("gateway.started", {"version": _version()})
        self.emit("config.loaded", {"hash": self.cfg.source_hash})

    async def stop(self) -> None:
        self.emit("gateway.stopping", {})

    async def reload(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.emit("config.loaded", {"hash": cfg.source_hash})

    def emit(self, type_: str, body: dict, *, droppable: bool = False) -> None:
        log.info("event", type=type_, **body)


def _version() -> str:
    from controller import __version__

    return __version__

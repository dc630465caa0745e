"""The devices of one site, opened from the site file and their profiles.

Each device may be missing or broken at start (no USB adapter, no broker): it is
reported and retried by its driver, never fatal. Observations are translated into
the diagnosis vocabulary here; the drivers themselves decide nothing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from device_drivers.ip_cluster import IpClusterDriver, IpClusterLink, Observation

if TYPE_CHECKING:
    from controller.runtime import Runtime

log = structlog.get_logger("loaxa.devices")


def load_profile(name: str):
    from device_drivers.profiles import load_profile as lp

    return lp(name)


class Devices:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        cfg = rt.cfg
        self.ip_link: IpClusterLink | None = None
        self.ip_drivers: dict[str, IpClusterDriver] = {}
        fm = [c for c in cfg.clusters if c.kind == "fm"]
        rt.fm_spec = load_profile(fm[0].profile_name).fm if fm else None
        for c in cfg.clusters:
            if c.kind == "ip":
                self.ip_drivers[c.id] = IpClusterDriver(c.id, c.ip.device_id, load_profile(c.profile_name))
        from controller.air import Air

        self.air = Air(rt)
        rt.tx, rt.rds = self.air.tx, self.air.rds

    async def start(self) -> None:
        cfg = self.rt.cfg
        if self.ip_drivers:
            cm = cfg.clusters_mqtt
            from controller.config import read_secret

            self.ip_link = IpClusterLink(
                cm.broker or cfg.central.broker, list(self.ip_drivers.values()), self._on_ip,
                client_id=f"loaxa-{cfg.site.id}-clusters", username=cm.username,
                password=read_secret(cm.password_file), ca_file=str(cm.ca_file) if cm.ca_file else None,
                on_link=self._ip_link_changed)
            # until the clusters' broker answers, their silence proves nothing
            self.rt.diagnoser.cluster_link(False)
            await self.ip_link.start()
        await self.air.start()

    async def stop(self) -> None:
        await self.air.stop()
        if self.ip_link:
            await self.ip_link.close()

    async def protect(self, action) -> None:
        await self.air.protect(action)

    def _ip_link_changed(self, up: bool) -> None:
        log.info("clusters broker link", up=up)
        self.rt.diagnoser.cluster_link(up)

    async def _on_ip(self, obs: Observation) -> None:
        rt = self.rt
        if obs.kind == "liveness":
            rt.observe_cluster(obs.cluster_id, online=bool(obs.online))
        elif obs.kind == "telemetry":
            rt.observe_cluster(obs.cluster_id, telemetry=dict(obs.telemetry))
        elif obs.kind == "malformed":
            log.warning("malformed cluster message", cluster=obs.cluster_id, reason=obs.reason)
        v = rt.site.clusters.get(obs.cluster_id)
        if v is not None and obs.kind in ("ack", "telemetry"):
            v.last_seen = time.time()

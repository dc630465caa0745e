"""Every simulated device of one site, built from its site file, owned in one place.

The daemon cannot tell it is simulated: its serial ports are ptys whose master ends the
device simulators hold (named by stable symlinks in the work dir, so an unplugged cable
can really vanish and come back), its IP clusters are MQTT clients on the simulation's
broker, and its "air" is the ALSA capture file the FM receivers listen to.

Ground truth goes to the Recorder from what each simulator observes (each simulator's
own module documents its device model and fault behaviour).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from pathlib import Path
from typing import Any

import structlog

from device_drivers.profiles import load_profile
from device_drivers.sim.record import Recorder

log = structlog.get_logger(__name__)

class Pty:
    """A serial port without a device: we hold both ends; the daemon opens `link`."""

    def __init__(self, link: Path, *, linked: bool = True):
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.link = link
        self._draining = False
        if linked:
            self.plug()

    def plug(self) -> None:
        """The device appears at `link` (a cable plugged in)."""
        self.link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        self.link.symlink_to(self.path)

    def drain(self) -> None:
        """No simulator for this device: swallow what the daemon writes."""
        loop = asyncio.get_running_loop()

        def _read() -> None:
            try:
                os.read(self.master, 4096)
            except OSError:
                loop.remove_reader(self.master)
        loop.add_reader(self.master, _read)
        self._draining = True

    def close(self) -> None:
        if self._draining:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.master)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.link.unlink()


class SiteSim:
    def __init__(self, cfg: Any, broker_url: str, workdir: Path, recorder: Recorder, *,
                 capture_path: Path, heartbeat_s: float | None = None):
        self.cfg = cfg
        self.broker_url = broker_url
        self.workdir = Path(workdir)
        self.rec = recorder
        self.capture_path = Path(capture_path)
        hb = heartbeat_s or cfg.timing.heartbeat_timeout_s
        self.telemetry_interval = max(0.5, min(5.0, hb / 3))
        self.ptys: dict[str, Pty] = {}
        self.ports: dict[str, str] = {}   # transmitter / rds / lightning -> path for the site file
        self.ip: dict[str, Any] = {}
        self.fm: dict[str, Any] = {}
        self.transmitter: Any = None
        self.lightning_sensor: Any = None
        self.air: Any = None
        self.simulators: list[str] = []   # which simulators this site got (for the record)
        self.dead: set[str] = set()       # clusters killed for good (damage "dead")
        self._tasks: set[asyncio.Task] = set()
        self._make_ptys()

    # ---- ports ------------------------------------------------------------------------
    def _make_ptys(self) -> None:
        dev = self.workdir / "dev"
        self.ptys["transmitter"] = Pty(dev / "transmitter")
        rds = self.cfg.transmitter.rds
        if rds is not None and rds.port:
            self.ptys["rds"] = Pty(dev / "rds")
        if self.cfg.lightning_sensor is not None:
            self.ptys["lightning"] = Pty(dev / "lightning")
        self.ports = {k: str(p.link) for k, p in self.ptys.items()}

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self._start_transmitter()
        await self._start_lightning()
        await self._start_ip()
        self._start_fm()
        if "lightning" in self.ptys:   # the sensor only talks: drain what the daemon sends it
            self.ptys["lightning"].drain()

    async def _start_transmitter(self) -> None:
        from device_drivers.sim.transmitter_sim import TransmitterSim

        rds = self.ptys.get("rds")
        self.transmitter = TransmitterSim(
            self.ptys["transmitter"].master, load_profile(self.cfg.transmitter.profile),
            rds_master_fd=rds.master if rds else None, on_change=self.rec.transmitter,
            on_rds_data=self._on_rds_data)
        await self.transmitter.start()
        self.rec.transmitter(self.transmitter.ground_truth())
        self.simulators.append("transmitter_sim")

    async def _start_lightning(self) -> None:
        if "lightning" not in self.ptys:
            return
        from device_drivers.sim.lightning_sim import LightningSim

        self.lightning_sensor = LightningSim(self.ptys["lightning"].master,
                                             load_profile(self.cfg.lightning_sensor.profile))
        self.simulators.append("lightning_sim")

    async def _start_ip(self) -> None:
        from device_drivers.sim.ip_cluster_sim import IpClusterSim

        for c in self.cfg.clusters:
            if c.kind != "ip":
                continue
            sub = c.subscription
            sim = IpClusterSim(c.id, c.ip.device_id, load_profile(c.profile_name), self.broker_url,
                               on_change=self.rec.cluster,
                               telemetry_interval=self.telemetry_interval,
                               sim_expires_on=sub.expires_on if sub else None)
            if c.impedance_ref_ohm:   # a healthy line measures what the site file says
                sim.state["line_impedance_ohm"] = float(c.impedance_ref_ohm)
            self.ip[c.id] = sim
            self.rec.cluster(c.id, False, None, sim.state["volume"])
        await asyncio.gather(*(s.start() for s in self.ip.values()))
        if self.ip:
            self.simulators.append("ip_cluster_sim")

    def _start_fm(self) -> None:
        from device_drivers.sim.fm_receiver_sim import FmAirMonitor

        rate = self.cfg.audio.sample_rate
        for c in self.cfg.clusters:
            if c.kind == "fm":
                self.fm[c.id] = self._new_receiver(c.id)
                self.rec.cluster(c.id, False)
        if self.fm:
            self.air = FmAirMonitor(self.capture_path, list(self.fm.values()), rate=rate,
                                    carrier_on=self.transmitter.carrier_on).start()
            self.simulators.append("fm_receiver_sim")

    def _new_receiver(self, cluster_id: str) -> Any:
        from device_drivers.sim.fm_receiver_sim import FmReceiverSim

        c = self.cfg.cluster(cluster_id)
        return FmReceiverSim(c.id, c.fm.address, c.fm.groups, load_profile(c.profile_name).fm,
                             rate=self.cfg.audio.sample_rate, on_change=self._on_fm_change)

    def _on_fm_change(self, cluster_id: str, playing: bool, volume: int | None) -> None:
        if cluster_id not in self.dead:     # called from the air monitor's thread
            self.rec.cluster(cluster_id, playing, None, volume)

    def _on_rds_data(self, payload: bytes) -> None:
        if self.air is not None:
            self.air.rds_data(payload)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        steps = [s.stop() for s in self.ip.values()]
        if self.transmitter is not None:
            steps.append(self.transmitter.stop())
        if self.air is not None:
            steps.append(asyncio.to_thread(self.air.stop))
        for r in await asyncio.gather(*(asyncio.wait_for(x, 5) for x in steps),
                                      return_exceptions=True):
            if isinstance(r, BaseException):
                log.warning("site_sim.stop_failed", error=repr(r))
        for p in self.ptys.values():
            p.close()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- faults -----------------------------------------------------------------------
    def expand(self, ids: list[str]) -> list[str]:
        """Cluster and zone ids -> cluster ids (file order, no repeats)."""
        zones = {z.id for z in self.cfg.zones}
        out: list[str] = []
        for i in ids:
            out += [c.id for c in self.cfg.clusters if c.zone == i] if i in zones else [i]
        return list(dict.fromkeys(out))

    def strikes(self, count: int, distance_km: float, spread_s: float = 2.0) -> bool:
        """Strikes on the gateway's sensor, spread over `spread_s` as a storm's would be;
        False when the site has no sensor."""
        s = self.lightning_sensor
        if s is None or count <= 0:
            return False

        async def storm() -> None:
            for i in range(count):
                s.strike(distance_km)
                if i + 1 < count:
                    await asyncio.sleep(spread_s / max(1, count - 1))
        self._spawn(storm())
        return True

    async def damage(self, cluster_id: str, kind: str) -> None:
        if cluster_id in self.fm:
            self._fm_dead(cluster_id)
            return
        sim = self.ip[cluster_id]
        if kind == "dead":
            self.dead.add(cluster_id)
            await sim.kill()
            self.rec.cluster(cluster_id, False, None, sim.state["volume"], alive=False)
        elif kind == "surge_protector_tripped":
            sim.surge_trip()
        elif kind == "amplifier_fault":
            sim.amp_fault()
        elif kind == "speaker_line_fault":
            sim.impedance_step(400)   # a broken line: impedance far above its reference

    def _fm_dead(self, cluster_id: str, seconds: float | None = None) -> None:
        """An FM receiver has no uplink: any damage (or a power cut) makes it stop reacting.
        With `seconds` it comes back as after a reboot: disabled until a code wakes it."""
        self.dead.add(cluster_id)
        old = self.fm[cluster_id]
        self.air.receivers = [r for r in self.air.receivers if r is not old]
        self.rec.cluster(cluster_id, False, None, None, alive=False)
        if seconds is None:
            return

        def back() -> None:
            self.fm[cluster_id] = new = self._new_receiver(cluster_id)
            self.dead.discard(cluster_id)
            self.air.receivers = [*self.air.receivers, new]
            self.rec.cluster(cluster_id, False, None, None, alive=True)
        self._later(seconds, back)

    async def power_cut(self, cluster_ids: list[str], seconds: float) -> None:
        for cid in cluster_ids:
            if cid in self.ip:
                await self.ip[cid].power_cut(seconds)
            else:
                self._fm_dead(cid, seconds)

    async def link_cut(self, cluster_id: str, seconds: float) -> None:
        await self.ip[cluster_id].link_cut(seconds)

    async def sim_expire(self, cluster_id: str) -> None:
        await self.ip[cluster_id].sim_expire()

    def transmitter_fault(self, fault: dict[str, Any]) -> None:
        tx = self.transmitter
        if fault.get("vswr") is not None:
            tx.set_vswr(fault["vswr"])
        if fault.get("temperature_c") is not None:
            tx.set_temperature(fault["temperature_c"])
        if fault.get("pll_locked") is not None:
            tx.set_pll(fault["pll_locked"])
        if fault.get("garbage") is not None:
            tx.inject_garbage(fault["garbage"])
        if fault.get("unplugged") is not None:
            self.unplug_transmitter(fault["unplugged"])

    def unplug_transmitter(self, seconds: float) -> None:
        """The USB-serial cable is pulled: the port vanishes (the daemon's open fd hangs up)
        and comes back after `seconds` as a new tty at the same path, same exciter."""
        old = self.ptys["transmitter"]
        new = Pty(old.link, linked=False)
        self.transmitter.reattach(new.master)   # the simulator keeps its state
        self.ptys["transmitter"] = new
        old.close()                             # hangs up the daemon's side, removes the link
        self._later(seconds, new.plug)

    def _later(self, delay: float, fn: Any) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            fn()
        self._spawn(run())

"""The FM air: transmitter carrier and power, RDS, and the lightning sensor.

Policy that touches the transmitter lives here: bring it to a safe state at start
(no carrier left up by a crashed run under `on_demand`), keep frequency and power
as configured, carry out diagnosis' protective actions (foldback, carrier off), and
poll telemetry in fast and slow classes. The drivers only execute.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog

from controller.observations import Strike, TransmitterReading
from device_drivers import uecp
from device_drivers.lightning import LightningSensorDriver
from device_drivers.rds_encoder import RdsEncoderDriver
from device_drivers.transmitter import DeviceError, TransmitterDriver, Unreachable

if TYPE_CHECKING:
    from controller.runtime import Runtime

log = structlog.get_logger("loaxa.air")

ALARM_PTY = 31
TRIP_KEY = "transmitter.protective_off"
RELEASE_CODES = ("transmitter.vswr_high", "transmitter.pll_unlocked")


class TxControl:
    """What the broadcast runner needs from the transmitter."""

    def __init__(self, rt: Runtime, driver: TransmitterDriver) -> None:
        self.rt = rt
        self.d = driver
        self.carrier_on: bool | None = None
        self.power_share = 1.0
        self.configured = False
        # a protective carrier-off survives restarts: a crash loop must not key a bad antenna
        self.protective_off = bool(rt.store.kv_get(TRIP_KEY))

    @property
    def reachable(self) -> bool:
        return bool(self.d.reachable)

    async def carrier(self, on: bool) -> bool:
        if on and self.protective_off:
            log.error("carrier held off by protection (VSWR/PLL); programme goes to IP clusters only")
            return False
        try:
            await self.d.set_carrier(on)
        except (Unreachable, DeviceError) as e:
            log.warning("carrier command failed", on=on, error=str(e))
            return False
        self.carrier_on = on
        self.rt.site.transmitter["on_air"] = on
        self.rt.publish_health()
        return True

    async def configure(self) -> None:
        """Frequency, power, and the carrier per policy, once the transmitter answers."""
        cfg = self.rt.cfg.transmitter
        await self.d.set_frequency(cfg.frequency_mhz)
        await self.d.set_power(cfg.power_w * self.power_share)
        busy = any(b.resources & {"@air"} for b in self.rt.engine.active.values())
        if cfg.carrier == "always" and not self.protective_off:
            await self.carrier(True)
        elif not busy or self.protective_off:
            await self.carrier(False)  # a crashed run may have left it up: no dead-air carrier
        self.configured = True


class RdsControl:
    def __init__(self, rt: Runtime, driver: RdsEncoderDriver) -> None:
        self.rt = rt
        self.d = driver
        self.alarm = False

    async def defaults(self) -> None:
        r = self.rt.cfg.transmitter.rds
        await self.d.set_pi(r.pi)
        await self.d.set_ps(r.ps)
        await self.d.set_pty(r.pty)
        await self.d.set_ta_tp(False, True)

    async def emergency_on(self, title: str) -> bool:
        """TA on and PTY 31 (Alarm): every RDS radio in range, car radios too, switches to us."""
        try:
            await self.d.set_rt(title[:64])
            await self.d.send([uecp.Pty(ALARM_PTY), uecp.TaTp(True, True)])
            self.alarm = True
            return True
        except Exception as e:
            log.error("RDS alarm not set", error=str(e))
            return False

    async def emergency_off(self) -> None:
        try:
            r = self.rt.cfg.transmitter.rds
            await self.d.send([uecp.TaTp(False, True), uecp.Pty(r.pty)])
            await self.d.set_rt(r.ps)
            self.alarm = False
        except Exception as e:
            log.error("RDS alarm not cleared", error=str(e))

    async def send_timed(self, msgs: list) -> None:
        """Receiver codes on the data channel at their offsets (encoders rarely ACK)."""
        t0 = time.monotonic()
        for m in msgs:
            delay = m.at_s - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self.d.send([m.element], repeat=1)
            except Exception as e:
                log.warning("RDS code not sent", code=m.code, error=str(e))


class Air:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        cfg = rt.cfg
        t = cfg.transmitter
        self.tx = TxControl(rt, TransmitterDriver(t.port, t.profile, t.baud, on_event=self._tx_event))
        self.rds = None
        if t.rds is not None:
            self.rds = RdsControl(rt, RdsEncoderDriver(t.rds.port, t.rds.profile, t.rds.site_address,
                                                       t.rds.encoder_address, baud=t.rds.baud))
        self.lightning = None
        if cfg.lightning_sensor is not None:
            ls = cfg.lightning_sensor
            self.lightning = LightningSensorDriver(ls.port, ls.profile, self._strike, baud=ls.baud)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.tx.d.start()
        if self.rds:
            await self.rds.d.start()
        if self.lightning:
            await self.lightning.start()
        self._tasks.append(asyncio.create_task(self._poll(), name="tx-poll"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.tx.configured and self.rt.cfg.transmitter.carrier == "on_demand":
            try:
                await asyncio.wait_for(self.tx.d.set_carrier(False), 1.5)
            except Exception:
                pass
        for d in (self.tx.d, self.rds.d if self.rds else None, self.lightning):
            if d is not None:
                try:
                    await d.stop()
                except Exception:
                    log.exception("driver stop failed")

    async def protect(self, action: Any) -> None:
        """Diagnosis decided (VSWR, PLL): the final stage must not burn."""
        tx, cfg = self.tx, self.rt.cfg.transmitter
        log.warning("protective action", action=action.action, reason=action.reason)
        try:
            if action.action == "foldback":
                tx.power_share = action.power_share or 0.5
                await tx.d.set_power(cfg.power_w * tx.power_share)
            elif action.action == "carrier_off":
                tx.protective_off = True
                self.rt.store.kv_set(TRIP_KEY, {"reason": action.reason, "since": time.time()})
                await tx.d.set_carrier(False)
                tx.carrier_on = False
            elif action.action == "restore":
                tx.power_share, tx.protective_off = 1.0, False
                self.rt.store.kv_set(TRIP_KEY, None)
                await tx.d.set_power(cfg.power_w)
                if cfg.carrier == "always" or any(b.resources & {"@air"} for b in self.rt.engine.active.values()):
                    await tx.carrier(True)
        except (Unreachable, DeviceError) as e:
            log.error("protective action failed", action=action.action, error=str(e))

    async def release_protection(self, by: str) -> None:
        """Acknowledging the VSWR/PLL alarm (after the antenna is repaired) re-arms the carrier;
        the guard trips again if the fault is still there."""
        tx = self.tx
        if not tx.protective_off:
            return
        log.warning("protective carrier-off released", by=by)
        tx.protective_off, tx.power_share = False, 1.0
        self.rt.store.kv_set(TRIP_KEY, None)
        try:
            await tx.d.set_power(self.rt.cfg.transmitter.power_w)
        except (Unreachable, DeviceError) as e:
            log.error("power not restored", error=str(e))
        if self.rt.cfg.transmitter.carrier == "always":
            await tx.carrier(True)

    async def _poll(self) -> None:
        timing = self.rt.cfg.timing
        last_slow = 0.0
        # the port opens in the background: polling before that only says "unreachable"
        await self.tx.d.transport.wait_open(5.0)
        while True:
            try:
                if not self.tx.configured:
                    await self.tx.configure()
                    if self.rds:
                        await self.rds.defaults()
                slow = time.monotonic() - last_slow >= timing.poll_slow_s
                values = await self.tx.d.read("all" if slow else "fast")
                if slow and values.get("reachable"):
                    last_slow = time.monotonic()
                self._reading(values)
            except (Unreachable, DeviceError, ValueError) as e:
                self._reading({"reachable": False, "detail": str(e)})
            except Exception:
                log.exception("transmitter poll failed")
            await asyncio.sleep(timing.poll_fast_s)

    def _reading(self, values: dict) -> None:
        rt = self.rt
        if not values.get("reachable"):
            self.tx.configured = False  # reconfigure when it comes back (it may have rebooted)
        if "on_air" in values:
            self.tx.carrier_on = values["on_air"]
        keep = {k: v for k, v in values.items() if k in (
            "reachable", "on_air", "frequency_mhz", "forward_w", "reflected_w", "vswr",
            "temperature_c", "pll_locked", "detail")}
        before = (rt.site.transmitter.get("reachable"), rt.site.transmitter.get("on_air"))
        rt.site.transmitter.update(keep)
        rt.observe(TransmitterReading(ts=time.time(), values=keep))
        if before != (rt.site.transmitter.get("reachable"), rt.site.transmitter.get("on_air")):
            rt.publish_health()

    def _tx_event(self, kind: str, details: dict) -> None:
        log.info("transmitter event", kind=kind, **{k: str(v) for k, v in details.items()})

    def _strike(self, s) -> None:
        if s.distance_km is None:
            return
        self.rt.observe(Strike(ts=s.ts, distance_km=float(s.distance_km), energy=float(s.energy or 0)))

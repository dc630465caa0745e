"""A simulated FM exciter (and its RDS encoder) on the master ends of ptys.

It speaks the transmitter profile byte for byte: command lines are recognised from the
profile's `send` templates, queries from its `points`, replies rendered from the `reply`
templates and error texts; so the daemon cannot tell it from the real exciter.  The RDS
side decodes UECP frames (device_drivers/uecp.py) into RDS state and hands transparent
data channel payloads to `on_rds_data` (the FM receiver simulators listen to those).

Physics, kept simple: forward power = set point while the carrier is on; reflected power
follows the antenna's VSWR (|Γ|² of forward), so a foldback commanded by the daemon
lowers it too; the fault bits and latched alarms follow VSWR, temperature and PLL.

Fault injection: set_vswr, set_temperature, set_pll, unplug(seconds) (stops answering),
inject_garbage(n), slow(seconds) (late replies), stuck(bool) (no replies at all).
Runs on the asyncio loop (add_reader on the master fds); `on_change(state)` gets ground
truth whenever carrier, frequency, power, RF or RDS state changes.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
from collections.abc import Callable
from typing import Any

import structlog

from device_drivers import uecp
from device_drivers.profile_codec import ProfileCodec
from device_drivers.profiles import Profile, load_profile

log = structlog.get_logger(__name__)

VSWR_FAULT = 2.0
OVER_TEMPERATURE_C = 75.0


class _FdReader:
    """add_reader on a pty master that survives EIO (no slave open) by polling later."""

    def __init__(self, fd: int, on_data: Callable[[bytes], None]):
        self.fd, self.on_data = fd, on_data
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.active = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        os.set_blocking(self.fd, False)
        self.active = True
        self.loop.add_reader(self.fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EIO: nobody holds the slave end right now; look again shortly
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)  # type: ignore[union-attr]
            if self.active:
                self._handle = self.loop.call_later(0.2, self._readd)  # type: ignore[union-attr]
            return
        self.on_data(data)

    def _readd(self) -> None:
        if self.active:
            with contextlib.suppress(Exception):
                self.loop.add_reader(self.fd, self._read)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:  # buffer full (nobody reading) or port gone: the bytes are lost
            pass

    def stop(self) -> None:
        self.active = False
        if self._handle is not None:
            self._handle.cancel()
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)


class TransmitterSim:
    def __init__(self, master_fd: int, profile: Profile | str, rds_master_fd: int | None = None,
                 on_change: Callable[[dict], None] | None = None,
                 on_rds_data: Callable[[bytes], None] | None = None, *, rds_acks: bool = False,
                 seed: int | None = None):
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self.codec = ProfileCodec(self.profile)
        self.on_change, self.on_rds_data = on_change, on_rds_data
        self.rds_acks = rds_acks
        self._rng = random.Random(seed)
        self._framer = self.profile.transport.decoder()  # type: ignore[union-attr]
        self._port = _FdReader(master_fd, self._on_bytes)
        self._rds_port = _FdReader(rds_master_fd, self._on_rds_bytes) if rds_master_fd is not None else None
        self.uecp_decoder = uecp.UecpDecoder()
        freq = self.profile.commands["set_frequency"].args
        lo = next(iter(freq.values())).min or 87.5
        self.state: dict[str, Any] = {
            "carrier": False, "frequency_mhz": float(lo), "power_w": 0.0, "antenna_vswr": 1.1,
            "temperature_c": 35.0, "pll_locked": True, "firmware_version": "2.4.1",
            "latched": set(), "extra_faults": set()}
        self.rds: dict[str, Any] = {"pi": None, "ps": "", "pty": 0, "ta": False, "tp": False, "rt": ""}
        self.rds_data: list[bytes] = []
        self.commands: list[str] = []     # command lines received (for tests and debugging)
        self.unknown_lines = 0
        self._silent_until = 0.0
        self._stuck = False
        self._delay = 0.0
        self._last_truth: dict | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._port.start()
        if self._rds_port is not None:
            self._rds_port.start()
        self._changed()

    async def stop(self) -> None:
        self._port.stop()
        if self._rds_port is not None:
            self._rds_port.stop()

    def reattach(self, master_fd: int) -> None:
        """Speak on a new pty (the old one vanished with its cable); state is kept."""
        self._port.stop()
        self._port = _FdReader(master_fd, self._on_bytes)
        self._framer = self.profile.transport.decoder()  # type: ignore[union-attr]
        self._port.start()

    # ---- model ---------------------------------------------------------------------------
    @property
    def forward_w(self) -> float:
        return self.state["power_w"] if self.state["carrier"] else 0.0

    @property
    def reflected_w(self) -> float:
        s = self.state["antenna_vswr"]
        gamma = 1.0 if math.isinf(s) else (s - 1) / (s + 1)
        return self.forward_w * gamma * gamma

    def faults(self) -> list[str]:
        f = set(self.state["extra_faults"])
        if self.forward_w > 0 and self.state["antenna_vswr"] >= VSWR_FAULT:
            f.add("vswr")
        if self.state["temperature_c"] >= OVER_TEMPERATURE_C:
            f.add("over_temperature")
        if not self.state["pll_locked"]:
            f.add("pll_unlocked")
        return sorted(f)

    def values(self) -> dict[str, Any]:
        """Every point the profile can ask for, in the profile's units."""
        st, faults = self.state, self.faults()
        st["latched"] |= set(faults)
        fwd = self.forward_w
        v = {"frequency_mhz": st["frequency_mhz"], "power_w": st["power_w"], "on_air": st["carrier"],
             "forward_w": fwd, "reflected_w": self.reflected_w,
             "vswr": st["antenna_vswr"] if fwd > 0 else 1.0, "temperature_c": st["temperature_c"],
             "pll_locked": st["pll_locked"], "faults": faults,
             "alarm_vswr_latched": "vswr" in st["latched"],
             "alarm_temp_latched": "over_temperature" in st["latched"],
             "alarm_pll_latched": "pll_unlocked" in st["latched"],
             "firmware_version": st["firmware_version"]}
        for name, p in self.profile.points.items():  # points this model does not simulate
            v.setdefault(name, {"bool": False, "str": "", "flags": []}.get(p.type, 0))
        return v

    def ground_truth(self) -> dict[str, Any]:
        st = self.state
        return {"carrier": st["carrier"], "frequency_mhz": round(st["frequency_mhz"], 3),
                "power_w": st["power_w"], "forward_w": round(self.forward_w, 1),
                "vswr": st["antenna_vswr"], "temperature_c": st["temperature_c"],
                "pll_locked": st["pll_locked"], "rds": dict(self.rds)}

    def carrier_on(self) -> bool:
        return bool(self.state["carrier"])

    def _changed(self) -> None:
        truth = self.ground_truth()
        if truth != self._last_truth:
            self._last_truth = truth
            if self.on_change is not None:
                try:
                    self.on_change(truth)
                except Exception:
                    log.exception("transmitter_sim_on_change_failed")

    # ---- fault injection -------------------------------------------------------------------
    def set_vswr(self, x: float) -> None:
        self.state["antenna_vswr"] = float(x)
        self._changed()

    def set_temperature(self, c: float) -> None:
        self.state["temperature_c"] = float(c)
        self._changed()

    def set_pll(self, locked: bool) -> None:
        self.state["pll_locked"] = bool(locked)
        self._changed()

    def unplug(self, seconds: float) -> None:
        """The cable is pulled: nothing is heard or answered for `seconds`."""
        self._silent_until = asyncio.get_running_loop().time() + float(seconds)

    def inject_garbage(self, n: int) -> None:
        self._port.write(bytes(self._rng.randrange(256) for _ in range(int(n))))

    def slow(self, seconds: float) -> None:
        self._delay = max(0.0, float(seconds))

    def stuck(self, on: bool = True) -> None:
        self._stuck = bool(on)

    # ---- exciter protocol ------------------------------------------------------------------
    def _on_bytes(self, data: bytes) -> None:
        if asyncio.get_running_loop().time() < self._silent_until:
            return
        for line in self._framer.feed(data):
            self._handle(line)

    def _reply(self, payload: bytes | None) -> None:
        if payload is None or self._stuck:
            return
        wire = self._framer.encode(payload)
        if self._delay > 0:
            asyncio.get_running_loop().call_later(self._delay, self._port.write, wire)
        else:
            self._port.write(wire)

    def _handle(self, line: bytes) -> None:
        if self._stuck:
            return
        text = line.decode("ascii", "replace")
        if text in self.codec.by_query:
            self._reply(self.codec.render_reply(text, self.values()))
            return
        try:
            parsed = self.codec.parse_command(line)
        except ValueError as e:
            log.info("transmitter_sim_bad_argument", line=text, error=str(e))
            self._reply(self.codec.error_reply("range"))
            return
        if parsed is None:
            self.unknown_lines += 1
            self._reply(self.codec.error_reply("unknown"))
            return
        name, args = parsed
        self.commands.append(text)
        (value,) = args.values() if args else (None,)
        if name == "set_carrier" and value and not self.state["pll_locked"]:
            self._reply(self.codec.error_reply("refused"))
            return
        if name == "set_carrier":
            self.state["carrier"] = bool(value)
        elif name == "set_frequency":
            self.state["frequency_mhz"] = float(value)
        elif name == "set_power":
            self.state["power_w"] = float(value)
        elif name == "clear_alarms":
            self.state["latched"] = set(self.faults())
        self._reply(self.codec.render_ok(name, args))
        self._changed()

    # ---- RDS (UECP) side -------------------------------------------------------------------
    def _on_rds_bytes(self, data: bytes) -> None:
        if asyncio.get_running_loop().time() < self._silent_until:
            return
        for frame in self.uecp_decoder.feed(data):
            self._apply_rds(frame)

    def _apply_rds(self, frame: uecp.Frame) -> None:
        for e in frame.elements:
            if isinstance(e, uecp.PI):
                self.rds["pi"] = f"{e.pi:04X}"
            elif isinstance(e, uecp.PS):
                self.rds["ps"] = e.ps
            elif isinstance(e, uecp.Pty):
                self.rds["pty"] = e.pty
            elif isinstance(e, uecp.TaTp):
                self.rds["ta"], self.rds["tp"] = e.ta, e.tp
            elif isinstance(e, uecp.RadioText):
                self.rds["rt"] = e.text
            elif isinstance(e, uecp.Tdc):
                self.rds_data.append(e.data)
                if self.on_rds_data is not None:
                    try:
                        self.on_rds_data(e.data)
                    except Exception:
                        log.exception("transmitter_sim_on_rds_data_failed")
        if self.rds_acks and frame.sqc and self._rds_port is not None:
            self._rds_port.write(uecp.encode_frame([uecp.Ack(0)], site=frame.site,
                                                   encoder=frame.encoder, sqc=frame.sqc))
        self._changed()

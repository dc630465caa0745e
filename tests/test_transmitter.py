"""Transmitter driver and simulator, through real ptys (and socat for a vanishing port)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import subprocess
import tty
from pathlib import Path

import pytest

from device_drivers.framing import LineFramer
from device_drivers.profile_codec import DeviceError, ProfileCodec
from device_drivers.profiles import load_profile
from device_drivers.sim.transmitter_sim import TransmitterSim
from device_drivers.transmitter import TransmitterDriver, Unreachable

PROFILE = load_profile("exciter-ascii-v2")


async def until(cond, timeout: float = 5.0, step: float = 0.02) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


def read_line(fd: int, framer: LineFramer, timeout: float = 2.0) -> bytes | None:
    pending: list[bytes] = []
    while not pending:
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return None
        pending += framer.feed(os.read(fd, 4096))
    return pending[0]


# ---- test vectors: the literal bytes of the profile against both ends ------------------------

def test_vectors_against_the_codec():
    c = ProfileCodec(PROFILE)
    for v in PROFILE.test_vectors:
        if v.command:
            assert c.render(v.command, **v.args) == v.request.encode(), v.name
            assert c.reply_matcher(v.command, c.command_args(v.command, **v.args))(v.response.encode())
        if v.error:
            with pytest.raises(DeviceError) as e:
                c.check_reply(v.command or "query", v.response.encode())
            assert e.value.meaning == v.error, v.name
        if v.expect:
            values, problems = c.parse_points(v.request, v.response.encode())
            assert problems == [] and values == v.expect, v.name


def test_vectors_against_the_simulator(pty_pair):
    async def main() -> list[tuple[str, bytes | None, bytes]]:
        sim = TransmitterSim(pty_pair.master, PROFILE)
        await sim.start()
        framer, seen = LineFramer(b"\r\n"), []
        for v in PROFILE.test_vectors:
            os.write(pty_pair.slave, v.request.encode() + b"\r\n")
            got = await asyncio.to_thread(read_line, pty_pair.slave, framer)
            seen.append((v.name, got, v.response.encode()))
        await sim.stop()
        return seen

    for name, got, want in asyncio.run(main()):
        assert got == want, name


# ---- driver <-> simulator over a pty ------------------------------------------------------

class Rig:
    def __init__(self, pty_pair, **sim_kw):
        self.events: list[tuple[str, dict]] = []
        self.truth: list[dict] = []
        self.sim = TransmitterSim(pty_pair.master, PROFILE, on_change=self.truth.append, seed=1, **sim_kw)
        self.drv = TransmitterDriver(pty_pair.path, "exciter-ascii-v2",
                                     on_event=lambda k, d: self.events.append((k, d)))

    async def __aenter__(self) -> Rig:
        await self.sim.start()
        await self.drv.start()
        assert await self.drv.transport.wait_open(3)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.drv.stop()
        await self.sim.stop()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


def test_tune_key_and_read_telemetry(pty_pair):
    async def main(r: Rig) -> None:
        async with r:
            await r.drv.set_frequency(98.5)
            await r.drv.set_power(300)
            await r.drv.set_carrier(True)
            reading = await r.drv.read("all")
            assert r.truth[-1]["carrier"] is True and r.truth[-1]["frequency_mhz"] == 98.5
            assert reading["reachable"] is True
            assert reading["frequency_mhz"] == 98.5 and reading["on_air"] is True
            assert reading["forward_w"] == 300.0 and reading["pll_locked"] is True
            assert reading["faults"] == [] and reading["firmware_version"] == "2.4.1"
            fast = await r.drv.read("fast")
            assert "temperature_c" not in fast and "vswr" in fast
            # a foldback commanded by the controller: reflected power follows forward power
            r.sim.set_vswr(1.5)
            before = (await r.drv.read("fast"))["reflected_w"]
            await r.drv.set_power(150)
            after = (await r.drv.read("fast"))["reflected_w"]
            assert after == pytest.approx(before / 2, abs=0.1)
            await r.drv.set_carrier(False)
            assert (await r.drv.read("fast"))["forward_w"] == 0.0
            assert r.truth[-1]["carrier"] is False
    asyncio.run(main(Rig(pty_pair)))


def test_bad_argument_is_refused_before_sending_and_device_errors_surface(pty_pair):
    async def main(r: Rig) -> None:
        async with r:
            with pytest.raises(ValueError, match=r"freq_mhz = 120 is out of range \(allowed 87.5..108.0 MHz\)"):
                await r.drv.set_frequency(120)
            assert r.sim.commands == []
            r.sim.set_pll(False)
            with pytest.raises(DeviceError, match="refused in the current state"):
                await r.drv.set_carrier(True)
            reading = await r.drv.read("fast")
            assert reading["pll_locked"] is False and "pll_unlocked" in reading["faults"]
            active = {a.code for a in r.drv.evaluate_alarms(reading) if a.active}
            assert active == {"transmitter.pll_unlocked"}
    asyncio.run(main(Rig(pty_pair)))


def test_vswr_injected_shows_in_readings_and_alarms(pty_pair):
    async def main(r: Rig) -> None:
        async with r:
            await r.drv.set_power(400)
            await r.drv.set_carrier(True)
            reading = await r.drv.read("fast")
            assert not any(a.active for a in r.drv.evaluate_alarms(reading))
            r.sim.set_vswr(3.2)
            reading = await r.drv.read("fast")
            assert reading["vswr"] == 3.2 and "vswr" in reading["faults"]
            assert reading["reflected_w"] == pytest.approx(400 * (2.2 / 4.2) ** 2, abs=0.1)
            alarms = {a.code: a for a in r.drv.evaluate_alarms(reading)}
            assert alarms["transmitter.vswr_high"].active
            assert alarms["transmitter.vswr_high"].severity == "critical"
            assert "vswr 3.2 >= 2.0" in alarms["transmitter.vswr_high"].detail
            assert r.drv.alarm_action("transmitter.vswr_high") == {
                "foldback_share": 0.5, "carrier_off_after_s": 30.0, "carrier_off_above": 3.0}
            slow = await r.drv.read("slow")
            assert slow["alarm_vswr_latched"] is True
            r.sim.set_temperature(82)
            reading = {**reading, **await r.drv.read("slow")}
            active = {a.code for a in r.drv.evaluate_alarms(reading) if a.active}
            assert active == {"transmitter.vswr_high", "transmitter.over_temperature"}
    asyncio.run(main(Rig(pty_pair)))


def test_garbage_is_counted_once_per_burst_and_survived(pty_pair):
    async def main(r: Rig) -> None:
        async with r:
            await r.drv.set_carrier(True)
            r.sim.inject_garbage(300)
            assert await until(lambda: "garbage" in r.kinds())
            reading = await r.drv.read("all")
            assert reading["reachable"] is True and reading["on_air"] is True
            assert r.kinds().count("garbage") == 1
            assert r.drv.transport.counters["garbage_bursts"] == 1
            assert r.drv.transport.decoder.stats["garbage_bytes"] >= 250
            assert "unreachable" not in r.kinds()
    asyncio.run(main(Rig(pty_pair)))


def test_stuck_transmitter_is_unreachable_then_reachable_again(pty_pair):
    async def main(r: Rig) -> None:
        async with r:
            assert (await r.drv.read("fast"))["reachable"] is True
            r.sim.stuck(True)
            reading = await r.drv.read("fast")
            assert reading["reachable"] is False and "no reply" in reading["detail"]
            assert r.drv.reachable is False and r.kinds().count("unreachable") == 1
            with pytest.raises(Unreachable):
                await r.drv.set_carrier(True)
            assert r.kinds().count("unreachable") == 1     # not repeated while it lasts
            r.sim.stuck(False)
            assert (await r.drv.read("fast"))["reachable"] is True
            assert r.kinds()[-1] == "reachable"
    asyncio.run(main(Rig(pty_pair)))


def test_slow_replies_within_timeout_are_fine(pty_pair):
    async def main(r: Rig) -> None:
        async with r:
            r.sim.slow(0.2)   # below the profile's 0.5 s command timeout
            assert (await r.drv.read("fast"))["reachable"] is True
            assert "unreachable" not in r.kinds()
    asyncio.run(main(Rig(pty_pair)))


# ---- the USB adapter unplugged and plugged back (socat makes the path vanish) ---------------

class Socat:
    def __init__(self, d: Path):
        self.dev, self.sim = d / "ttyTX", d / "ttySIM"
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        self.proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.dev}", f"pty,raw,echo=0,link={self.sim}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if self.dev.exists() and self.sim.exists():
                break
            select.select([], [], [], 0.01)
        fd = os.open(self.sim, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        return fd

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_port_vanishing_and_returning(tmp_path):
    socat = Socat(tmp_path)
    fd = socat.start()
    fds = [fd]

    async def main() -> None:
        events: list[str] = []
        sim = TransmitterSim(fd, PROFILE)
        await sim.start()
        drv = TransmitterDriver(str(socat.dev), PROFILE, on_event=lambda k, d: events.append(k))
        await drv.start()
        try:
            assert await drv.transport.wait_open(3)
            await drv.set_frequency(101.2)
            assert (await drv.read("fast"))["reachable"] is True
            socat.stop()                                   # cable pulled: the path is gone
            assert await until(lambda: "port_lost" in events)
            assert not socat.dev.exists() and drv.port_open is False
            reading = await drv.read("fast")
            assert reading["reachable"] is False and "not open" in reading["detail"]
            new_fd = socat.start()                         # plugged back: a new pty, same path
            fds.append(new_fd)
            sim.reattach(new_fd)
            assert await until(lambda: "port_restored" in events, timeout=8)
            reading = await drv.read("all")
            assert reading["reachable"] is True and reading["frequency_mhz"] == 101.2
            assert events.index("port_lost") < events.index("port_restored")
            assert events.count("port_lost") == 1
            assert events[-1] == "reachable"
        finally:
            await drv.stop()
            await sim.stop()

    try:
        asyncio.run(main())
    finally:
        socat.stop()
        for f in fds:
            with contextlib.suppress(OSError):
                os.close(f)

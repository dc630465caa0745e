"""Lightning sensor: profile event lines, the simulator's bridge output and the driver, over a pty."""
from __future__ import annotations

import asyncio
import os
import select

import pytest

from device_drivers.lightning import LightningSensorDriver, Strike
from device_drivers.profile_codec import ProfileCodec
from device_drivers.profiles import load_profile
from device_drivers.sim.lightning_sim import LightningSim

PROFILE = load_profile("lightning-as3935-bridge")


async def until(cond, timeout: float = 5.0) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end and not cond():
        await asyncio.sleep(0.02)
    return bool(cond())


def test_vectors_against_codec_and_simulator(pty_pair):
    codec = ProfileCodec(PROFILE)
    sim = LightningSim(pty_pair.master, PROFILE)
    for v in PROFILE.test_vectors:
        assert codec.parse_event(v.response.encode()) == (v.event, v.expect), v.name
        assert sim.emit(v.event, **v.expect) == v.response.encode() + b"\r\n", v.name
    framer, lines = PROFILE.transport.decoder(), []
    while len(lines) < len(PROFILE.test_vectors) and select.select([pty_pair.slave], [], [], 2)[0]:
        lines += framer.feed(os.read(pty_pair.slave, 4096))
    assert lines == [v.response.encode() for v in PROFILE.test_vectors]


def test_strikes_reach_the_driver_and_noise_is_survived(pty_pair):
    async def main() -> tuple[list[Strike], LightningSensorDriver, list[str]]:
        strikes: list[Strike] = []
        events: list[str] = []
        sim = LightningSim(pty_pair.master, PROFILE, seed=3)
        drv = LightningSensorDriver(pty_pair.path, "lightning-as3935-bridge", strikes.append,
                                    on_event=lambda k, d: events.append(k), clock=lambda: 1234.5)
        await drv.start()
        assert await drv.transport.wait_open(3)
        sim.strike(8, 123456)
        sim.disturber()
        os.write(pty_pair.master, b"\x07\xfe\x00garbage\x99\r\nHELLO BRIDGE v1\r\n")
        sim.strike(None, 2000)          # seen but out of range
        sim.strikes(3, 4)
        assert await until(lambda: len(strikes) == 5)
        await drv.stop()
        return strikes, drv, events

    strikes, drv, events = asyncio.run(main())
    assert strikes[0] == Strike(1234.5, 8.0, 123456)
    assert strikes[1] == Strike(1234.5, None, 2000)
    assert [s.distance_km for s in strikes[2:]] == [4.0] * 3
    assert all(20_000 <= s.energy < 600_000 for s in strikes[2:])
    assert drv.counts == {"strike": 5, "disturber": 1, "noise": 0, "unparsed": 1}
    assert events.count("garbage") == 1 and "disturber" in events
    assert drv.transport.decoder.stats["garbage_lines"] == 1


def test_wrong_kind_of_profile_is_refused():
    with pytest.raises(ValueError, match="is a transmitter profile, not a lightning_sensor"):
        LightningSensorDriver("/dev/null", "exciter-ascii-v2", lambda s: None)

"""RDS encoder driver (UECP) against the transmitter simulator's encoder side, over ptys."""
from __future__ import annotations

import asyncio
import os
import select
from pathlib import Path

import pytest
from support.serialpair import PtyPair

from device_drivers import uecp
from device_drivers.profiles import PROFILE_DIR, load_profile
from device_drivers.rds_encoder import RdsEncoderDriver, RdsUnreachable
from device_drivers.sim.transmitter_sim import TransmitterSim

PROFILE = load_profile("uecp-encoder")
METHODS = {"set_pty": lambda d, a: d.set_pty(a["pty"]), "set_pi": lambda d, a: d.set_pi(a["pi"]),
           "set_ta_tp": lambda d, a: d.set_ta_tp(a["ta"], a["tp"])}


async def until(cond, timeout: float = 5.0) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end and not cond():
        await asyncio.sleep(0.02)
    return bool(cond())


def drain(fd: int, quiet: float = 0.3) -> bytes:
    out = b""
    while select.select([fd], [], [], quiet)[0]:
        out += os.read(fd, 4096)
    return out


def test_profile_says_no_acks_and_ships_the_pty31_golden_frame():
    assert PROFILE.uecp.acks is False and PROFILE.uecp.repeat >= 2
    golden = next(v for v in PROFILE.test_vectors if v.command == "set_pty")
    assert bytes.fromhex(golden.request) == bytes.fromhex("FE 00 00 00 04 07 00 00 1F F5 34 FF")


def test_vectors_from_the_driver_are_the_bytes_on_the_wire(pty_pair):
    """Every vector: the driver's method puts exactly `request` on the wire, `repeat` times."""
    async def main() -> dict[str, bytes]:
        drv = RdsEncoderDriver(pty_pair.path, PROFILE)
        await drv.start()
        assert await drv.transport.wait_open(3)
        wire = {}
        for v in PROFILE.test_vectors:
            await METHODS[v.command](drv, v.args)
            wire[v.name] = await asyncio.to_thread(drain, pty_pair.master)
        await drv.stop()
        return wire

    wire = asyncio.run(main())
    for v in PROFILE.test_vectors:
        assert wire[v.name] == bytes.fromhex(v.request) * PROFILE.uecp.repeat, v.name
        # and the profile's own framing description (independent CRC code) accepts it
        assert PROFILE.transport.decoder().feed(bytes.fromhex(v.request)), v.name


def test_vectors_into_the_simulator_set_rds_state(pty_pair):
    async def main() -> list[tuple[str, dict]]:
        tx = PtyPair()
        sim = TransmitterSim(tx.master, "exciter-ascii-v2", rds_master_fd=pty_pair.master)
        await sim.start()
        seen = []
        for v in PROFILE.test_vectors:
            before = sim.uecp_decoder.stats["frames"]
            os.write(pty_pair.slave, bytes.fromhex(v.request))
            assert await until(lambda b=before: sim.uecp_decoder.stats["frames"] > b)
            seen.append((v.name, dict(sim.rds)))
        await sim.stop()
        tx.close()
        return seen

    for (name, rds), v in zip(asyncio.run(main()), PROFILE.test_vectors, strict=True):
        want = {k: (f"{x:04X}" if k == "pi" else x) for k, x in v.expect.items()}
        assert {k: rds[k] for k in want} == want, name


def test_driver_to_simulator_rds_and_data_channel(pty_pair):
    async def main() -> tuple[TransmitterSim, list[bytes], list[dict]]:
        tx = PtyPair()
        data, truth = [], []
        sim = TransmitterSim(tx.master, "exciter-ascii-v2", rds_master_fd=pty_pair.master,
                             on_change=truth.append, on_rds_data=data.append)
        await sim.start()
        drv = RdsEncoderDriver(pty_pair.path, "uecp-encoder", site_address=5, encoder_address=3)
        await drv.start()
        assert await drv.transport.wait_open(3)
        await drv.set_pi("C201")
        await drv.set_ps("Bình Lư")
        await drv.set_pty(31)
        await drv.set_ta_tp(True, True)
        await drv.set_rt("Bão đang đến")
        await drv.send_data(b"LX*101#", channel=5)
        await drv.send_data(b"LX#101*", channel=5, repeat=1)
        with pytest.raises(uecp.UecpError, match="PS is 10 characters; at most 8"):
            await drv.set_ps("Xã Bình Lư")
        assert await until(lambda: len(data) == 4)
        await drv.stop()
        await sim.stop()
        tx.close()
        return sim, data, truth

    sim, data, truth = asyncio.run(main())
    assert sim.rds == {"pi": "C201", "ps": "Binh Lu", "pty": 31, "ta": True, "tp": True,
                       "rt": "Bao dang den"}
    assert truth[-1]["rds"]["pty"] == 31 and truth[-1]["rds"]["ta"] is True
    assert data == [b"LX*101#"] * 3 + [b"LX#101*"]   # profile repeat 3; caller override 1
    assert sim.uecp_decoder.stats["bad_crc"] == 0


def _acking_profile(tmp_path: Path):
    text = (PROFILE_DIR / "uecp-encoder.yaml").read_text()
    p = tmp_path / "uecp-acking.yaml"
    p.write_text(text.replace("acks: false", "acks: true").replace("command_timeout_s: 0.5",
                                                                   "command_timeout_s: 0.2"))
    return load_profile(p)


def test_acking_encoder_is_waited_for_and_silence_is_unreachable(pty_pair, tmp_path):
    prof = _acking_profile(tmp_path)
    assert prof.uecp.acks is True

    async def main(acks: bool) -> tuple[list, list[str], int]:
        tx, events, data = PtyPair(), [], []
        sim = TransmitterSim(tx.master, "exciter-ascii-v2", rds_master_fd=pty_pair.master,
                             on_rds_data=data.append, rds_acks=acks)
        await sim.start()
        drv = RdsEncoderDriver(pty_pair.path, prof, on_event=lambda k, d: events.append(k))
        await drv.start()
        assert await drv.transport.wait_open(3)
        try:
            await drv.send_data(b"LX*000#", channel=5)
            result = "ok"
        except RdsUnreachable:
            result = "unreachable"
        await drv.stop()
        await sim.stop()
        tx.close()
        return [result, drv.reachable], events, len(data)

    ok, events, copies = asyncio.run(main(True))
    assert ok == ["ok", True] and copies == 1 and events == []   # ACKed: sent once, no repeats
    bad, events, copies = asyncio.run(main(False))
    assert bad == ["unreachable", False] and events == ["unreachable"]
    assert copies == 1 + prof.timeouts.retries                    # each retry reached the encoder

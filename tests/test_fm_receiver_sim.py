"""FM receiver simulator: only the addressed receivers play, judged from the air audio itself."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.audio import capture_env

from device_drivers import fm_signalling as sig
from device_drivers import uecp
from device_drivers.fm_addressing import FmAddress, plan_codes
from device_drivers.fm_profile import FmReceiverSpec
from device_drivers.sim.fm_receiver_sim import FmAirMonitor, FmReceiverSim

ROOT = Path(__file__).resolve().parent.parent
R = 48000
DTMF = FmReceiverSpec(signalling="dtmf")
RDS = FmReceiverSpec(signalling="rds", rds={"tdc_channel": 5, "prefix": "LX"})
ZONES = {"1": ["fm01", "fm02", "fm03"], "2": ["fm04", "fm05", "fm06"], "3": ["fm07", "fm08"]}
CLUSTERS = {c: FmAddress(f"{100 + int(c[2:]):03d}", [z]) for z, cs in ZONES.items() for c in cs}


def programme(seconds=1.0, dbfs=-20.0):
    t = np.arange(int(R * seconds)) / R
    return (10 ** (dbfs / 20) * np.sqrt(2) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def s16(x):
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def rig(path, spec=DTMF, carrier=lambda: True, clock=None):
    changes = []
    sims = [FmReceiverSim(c, a.address, a.groups, spec) for c, a in CLUSTERS.items()]
    mon = FmAirMonitor(path, sims, carrier_on=carrier, clock=clock or time.monotonic,
                       on_change=lambda c, p, v: changes.append((c, p, v)))
    return mon, changes


def playing(mon):
    return {r.cluster_id for r in mon.receivers if r.playing}


def test_exactly_the_addressed_receivers_play_then_release(tmp_path):
    raw = tmp_path / "air.raw"
    targets = set(ZONES["2"]) | {"fm01"}
    plan = plan_codes(targets, CLUSTERS)
    assert plan.wake_codes(DTMF) == ["*92#", "*101#"]
    raw.write_bytes(s16(np.concatenate([np.zeros(R // 2), sig.wake_audio(plan, DTMF, R, volume=7),
                                        programme(1.0)])))
    mon, changes = rig(raw)
    while mon.poll(max_bytes=9600) > 0:  # in small pieces, as a tail would see it
        pass
    assert playing(mon) == targets
    assert {c for c, p, _ in changes if p} == targets
    assert all(mon.receiver(c).volume == 7 for c in targets)
    assert all(r.volume is None for r in mon.receivers if r.cluster_id not in targets)
    with raw.open("ab") as f:
        f.write(s16(np.concatenate([sig.release_audio(plan, DTMF, R), programme(0.5)])))
    mon.poll()
    assert playing(mon) == set() and not any(r.enabled for r in mon.receivers)
    assert changes[-len(targets):] and {c for c, p, _ in changes[-len(targets):] if not p} == targets


def test_codes_alone_do_not_count_as_playing(tmp_path):
    raw = tmp_path / "air.raw"
    plan = plan_codes(set(CLUSTERS), CLUSTERS)
    raw.write_bytes(s16(np.concatenate([np.zeros(R // 2), sig.wake_audio(plan, DTMF, R, volume=3),
                                        np.zeros(R // 2)])))
    mon, changes = rig(raw)
    mon.poll()
    assert all(r.enabled for r in mon.receivers) and playing(mon) == set()
    assert all(p is False for _, p, _ in changes)  # only volume changes so far


def test_silence_after_programme_stops_playing(tmp_path):
    raw = tmp_path / "air.raw"
    plan = plan_codes({"fm07"}, CLUSTERS)
    raw.write_bytes(s16(np.concatenate([np.zeros(R // 2), sig.wake_audio(plan, DTMF, R), programme(0.5),
                                        np.zeros(3 * R)])))
    mon, changes = rig(raw)
    mon.poll()
    assert [(c, p) for c, p, _ in changes] == [("fm07", True), ("fm07", False)]
    assert mon.receiver("fm07").enabled


def test_asleep_without_carrier_and_wake_delay(tmp_path):
    raw = tmp_path / "air.raw"
    plan = plan_codes({"fm04"}, CLUSTERS)
    carrier = {"on": False}
    mon, _ = rig(raw, carrier=lambda: carrier["on"])
    raw.write_bytes(s16(np.concatenate([sig.wake_audio(plan, DTMF, R), programme(0.5)])))
    mon.poll()
    assert mon.receiver("fm04").state == "asleep" and playing(mon) == set()
    # carrier up, but the code comes before the receiver's decoder is ready (500 ms)
    carrier["on"] = True
    with raw.open("ab") as f:
        f.write(s16(np.concatenate([np.zeros(R // 10), sig.wake_audio(plan, DTMF, R)[R // 4:], programme(0.5)])))
    mon.poll()
    assert mon.receiver("fm04").state == "awake"
    with raw.open("ab") as f:
        f.write(s16(np.concatenate([sig.wake_audio(plan, DTMF, R), programme(0.5)])))
    mon.poll()
    assert playing(mon) == {"fm04"}


def test_carrier_drop_mutes_then_disables_after_delay(tmp_path):
    raw = tmp_path / "air.raw"
    clock = Clock()
    carrier = {"on": True}
    mon, changes = rig(raw, carrier=lambda: carrier["on"], clock=clock)
    plan = plan_codes(set(ZONES["3"]), CLUSTERS)
    raw.write_bytes(s16(np.concatenate([np.zeros(R), sig.wake_audio(plan, DTMF, R), programme(0.5)])))
    mon.poll()
    assert playing(mon) == set(ZONES["3"])
    carrier["on"] = False
    clock.t += 1
    mon.poll()
    assert playing(mon) == set() and all(mon.receiver(c).enabled for c in ZONES["3"])
    clock.t += DTMF.sleep_after_carrier_drop_s
    mon.poll()
    assert not any(r.enabled for r in mon.receivers)
    assert mon.receiver("fm07").state == "asleep"


def test_rds_codes_from_uecp_switch_rds_receivers(tmp_path):
    raw = tmp_path / "air.raw"
    mon, changes = rig(raw, spec=RDS)
    targets = set(ZONES["1"]) | {"fm08"}
    msgs = sig.rds_wake(plan_codes(targets, CLUSTERS), RDS, volume=5)
    wire = b"".join(uecp.encode_frame([m.element], sqc=i + 1) for i, m in enumerate(msgs))
    dec = uecp.UecpDecoder()  # what the transmitter simulator does with the serial bytes
    raw.write_bytes(s16(np.zeros(R)))
    mon.poll()
    for f in dec.feed(b"\x00garbage" + wire):
        for el in f.elements:
            if isinstance(el, uecp.Tdc) and el.channel == RDS.rds.tdc_channel:
                mon.rds_data(el.data)
    with raw.open("ab") as f:
        f.write(s16(programme(0.5)))
    mon.poll()
    assert playing(mon) == targets
    assert {mon.receiver(c).volume for c in targets} == {5}
    # DTMF in the audio means nothing to an RDS receiver
    with raw.open("ab") as f:
        f.write(s16(sig.dtmf_audio(["#000*"], DTMF, R)))
    mon.poll()
    assert playing(mon) == targets


def test_monitor_thread_tails_a_growing_file(tmp_path):
    raw = tmp_path / "air.raw"
    mon, changes = rig(raw)
    mon.start()
    try:
        plan = plan_codes({"fm02", "fm05"}, CLUSTERS)
        audio = s16(np.concatenate([np.zeros(R // 4), sig.wake_audio(plan, DTMF, R), programme(0.6)]))
        with raw.open("wb") as f:
            for i in range(0, len(audio), 4801):  # odd-sized writes split samples in half
                f.write(audio[i:i + 4801])
                f.flush()
        deadline = time.monotonic() + 5
        while playing(mon) != {"fm02", "fm05"} and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        mon.stop()
    assert playing(mon) == {"fm02", "fm05"}


PLAYER = r'''
import sys
import numpy as np
import sounddevice as sd
x = np.fromfile(sys.argv[1], dtype=np.float32)
sd.play(x, 48000, blocking=True)
'''


def test_real_alsa_path_wakes_exactly_the_targets(tmp_path):
    env, raw = capture_env(tmp_path / "audio", rate=R)
    targets = set(ZONES["1"]) | {"fm05"}
    plan = plan_codes(targets, CLUSTERS)
    audio = np.concatenate([np.zeros(R // 2, dtype=np.float32), sig.wake_audio(plan, DTMF, R, volume=8),
                            programme(1.0), sig.release_audio(plan, DTMF, R)])
    src = tmp_path / "air.f32"
    audio.astype(np.float32).tofile(src)
    changes = []
    sims = [FmReceiverSim(c, a.address, a.groups, DTMF) for c, a in CLUSTERS.items()]
    mon = FmAirMonitor(raw, sims, on_change=lambda c, p, v: changes.append((c, p, v))).start()
    try:
        proc = subprocess.run([sys.executable, "-c", PLAYER, str(src)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        mon.stop()
    assert raw.stat().st_size >= 2 * len(audio) * 0.99
    assert {c for c, p, _ in changes if p} == targets
    assert {c: v for c, p, v in changes if p} == dict.fromkeys(targets, 8)
    assert playing(mon) == set()  # released after the programme
    assert [k for k, _ in mon.keys] == list("".join(plan.wake_codes(DTMF) + ["*D8#"] + plan.release_codes(DTMF)))


@pytest.mark.parametrize("junk", [b"", b"\x01"])
def test_missing_then_truncated_file(tmp_path, junk):
    raw = tmp_path / "air.raw"
    mon, _ = rig(raw)
    assert mon.poll() == 0  # not created yet: nothing, no error
    raw.write_bytes(s16(np.zeros(3 * R)) + junk)
    mon.poll()
    raw.write_bytes(s16(np.concatenate([sig.wake_audio(plan_codes({"fm03"}, CLUSTERS), DTMF, R),
                                        programme(0.5)])))  # shorter than before: a new stream
    mon.poll()
    assert playing(mon) == {"fm03"}


def test_replaced_file_is_a_new_stream(tmp_path):
    raw = tmp_path / "air.raw"
    mon, _ = rig(raw)
    raw.write_bytes(s16(np.zeros(R)))  # carrier up for longer than the wake delay
    mon.poll()
    new = tmp_path / "air.new"
    new.write_bytes(s16(np.concatenate([sig.wake_audio(plan_codes({"fm06"}, CLUSTERS), DTMF, R),
                                        programme(0.5)])))
    new.replace(raw)
    mon.poll()
    assert playing(mon) == {"fm06"}

"""Playout through the real sounddevice -> PortAudio -> ALSA path, captured to a file.

ALSA reads its configuration when sounddevice is imported, so each scenario runs the
player in a subprocess with the capture environment; the test then listens to the file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.audio import capture_env

ROOT = Path(__file__).resolve().parent.parent
RATE = 48000

SCRIPT = r'''
import asyncio, json, os, sys, time
import numpy as np
from controller.playout import AudioDeviceMissing, Player, device_present, list_devices

R = 48000
def tone(freq, seconds, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(R * seconds)) / R)).astype(np.float32)

def res(r):
    return {"outcome": r.outcome, "reason": r.reason, "frames": r.frames,
            "started_at": r.started_at, "broadcast_id": r.broadcast_id}

async def tone2s(p):
    levels, started = [], []
    t0 = time.monotonic()
    r = await p.play(tone(1000, 2.0), broadcast_id="b1", on_started=started.append,
                     on_level=levels.append)
    return {**res(r), "wall": time.monotonic() - t0, "t0": t0, "levels": levels,
            "started": started}

async def stop_early(p):
    task = asyncio.create_task(p.play(tone(1000, 2.0)))
    await asyncio.sleep(0.5)
    t = time.monotonic()
    p.stop()
    r = await task
    return {**res(r), "stop_to_end": time.monotonic() - t}

async def iterator_and_preempt(p):
    async def blocks():
        x = tone(440, 1.0)
        for i in range(0, len(x), 1234):
            yield x[i:i + 1234]
            await asyncio.sleep(0)
    first = await p.play(blocks())
    long = asyncio.create_task(p.play(tone(660, 5.0), broadcast_id="long"))
    await asyncio.sleep(0.4)
    t = time.monotonic()
    second = await p.play(tone(880, 0.5), broadcast_id="urgent")  # preempts "long"
    return {"first": res(first), "long": res(await long), "second": res(second),
            "wall_second": time.monotonic() - t}

async def failing_source(p):
    async def blocks():
        yield tone(440, 0.2)
        await asyncio.sleep(0.1)
        raise ConnectionError("relay dropped")
    t = time.monotonic()
    r = await p.play(blocks())
    return {**res(r), "wall": time.monotonic() - t}

async def long_play(p):
    t = time.monotonic()
    r = await p.play(tone(1000, 3.0))
    return {**res(r), "wall": time.monotonic() - t}

async def cancelled(p):
    task = asyncio.create_task(p.play(tone(660, 5.0)))
    await asyncio.sleep(0.3)
    task.cancel()
    t = time.monotonic()
    r = await p.play(tone(880, 0.3))  # waits for the cancelled one to leave the air
    return {**res(r), "wall": time.monotonic() - t, "cancelled": task.cancelled()}

async def idle_silence(p):
    r = await p.play(tone(1000, 0.3))
    await asyncio.sleep(0.6)
    return res(r)

async def no_device(p):
    out = {"present": device_present(p.device), "devices": list_devices()}
    try:
        await p.play(tone(1000, 0.1))
        out["raised"] = None
    except AudioDeviceMissing as e:
        out["raised"] = str(e)
    return out

async def main():
    name, kw = sys.argv[1], json.loads(sys.argv[2])
    p = Player(**kw)
    try:
        out = await globals()[name](p)
    finally:
        p.close()
    print("RESULT " + json.dumps({**out, "wedged": p.wedged}), flush=True)
    if p.wedged:  # a writer stuck in PortAudio would also block PortAudio's atexit
        os._exit(0)

asyncio.run(main())
'''


def run_player(tmp_path, scenario, env=None, raw=None, timeout=20, watch=None, **player_kw):
    """Run SCRIPT's `scenario`; returns (result dict, captured air or None).

    `watch`, a list, receives (monotonic time, bytes on air) samples of the capture file
    as it grows, the way a receiver simulator tailing it would hear the programme.
    """
    if env is None:
        env, raw = capture_env(tmp_path / "audio", rate=RATE)
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, scenario, json.dumps(player_kw)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if watch is not None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if raw.is_file():
                watch.append((time.monotonic(), raw.stat().st_size))
            time.sleep(0.02)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout + stderr
    air = None
    if raw is not None and raw.is_file():
        air = np.fromfile(raw, dtype="<i2").astype(np.float32) / 32768
    return json.loads(lines[-1][7:]), air


def dominant_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * RATE / len(x)


def rms_db(x):
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-12)


def test_tone_lands_on_air_with_right_frequency_length_level_and_pace(tmp_path):
    growth = []
    r, air = run_player(tmp_path, "tone2s", watch=growth)
    assert r["outcome"] == "finished" and r["reason"] is None and r["broadcast_id"] == "b1"
    assert len(air) == 2 * RATE  # every sample, nothing more (stream closed once idle)
    assert abs(dominant_hz(air) - 1000) < 1
    assert abs(rms_db(air) - rms_db(0.5 * np.sin(np.linspace(0, 200 * np.pi, 48000)))) < 0.1
    # paced against the clock although the capture sink accepts data at once: the file
    # grows in real time, never more than the lead (0.1 s) plus polling slack ahead
    t_first = next(t for t, size in growth if size > 0)
    ahead = [size / 2 / RATE - (t - t_first) for t, size in growth if 0 < size < 4 * RATE]
    assert len(ahead) > 20 and max(ahead) < 0.3
    assert 1.9 < r["wall"] < 2.6
    assert r["started"] == [r["started_at"]] and 0 <= r["started_at"] - r["t0"] < 0.5
    # level reports: low rate (every 200 ms), RMS dBFS of what is on air
    assert 8 <= len(r["levels"]) <= 11
    assert all(abs(lv - (-9.03)) < 0.1 for lv in r["levels"])


def test_stop_ends_early_with_a_fade_not_a_click(tmp_path):
    r, air = run_player(tmp_path, "stop_early")
    assert r["outcome"] == "stopped" and r["reason"] == "stopped"
    assert 0.4 * RATE < len(air) < 0.8 * RATE
    assert r["stop_to_end"] < 0.5
    fade = air[-int(0.05 * RATE):]
    env = np.abs(fade).reshape(-1, 240).max(axis=1)  # 5 ms envelope over the last 50 ms
    assert env[0] > 0.4 and env[-1] < 0.05
    assert np.all(np.diff(env) < 0.01)  # falls steadily
    assert np.max(np.abs(air[-48:])) < 0.01  # ends at silence: no click


def test_async_blocks_play_gapless_and_preemption_hands_over(tmp_path):
    r, air = run_player(tmp_path, "iterator_and_preempt")
    assert r["first"]["outcome"] == "finished" and r["first"]["frames"] == RATE
    assert r["long"]["outcome"] == "stopped" and r["long"]["reason"] == "preempted"
    assert r["second"]["outcome"] == "finished" and r["second"]["frames"] == RATE // 2
    first = air[:RATE]
    assert abs(dominant_hz(first) - 440) < 1
    win = first.reshape(-1, 480)  # no gaps: every 10 ms window carries the tone
    assert np.sqrt((win**2).mean(axis=1)).min() > 0.3
    tail = air[-RATE // 2:]
    assert abs(dominant_hz(tail) - 880) < 2
    middle = air[RATE: -RATE // 2]  # what "long" managed before being preempted
    assert 0.25 * RATE < len(middle) < 0.7 * RATE
    assert abs(dominant_hz(middle) - 660) < 3
    assert r["wall_second"] < 0.5 + 0.5  # preemption itself is immediate


def test_failing_source_reports_failed_with_reason(tmp_path):
    r, air = run_player(tmp_path, "failing_source")
    assert r["outcome"] == "failed"
    assert "source failed: ConnectionError: relay dropped" in r["reason"]
    assert r["wall"] < 1.0
    assert r["frames"] == int(0.2 * RATE)


def test_cancelled_play_leaves_the_air_at_once(tmp_path):
    r, air = run_player(tmp_path, "cancelled")
    assert r["cancelled"] and r["outcome"] == "finished"
    assert r["wall"] < 0.3 + 0.5
    assert len(air) < 0.8 * RATE  # 5 s tone cut after ~0.3 s, then 0.3 s of the next
    assert abs(dominant_hz(air[-int(0.3 * RATE):]) - 880) < 4


def _fifo_env(tmp_path):
    env, _ = capture_env(tmp_path / "audio", rate=RATE)
    fifo = tmp_path / "audio" / "air.fifo"
    os.mkfifo(fifo)
    env["LOAXA_AUDIO_CAPTURE"] = str(fifo)
    return env, fifo


def test_device_lost_mid_play_fails_at_once(tmp_path):
    env, fifo = _fifo_env(tmp_path)

    def listener():  # the "card": takes ~0.3 s of audio, then vanishes
        with open(fifo, "rb") as f:
            got = 0
            while got < 0.3 * RATE * 2:
                got += len(f.read(4096))

    t = threading.Thread(target=listener)
    t.start()
    r, _ = run_player(tmp_path, "long_play", env=env)
    t.join()
    assert r["outcome"] == "failed" and r["reason"].startswith("audio device error")
    assert r["wall"] < 1.5
    assert r["wedged"] is False


def test_device_that_stops_accepting_audio_does_not_hang(tmp_path):
    env, fifo = _fifo_env(tmp_path)
    stop = threading.Event()

    def stuck_reader():  # opens the "device" but never consumes: writes block forever
        with open(fifo, "rb"):
            stop.wait(30)

    t = threading.Thread(target=stuck_reader)
    t.start()
    try:
        r, _ = run_player(tmp_path, "long_play", env=env, stall_timeout_s=0.5)
    finally:
        stop.set()
        t.join()
    assert r["outcome"] == "failed" and "stalled" in r["reason"]
    assert r["wall"] < 2.0
    assert r["wedged"] is True


def test_idle_policy_silence_keeps_writing_paced_silence(tmp_path):
    r, air = run_player(tmp_path, "idle_silence", idle_policy="silence")
    assert r["outcome"] == "finished"
    sound = np.flatnonzero(air)
    start, end = sound[0], sound[-1] + 1
    assert start < 0.3 * RATE  # the stream was already carrying silence before the programme
    assert abs((end - start) - 0.3 * RATE) < 10
    assert abs(dominant_hz(air[start:end]) - 1000) < 5
    after = air[end:]
    assert 0.4 * RATE < len(after) < 1.0 * RATE  # kept flowing while idle, at real-time pace


def test_no_audio_device_is_a_clear_error_not_an_import_failure(tmp_path):
    conf = tmp_path / "nocard.conf"  # the default PCM points at a sound card that is absent
    conf.write_text("pcm.!default {\n type hw\n card 99\n}\n")
    env = dict(os.environ, ALSA_CONFIG_PATH=str(conf))
    r, _ = run_player(tmp_path, "no_device", env=env)
    assert r["present"] is False and r["devices"] == []
    assert r["raised"] and "not found" in r["raised"]


def test_named_device_absent(tmp_path):
    r, _ = run_player(tmp_path, "no_device", device="USB Audio CODEC")
    assert r["present"] is False
    assert r["raised"] == "audio device 'USB Audio CODEC' not found"


@pytest.mark.parametrize("policy", ["bogus"])
def test_bad_idle_policy_is_rejected(policy):
    from controller.playout import Player

    with pytest.raises(ValueError, match="idle_policy must be one of"):
        Player(idle_policy=policy)


def test_import_and_construct_need_no_device():
    # This process may have no ALSA device at all; importing and constructing must work.
    t = time.monotonic()
    from controller.playout import Player

    Player(device="definitely-missing")
    assert time.monotonic() - t < 5

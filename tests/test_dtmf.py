"""DTMF: Q.23 frequencies, Q.24-style acceptance/rejection, timing, noise, and real speech."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.dtmf import KEY_FREQS, DtmfDecoder, synthesize

R = 48000
ALL = "123A456B789C*0#D"


def pad(x, before_ms=50, after_ms=100, rate=R):
    return np.concatenate([np.zeros(int(rate * before_ms / 1000)), x, np.zeros(int(rate * after_ms / 1000))])


def two_tone(lo, hi, ms, rate=R, a_lo=0.3, a_hi=0.3):
    t = np.arange(int(rate * ms / 1000)) / rate
    return a_lo * np.sin(2 * np.pi * lo * t) + a_hi * np.sin(2 * np.pi * hi * t)


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_all_keys_at_minimum_timing(rate):
    x = synthesize(ALL, rate, tone_ms=40, gap_ms=40, level_dbfs=-10)
    assert "".join(DtmfDecoder(rate).feed(pad(x, rate=rate))) == ALL


def test_synthesis_frequencies_are_q23():
    x = synthesize("5", R, tone_ms=1000, gap_ms=0, level_dbfs=-6)
    spec = np.abs(np.fft.rfft(x))
    freqs = np.fft.rfftfreq(len(x), 1 / R)
    top = sorted(freqs[np.argsort(spec)[-2:]])
    assert top == pytest.approx([770, 1336], abs=1.5)
    assert 20 * np.log10(np.max(np.abs(x))) == pytest.approx(0.0, abs=0.1)  # two tones at -6 dBFS peak


@pytest.mark.parametrize("dev", [-0.015, 0.015])
def test_accepts_within_1_5_percent(dev):
    for key, (lo, hi) in KEY_FREQS.items():
        assert DtmfDecoder(R).feed(pad(two_tone(lo * (1 + dev), hi * (1 + dev), 60))) == [key], key


@pytest.mark.parametrize("dev", [-0.035, 0.035])
def test_rejects_beyond_3_5_percent(dev):
    for lo, hi in KEY_FREQS.values():
        assert DtmfDecoder(R).feed(pad(two_tone(lo * (1 + dev), hi * (1 + dev), 60))) == []
        assert DtmfDecoder(R).feed(pad(two_tone(lo * (1 + dev), hi, 60))) == []
        assert DtmfDecoder(R).feed(pad(two_tone(lo, hi * (1 - dev), 60))) == []


def test_single_tone_is_not_a_key():
    assert DtmfDecoder(R).feed(pad(two_tone(770, 1336, 200, a_hi=0.0))) == []


@pytest.mark.parametrize("twist", [-6.0, 4.0])
def test_twist_and_low_level_accepted(twist):
    x = synthesize("159#", R, 50, 50, level_dbfs=-30, twist_db=twist)
    assert DtmfDecoder(R).feed(pad(x)) == list("159#")


def test_excessive_twist_rejected():
    assert DtmfDecoder(R).feed(pad(synthesize("1", R, 80, 0, -10, twist_db=12))) == []


def test_key_reported_once_per_press_even_if_long():
    x = synthesize("77", R, tone_ms=1000, gap_ms=60, level_dbfs=-10)
    assert DtmfDecoder(R).feed(pad(x)) == ["7", "7"]


def test_too_short_tone_not_detected():
    assert DtmfDecoder(R).feed(pad(synthesize("1", R, 15, 0, -10))) == []


def test_short_gaps_need_a_profile_that_allows_them():
    x = synthesize("0000", R, tone_ms=40, gap_ms=30, level_dbfs=-10)
    assert DtmfDecoder(R, min_tone_ms=40, min_gap_ms=30).feed(pad(x)) == list("0000")


def test_noise_at_15_db_snr():
    rng = np.random.default_rng(3)
    x = pad(synthesize(ALL, R, 50, 50, level_dbfs=-20))
    noisy = x + rng.normal(0, 10 ** (-35 / 20), len(x))
    assert "".join(DtmfDecoder(R).feed(noisy)) == ALL


def test_chunking_does_not_change_the_result():
    x = pad(synthesize("*101#*92#", R, 50, 50, -12))
    whole = DtmfDecoder(R).feed_timed(x)
    d = DtmfDecoder(R)
    parts = []
    for i in range(0, len(x), 777):
        parts += d.feed_timed(x[i:i + 777])
    assert parts == whole and "".join(k for k, _ in whole) == "*101#*92#"


def test_event_positions_follow_the_tones():
    x = pad(synthesize("12", R, 100, 400, -10), before_ms=500)
    (k1, p1), (k2, p2) = DtmfDecoder(R).feed_timed(x)
    assert abs(p1 - 0.5 * R) < 0.03 * R and abs(p2 - 1.0 * R) < 0.03 * R


def test_invalid_key_rejected():
    with pytest.raises(ValueError, match="not DTMF"):
        synthesize("12X", R)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is required (apt-get install espeak-ng)")
    wav = tmp_path_factory.mktemp("speech") / "vi.wav"
    text = ("Xin chào bà con, đây là đài truyền thanh xã Bình Lư. Bão số ba đang đến gần, "
            "bà con chú ý chằng chống nhà cửa. Một, hai, ba, bốn, năm, sáu, bảy, tám, chín, mười.")
    subprocess.run(["espeak-ng", "-v", "vi", "-w", str(wav), text], check=True, capture_output=True)
    x, sr = sf.read(wav, dtype="float32")
    return soxr.resample(x, sr, R)


@pytest.mark.parametrize("gain", [0.3, 1.0, 3.0])
def test_real_vietnamese_speech_gives_no_keys(speech, gain):
    assert len(speech) > 5 * R
    assert DtmfDecoder(R).feed(np.clip(speech * gain, -1, 1)) == []


def test_keys_still_found_after_speech(speech):
    x = np.concatenate([speech, pad(synthesize("*000#", R, 70, 70, -10))])
    assert DtmfDecoder(R).feed(x) == list("*000#")


def test_music_like_chords_give_no_keys():
    t = np.arange(R * 4) / R
    rng = np.random.default_rng(0)
    m = sum(0.04 / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6))
            for f0 in (220, 261.6, 329.6, 392, 440, 523.3) for h in range(1, 8))
    assert DtmfDecoder(R).feed(m) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 2), st.integers(0, 2**32 - 1)), max_size=6))
def test_fuzz_random_audio_no_crash_bounded(chunks):
    d = DtmfDecoder(R)
    for n, amp, seed in chunks:
        x = np.random.default_rng(seed).uniform(-amp, amp, n)
        out = d.feed(x)
        assert all(k in KEY_FREQS for k in out)
        assert len(d._buf) < d.win

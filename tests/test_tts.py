"""TTS through the real espeak-ng: Vietnamese speech, resampled, normalised, cached."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from controller import media
from controller.tts import TTS, VIETNAMESE_VOICES, TTSError

SENTENCE = "Xin chào bà con, chiều nay có mưa to"  # 9 words


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("voice", VIETNAMESE_VOICES)
def test_vietnamese_sentence_is_plausible_speech(tmp_path, voice):
    tts = TTS(tmp_path / "tts", rate=48000, target_lufs=-16.0)
    y = run(tts.synthesize(SENTENCE, voice))
    words = len(SENTENCE.split())
    seconds = len(y) / 48000
    assert 0.15 * words < seconds < 1.0 * words
    # speech-like: energetic frames interleaved with pauses, not a steady tone or silence
    frames = y[: len(y) // 480 * 480].reshape(-1, 480)
    rms_db = 20 * np.log10(np.sqrt((frames**2).mean(axis=1)) + 1e-9)
    assert (rms_db > -30).mean() > 0.4
    assert (rms_db < rms_db.max() - 20).sum() >= 2
    # resampled: energy above espeak's 11 kHz Nyquist would mean no resampling happened
    spec = np.abs(np.fft.rfft(y)) ** 2
    hz = np.fft.rfftfreq(len(y), 1 / 48000)
    assert spec[hz > 11500].sum() < 1e-3 * spec.sum()
    assert abs(media.loudness_lufs(y, 48000) - (-16.0)) <= 1.0
    assert np.max(np.abs(y)) <= 10 ** (-1 / 20) + 1e-3


def test_cache_hit_does_not_rerun_espeak(tmp_path):
    tts = TTS(tmp_path / "tts")
    a = run(tts.synthesize("Thông báo khẩn"))
    b = run(tts.synthesize("Thông báo khẩn"))
    fresh = TTS(tmp_path / "tts")  # after a restart the disk cache still serves it
    c = run(fresh.synthesize("Thông báo khẩn"))
    assert tts.runs == 1 and fresh.runs == 0
    assert np.max(np.abs(a - b)) < 1e-5 and np.max(np.abs(a - c)) < 1e-5
    run(tts.synthesize("Thông báo khẩn", "vi-vn-x-south"))  # other voice: a new rendering
    assert tts.runs == 2


def test_errors_are_clear(tmp_path):
    tts = TTS(tmp_path / "tts")
    with pytest.raises(TTSError, match="unknown espeak-ng voice 'xx-nope'.*vi-vn-x-south"):
        run(tts.synthesize("xin chào", "xx-nope"))
    with pytest.raises(TTSError, match="empty"):
        run(tts.synthesize("   "))
    with pytest.raises(TTSError, match="limit"):
        run(tts.synthesize("a" * 6000))
    missing = TTS(tmp_path / "t2", command="/nonexistent/piper --output_file {out}")
    with pytest.raises(TTSError, match="not found: /nonexistent/piper"):
        run(missing.synthesize("xin chào"))


def test_command_template_engine_reads_text_on_stdin(tmp_path):
    # A locally installed engine is configured as a template; espeak-ng stands in for piper.
    tts = TTS(tmp_path / "tts", command="espeak-ng -v {voice} -w {out} --stdin", rate=16000)
    y = run(tts.synthesize("-- Xin chào; rm -rf /", "vi"))  # text is data, never a shell word
    assert tts.runs == 1
    assert 0.5 < len(y) / 16000 < 6
    assert np.sqrt(np.mean(y**2)) > 0.01

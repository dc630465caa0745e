"""Media decode/normalise/cache and sha256-verified fetch, with real files and a real HTTP server."""
from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from controller import media
from controller.media import AssetCache, ChecksumMismatch, MediaError, MediaTooLarge

FORMATS = [("wav", "WAV", "PCM_16", 44100), ("flac", "FLAC", "PCM_16", 22050),
           ("ogg", "OGG", "VORBIS", 44100), ("opus", "OGG", "OPUS", 48000),
           ("mp3", "MP3", "MPEG_LAYER_III", 44100)]


def tone(sr, seconds=2.0, freq=440.0, amp=0.05, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def dominant_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


@pytest.mark.parametrize("ext,fmt,sub,sr", FORMATS)
def test_each_format_decodes_resamples_and_normalises(tmp_path, ext, fmt, sub, sr):
    src = tmp_path / f"prog.{ext}"
    sf.write(src, tone(sr, channels=2), sr, format=fmt, subtype=sub)
    cache = AssetCache(tmp_path / "cache", rate=48000, target_lufs=-16.0)
    y = cache.load(src)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) / 48000 - 2.0) < 0.1  # codecs pad a little
    assert abs(dominant_hz(y, 48000) - 440) < 2
    assert abs(media.loudness_lufs(y, 48000) - (-16.0)) < 0.5
    assert np.max(np.abs(y)) <= 10 ** (-1 / 20) + 1e-3


def test_loud_peaky_input_is_peak_limited_not_clipped(tmp_path):
    sr = 48000
    x = tone(sr, amp=0.01)
    x[::4800] = 0.9  # sparse clicks: quiet programme, high peaks
    y, info = media.normalise(x, sr, target_lufs=-10.0, peak_dbfs=-1.0)
    assert info["peak_limited"]
    assert media.true_peak(y, sr) <= 10 ** (-1 / 20) * 1.001
    assert media.loudness_lufs(y, sr) < -10.0


def test_silence_and_very_short_clips_pass_unchanged():
    assert np.all(media.normalise(np.zeros(48000, np.float32), 48000)[0] == 0)
    short = tone(48000, seconds=0.1)
    assert np.array_equal(media.normalise(short, 48000)[0], short)


def test_cache_prepares_once_per_content(tmp_path):
    src = tmp_path / "a.wav"
    sf.write(src, tone(44100), 44100)
    cache = AssetCache(tmp_path / "cache")
    first = cache.load(src)
    again = AssetCache(tmp_path / "cache").load(src)  # a fresh process: still cached on disk
    assert cache.prepared == 1
    assert len(list((tmp_path / "cache").glob("*.flac"))) == 1
    assert np.max(np.abs(first - again)) < 1e-5
    sf.write(src, tone(44100, freq=880), 44100)  # content changed: prepared again
    assert abs(dominant_hz(cache.load(src), 48000) - 880) < 2
    assert cache.prepared == 2


def test_garbage_and_missing_files_are_clear_errors(tmp_path):
    bad = tmp_path / "x.mp3"
    bad.write_bytes(b"this is not audio" * 100)
    with pytest.raises(MediaError, match="cannot decode x.mp3"):
        media.decode(bad)
    with pytest.raises(MediaError, match="not found"):
        AssetCache(tmp_path).load(tmp_path / "nope.wav")


@pytest.fixture
def http_files(tmp_path):
    """A real aiohttp server serving bytes at /f/{name}."""
    files: dict[str, bytes] = {}

    async def handler(request):
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return web.Response(body=files[name], content_type="audio/ogg")

    async def start():
        app = web.Application()
        app.router.add_get("/f/{name}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    return files, start


def test_fetch_verified_downloads_once_and_refuses_mismatch(tmp_path, http_files):
    files, start = http_files
    body = np.random.default_rng(1).bytes(300_000)
    files["good"] = body
    good = hashlib.sha256(body).hexdigest()

    async def scenario():
        runner, port = await start()
        try:
            url = f"http://127.0.0.1:{port}/f/good"
            p = await media.fetch_verified(url, good, tmp_path / "dl")
            assert p.read_bytes() == body
            files.pop("good")  # second call is served from the cache, no network
            assert await media.fetch_verified(url, good.upper(), tmp_path / "dl") == p

            files["evil"] = body[:-1] + b"X"
            with pytest.raises(ChecksumMismatch, match="sha256 mismatch.*refused"):
                await media.fetch_verified(f"http://127.0.0.1:{port}/f/evil", good,
                                           tmp_path / "dl2")
            assert list((tmp_path / "dl2").iterdir()) == []  # nothing left behind

            with pytest.raises(MediaTooLarge):
                await media.fetch_verified(f"http://127.0.0.1:{port}/f/evil", "a" * 64,
                                           tmp_path / "dl3", max_bytes=1000)
            with pytest.raises(media.FetchError, match="HTTP 404"):
                await media.fetch_verified(f"http://127.0.0.1:{port}/f/none", "a" * 64,
                                           tmp_path / "dl4")
            with pytest.raises(MediaError, match="64 hex"):
                await media.fetch_verified(url, "abc", tmp_path / "dl5")
            with pytest.raises(MediaError, match="http"):
                await media.fetch_verified("file:///etc/passwd", good, tmp_path / "dl6")
        finally:
            await runner.cleanup()

    asyncio.run(scenario())

"""Stream relay decoding from a real HTTP server, the live Ogg/Opus encoder, and line-in."""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from aiohttp import web
from support.audio import capture_env

from controller.streams import LiveOggStream, OggOpusEncoder, StreamError, relay_blocks

ROOT = Path(__file__).resolve().parent.parent


def tone(sr, seconds, freq, amp=0.3):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def encoded(fmt, sub, sr=44100, seconds=3.0, freq=440.0):
    b = io.BytesIO()
    sf.write(b, tone(sr, seconds, freq), sr, format=fmt, subtype=sub)
    return b.getvalue()


def dominant_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


async def serve(routes):
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def trickle(body, ctype, cut_after=None):
    """A radio-like endless-style response: chunked, no length, arriving in pieces."""
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 4096):
            if cut_after is not None and i >= cut_after:
                request.transport.close()  # the station drops us mid-stream
                return resp
            await resp.write(body[i : i + 4096])
            await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp
    return handler


async def collect(url, **kw):
    blocks = [b async for b in relay_blocks(url, **kw)]
    return np.concatenate(blocks), blocks


@pytest.mark.parametrize("fmt,sub,ctype", [("MP3", "MPEG_LAYER_III", "audio/mpeg"),
                                           ("OGG", "VORBIS", "audio/ogg"),
                                           ("OGG", "OPUS", "application/octet-stream")])
def test_relay_decodes_a_chunked_stream_incrementally(fmt, sub, ctype):
    body = encoded(fmt, sub, sr=48000 if sub == "OPUS" else 44100)

    async def scenario():
        runner, base = await serve({"/live": trickle(body, ctype)})
        try:
            return await collect(f"{base}/live", rate=48000)
        finally:
            await runner.cleanup()

    y, blocks = asyncio.run(scenario())
    assert len(blocks) > 10  # arrived as a stream of blocks, not one lump
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert abs(len(y) / 48000 - 3.0) < 0.1  # resampled to the device rate
    assert abs(dominant_hz(y, 48000) - 440) < 2
    assert 0.15 < np.sqrt(np.mean(y[4800:-4800] ** 2)) < 0.25


def test_relay_errors_are_stream_errors():
    mp3 = encoded("MP3", "MPEG_LAYER_III")

    async def missing(request):
        raise web.HTTPNotFound()

    async def scenario():
        runner, base = await serve({
            "/gone": missing,
            "/noise": trickle(b"\x00garbage, not audio" * 5000, "audio/mpeg"),
            "/drop": trickle(mp3, "audio/mpeg", cut_after=8192),
        })
        errors = {}
        try:
            for name in ("gone", "noise", "drop"):
                try:
                    await collect(f"{base}/{name}")
                    errors[name] = None
                except StreamError as e:
                    errors[name] = str(e)
        finally:
            await runner.cleanup()
        return errors

    errors = asyncio.run(scenario())
    assert "HTTP 404" in errors["gone"]
    assert "decode failed" in errors["noise"]
    assert "connection lost" in errors["drop"]


def test_relay_stops_cleanly_when_consumer_stops_early():
    body = encoded("OGG", "VORBIS", seconds=20)

    async def scenario():
        runner, base = await serve({"/live": trickle(body, "audio/ogg")})
        try:
            got = 0
            agen = relay_blocks(f"{base}/live")
            async for b in agen:
                got += len(b)
                if got > 48000:
                    break
            await agen.aclose()
            return got
        finally:
            await runner.cleanup()

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) > 48000


def test_opus_encoder_pages_decode_back_and_late_joiners_can_decode():
    x = tone(48000, 2.0, 1000)
    live = LiveOggStream(rate=48000, page_ms=100)

    async def scenario():
        early = live.subscribe()
        for i in range(0, len(x) // 2, 960):
            live.feed(x[i : i + 960])
        late = live.subscribe()  # joins 1 s in
        for i in range(len(x) // 2, len(x), 960):
            live.feed(x[i : i + 960])
        live.close()
        out = []
        for q in (early, late):
            pages = []
            while (p := q.get_nowait()) is not None:
                pages.append(p)
            out.append(pages)
        return out

    early, late = asyncio.run(scenario())
    assert len(early) > 15  # ~100 ms pages: low latency for the clusters
    a, sr = sf.read(io.BytesIO(b"".join(early)), dtype="float32")
    assert sr == 48000 and abs(len(a) / sr - 2.0) < 0.1
    assert abs(dominant_hz(a, sr) - 1000) < 2
    b, _ = sf.read(io.BytesIO(b"".join(late)), dtype="float32")
    assert 0.8 < len(b) / sr < 1.2  # got headers + the second half only
    assert abs(dominant_hz(b[2400:], sr) - 1000) < 3


def test_encoder_resamples_non_opus_rates():
    enc = OggOpusEncoder(rate=44100)
    pages = enc.encode(tone(44100, 1.0, 500)) + enc.close()
    y, sr = sf.read(io.BytesIO(b"".join(pages)), dtype="float32")
    assert sr == 48000 and abs(dominant_hz(y, sr) - 500) < 2


LINE_IN = r'''
import asyncio, json
import numpy as np
from controller.streams import live_input_blocks
async def main():
    blocks = []
    async for b in live_input_blocks(rate=48000, blocksize=960):
        blocks.append(b)
        if len(blocks) == 10:
            break
    print("RESULT " + json.dumps({"shapes": [list(b.shape) for b in blocks],
                                  "dtype": str(blocks[0].dtype)}))
    try:
        async for b in live_input_blocks("no-such-input"):
            pass
    except Exception as e:
        print("ERROR " + type(e).__name__ + ": " + str(e))
asyncio.run(main())
'''


def test_line_in_yields_device_rate_blocks_through_portaudio(tmp_path):
    env, _ = capture_env(tmp_path / "audio")
    proc = subprocess.run([sys.executable, "-c", LINE_IN], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=20)
    lines = proc.stdout.splitlines()
    res = json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[7:])
    assert res["shapes"] == [[960]] * 10 and res["dtype"] == "float32"
    err = next(ln for ln in lines if ln.startswith("ERROR "))
    assert err == "ERROR AudioDeviceMissing: audio input 'no-such-input' not found"

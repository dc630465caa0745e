"""The media server IP clusters fetch from: real aiohttp server, real HTTP client."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import numpy as np
import pytest
import yarl

from controller.media_server import MediaServer
from controller.streams import LiveOggStream, relay_blocks

BODY = bytes(range(256)) * 400  # 102400 bytes


@pytest.fixture
def media_file(tmp_path):
    p = tmp_path / "prog.mp3"
    p.write_bytes(BODY)
    return p


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(**kw):
    srv = MediaServer("127.0.0.1", 0, **kw)
    await srv.start()
    return srv


def test_token_url_serves_file_with_type_and_ranges(media_file):
    async def scenario():
        srv = await started()
        try:
            url = srv.register(media_file, ttl_s=60)
            token = url.rsplit("/", 1)[1]
            assert len(token) == 32 and str(media_file) not in url
            async with aiohttp.ClientSession() as s:
                async with s.get(url) as r:
                    assert r.status == 200 and r.content_type == "audio/mpeg"
                    assert await r.read() == BODY
                async with s.get(url, headers={"Range": "bytes=1000-1999"}) as r:
                    assert r.status == 206
                    assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(BODY)}"
                    assert await r.read() == BODY[1000:2000]
                async with s.get(url, headers={"Range": "bytes=-10"}) as r:
                    assert r.status == 206 and await r.read() == BODY[-10:]
            assert srv.register(media_file, ttl_s=60) != url  # a fresh token per broadcast
        finally:
            await srv.stop()

    run(scenario())


def test_unknown_traversal_listing_revoked_and_expired_all_404_alike(media_file, tmp_path):
    async def scenario():
        srv = await started()
        try:
            url = srv.register(media_file, ttl_s=60)
            short = srv.register(media_file, ttl_s=0.2)
            base = srv.base_url
            token = url.rsplit("/", 1)[1]
            probes = [
                "/", "/m", "/m/", f"/m/{token[:-1]}", f"/m/{token}x", "/m/" + "A" * 32,
                "/m/../../etc/passwd", "/m/..%2F..%2Fetc%2Fpasswd", f"/m/{token}/../x",
                f"/m/{media_file.name}", f"/{tmp_path}", "/m/%00" + token[1:],
            ]
            bodies = set()
            async with aiohttp.ClientSession() as s:
                for path in probes:
                    async with s.get(yarl.URL(base + path, encoded=True)) as r:  # sent as is
                        assert r.status == 404, path
                        bodies.add(await r.read())
                srv.revoke(url)
                async with s.get(url) as r:
                    assert r.status == 404
                    bodies.add(await r.read())
                await asyncio.sleep(0.3)
                async with s.get(short) as r:
                    assert r.status == 404
                    bodies.add(await r.read())
            assert len(bodies) == 1 and b"passwd" not in bodies.pop()  # nothing to tell apart
        finally:
            await srv.stop()

    run(scenario())


def test_register_refuses_missing_and_oversized_files(media_file, tmp_path):
    srv = MediaServer(max_file_bytes=1000)
    with pytest.raises(ValueError, match="over the 1000 limit"):
        srv.register(media_file, ttl_s=10)
    with pytest.raises(FileNotFoundError):
        srv.register(tmp_path / "nope.ogg", ttl_s=10)
    with pytest.raises(ValueError, match="ttl_s"):
        MediaServer().register(media_file, ttl_s=0)


def test_tokens_never_logged_in_full(media_file, capsys, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        srv = await started()
        try:
            url = srv.register(media_file, ttl_s=60)
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                await r.read()
            return url.rsplit("/", 1)[1]
        finally:
            await srv.stop()

    token = run(scenario())
    out = capsys.readouterr()
    logged = out.out + out.err + caplog.text
    assert token[:4] + "…" in logged  # the access was logged (at debug), redacted
    assert token not in logged


def test_live_stream_reaches_a_cluster_that_decodes_it():
    """Engine side feeds a live programme; an IP cluster fetches its URL and decodes it."""
    async def scenario():
        srv = await started()
        live = LiveOggStream(rate=48000)
        try:
            url = srv.register(live, ttl_s=60)

            async def programme():  # a live source, paced like a microphone
                x = (0.3 * np.sin(2 * np.pi * 700 * np.arange(96000) / 48000)).astype(np.float32)
                for i in range(0, len(x), 960):
                    yield x[i : i + 960]
                    await asyncio.sleep(0.002)

            async def cluster():
                blocks = [b async for b in relay_blocks(url)]
                return np.concatenate(blocks)

            listener = asyncio.create_task(cluster())
            await asyncio.sleep(0.1)
            played = [b async for b in live.tee(programme())]  # what went to the player
            heard = await listener
        finally:
            await srv.stop()
        return np.concatenate(played), heard

    played, heard = run(scenario())
    assert len(played) == 96000
    assert 1.0 < len(heard) / 48000 <= 2.1
    spec = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    assert abs(np.argmax(spec) * 48000 / len(heard) - 700) < 3

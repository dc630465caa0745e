"""A stand-in for the upstream radio (VOV) that a site relays, on a loopback HTTP port.

Scenario commands reach it through the placeholder `{sim.radio}` in any string argument
(e.g. `source: {stream: {url: "{sim.radio}"}}`), because the real relay URL in a site file
points at the internet, which a simulation never touches. It serves Ogg/Vorbis, one of
the formats an internet radio sends, generated once at start (a melody, not silence, so
dead-air detection stays quiet and FM receivers hear energy).
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from aiohttp import web

PLACEHOLDER = "{sim.radio}"


def programme_audio(seconds: float = 45.0, rate: int = 48000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    notes = np.array([262, 294, 330, 349, 392, 440, 494, 523], dtype=float)
    idx = (t * 2).astype(int) % len(notes)           # a new note every half second
    x = 0.3 * np.sin(2 * np.pi * notes[idx] * t) + 0.1 * np.sin(2 * np.pi * 2 * notes[idx] * t)
    buf = io.BytesIO()
    x = x.astype(np.float32)
    # libsndfile's Vorbis encoder crashes on very large single writes: feed it in blocks
    with sf.SoundFile(buf, "w", rate, 1, format="OGG", subtype="VORBIS") as f:
        for i in range(0, len(x), 8192):
            f.write(x[i:i + 8192])
    return buf.getvalue()


class RadioSim:
    def __init__(self, seconds: float = 45.0):
        self.seconds = seconds
        self.data = b""
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/radio/news.ogg"

    async def start(self) -> None:
        import asyncio

        self.data = await asyncio.to_thread(programme_audio, self.seconds)
        app = web.Application()
        app.router.add_get("/radio/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        return web.Response(body=self.data, content_type="audio/ogg")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def substitute(self, value):
        """Replace the placeholder in every string of a JSON-like value."""
        if isinstance(value, str):
            return value.replace(PLACEHOLDER, self.url)
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        return value

"""HTTP media server for IP clusters: one unguessable, expiring URL per broadcast.

A token maps to a server-side path or live stream chosen by the daemon; nothing from the
request is ever joined into a path, so there is nothing to traverse and nothing to list.
Unknown, revoked and expired tokens all get the same bare 404. Tokens are secrets: logs
show only their first characters.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from controller.streams import LiveOggStream, StreamError

log = structlog.get_logger(__name__)

CONTENT_TYPES = {
    ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg", ".mp3": "audio/mpeg",
    ".flac": "audio/flac", ".wav": "audio/wav", ".m4a": "audio/mp4", ".aac": "audio/aac",
}
DEFAULT_MAX_FILE_BYTES = 500 * 1024 * 1024
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def redact(token: str) -> str:
    return token[:4] + "…" if token else ""


@dataclass
class _Entry:
    path: Path | None
    stream: LiveOggStream | None
    expires_at: float
    content_type: str


class _DebugAccessLogger(AbstractAccessLogger):
    def log(self, request, response, time_taken) -> None:
        parts = request.path.split("/")
        if len(parts) == 3 and parts[1] == "m":
            parts[2] = redact(parts[2])
        log.debug("media.access", method=request.method, path="/".join(parts),
                  status=response.status, remote=request.remote, ms=round(time_taken * 1000))


class MediaServer:
    """`register(path_or_stream, ttl_s) -> url`, `revoke(token_or_url)`; aiohttp underneath."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, public_host: str | None = None,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_entries: int = 1000) -> None:
        self.host = host
        self.port = port
        self.public_host = public_host or host
        self.max_file_bytes = max_file_bytes
        self.max_entries = max_entries
        self._entries: dict[str, _Entry] = {}
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_route("GET", "/m/{token}", self._handle)
        self._runner = web.AppRunner(app, access_log_class=_DebugAccessLogger,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]
        log.info("media_server.started", host=self.host, port=self.port)

    async def stop(self) -> None:
        for e in self._entries.values():
            if e.stream is not None:
                e.stream.close()
        self._entries.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, item: str | os.PathLike | LiveOggStream, ttl_s: float) -> str:
        """Expose a file or live stream for `ttl_s` seconds; returns its URL."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._purge()
        if len(self._entries) >= self.max_entries:
            raise RuntimeError(f"media server holds {self.max_entries} entries already")
        expires = time.monotonic() + ttl_s
        if isinstance(item, LiveOggStream):
            entry = _Entry(None, item, expires, item.content_type)
        else:
            path = Path(item).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"media file not found: {path}")
            size = path.stat().st_size
            if size > self.max_file_bytes:
                raise ValueError(f"media file is {size} bytes, over the {self.max_file_bytes} limit")
            ctype = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
            entry = _Entry(path, None, expires, ctype)
        token = secrets.token_urlsafe(24)
        self._entries[token] = entry
        log.debug("media_server.registered", token=redact(token), ttl_s=ttl_s,
                  kind="stream" if entry.stream else "file")
        return f"{self.base_url}/m/{token}"

    def revoke(self, token_or_url: str) -> bool:
        token = token_or_url.rstrip("/").rsplit("/", 1)[-1]
        return self._entries.pop(token, None) is not None

    def _purge(self) -> None:
        now = time.monotonic()
        for t in [t for t, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[t]

    def _lookup(self, token: str) -> _Entry | None:
        if len(token) != 32 or not _TOKEN_CHARS.issuperset(token):
            return None
        entry = self._entries.get(token)
        if entry is None:
            return None
        if entry.expires_at <= time.monotonic():
            del self._entries[token]
            return None
        return entry

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        entry = self._lookup(token)
        if entry is None:
            raise web.HTTPNotFound()
        if entry.path is not None:
            if not entry.path.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(entry.path, headers={
                "Content-Type": entry.content_type, "Cache-Control": "no-store"})
        return await self._serve_stream(request, token, entry.stream)

    async def _serve_stream(self, request, token, stream: LiveOggStream) -> web.StreamResponse:
        try:
            q = stream.subscribe()
        except StreamError as e:
            raise web.HTTPServiceUnavailable(text=str(e)) from None
        resp = web.StreamResponse(headers={"Content-Type": stream.content_type,
                                           "Cache-Control": "no-store"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            while token in self._entries:
                page = await q.get()
                if page is None:
                    break
                await resp.write(page)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            stream.unsubscribe(q)
        return resp

"""Streamed audio: HTTP stream relay, live line-in, and a live Ogg/Opus feed for IP clusters.

Relay decoding uses PyAV (FFmpeg): internet radio is MP3, AAC or Ogg over endless HTTP
bodies, and libsndfile needs a seekable, finite file (it seeks to the end when opening).
The live feed for IP clusters is Ogg/Opus from libsndfile (via soundfile) with 100 ms
pages: end-to-end latency is about one page plus the cluster's own buffer.
All sources are async iterators of float32 mono blocks at the device rate, which is what
`Player.play` takes.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import struct
import threading
import zlib
from collections.abc import AsyncIterable, AsyncIterator

import numpy as np
import structlog

log = structlog.get_logger(__name__)

_EOF = object()


class StreamError(Exception):
    """A stream could not be fetched, decoded or captured; the message says which and why."""


class _ByteFeed:
    """Blocking, forward-only file object for the decoder thread (deliberately no seek)."""

    def __init__(self, maxsize: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.buf = b""
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        while not self.buf and not self.eof:
            chunk = self.q.get()
            if chunk is None:
                self.eof = True
            else:
                self.buf = chunk
        if n is None or n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


_HINTS = {"audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/aac": "aac", "audio/aacp": "aac",
          "audio/ogg": "ogg", "application/ogg": "ogg", "audio/opus": "ogg", "audio/flac": "flac",
          "audio/wav": "wav", "audio/x-wav": "wav"}


def _decode_thread(feed: _ByteFeed, fmt: str | None, rate: int, loop, out: asyncio.Queue,
                   stop: threading.Event) -> None:
    import av

    def post(item) -> bool:
        while not stop.is_set():
            fut = asyncio.run_coroutine_threadsafe(out.put(item), loop)
            try:
                fut.result(timeout=0.5)
                return True
            except TimeoutError:
                fut.cancel()
            except Exception:
                return False
        return False

    try:
        with av.open(feed, mode="r", format=fmt, options={"probesize": "32768"}) as container:
            if not container.streams.audio:
                raise StreamError("stream has no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                for rf in resampler.resample(frame):
                    if not post(rf.to_ndarray().reshape(-1)):
                        return
            for rf in resampler.resample(None):
                post(rf.to_ndarray().reshape(-1))
        post(_EOF)
    except Exception as e:  # av.error.*, StreamError
        post(StreamError(f"stream decode failed: {e}") if not isinstance(e, StreamError) else e)


async def relay_blocks(
    url: str,
    *,
    rate: int = 48000,
    session=None,
    connect_timeout_s: float = 10.0,
    read_timeout_s: float = 10.0,
    buffer_chunks: int = 64,
) -> AsyncIterator[np.ndarray]:
    """Fetch an HTTP audio stream and yield decoded float32 mono blocks at `rate`.

    Raises StreamError on HTTP errors, stalls longer than `read_timeout_s`, undecodable
    data, or a connection dropped mid-stream. Reconnecting is the engine's policy.
    """
    import aiohttp

    if not url.startswith(("http://", "https://")):
        raise StreamError(f"stream url must be http:// or https:// (got {url!r})")
    own = session is None
    if own:
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
            )
        )
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue(maxsize=16)
    stop = threading.Event()
    feed = _ByteFeed(buffer_chunks)
    fetcher = decoder = resp = None
    try:
        try:
            resp = await session.get(url)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise StreamError(f"stream connect failed: {type(e).__name__}: {e}") from e
        if resp.status != 200:
            raise StreamError(f"stream fetch failed: HTTP {resp.status} from {url}")
        ctype = (resp.content_type or "").lower()
        fmt = _HINTS.get(ctype)

        async def fetch() -> None:
            try:
                async for chunk in resp.content.iter_any():
                    while feed.q.full():
                        if stop.is_set():
                            return
                        await asyncio.sleep(0.02)
                    feed.q.put_nowait(chunk)
            except (aiohttp.ClientError, TimeoutError) as e:
                err = StreamError(f"stream connection lost: {type(e).__name__}: {e}")
                stop.set()
                with contextlib.suppress(asyncio.QueueFull):
                    out.put_nowait(err)
            finally:
                with contextlib.suppress(queue.Full):
                    feed.q.put(None, timeout=1.0)

        fetcher = asyncio.create_task(fetch())
        decoder = threading.Thread(
            target=_decode_thread, args=(feed, fmt, rate, loop, out, stop),
            name="loaxa-relay-decode", daemon=True,
        )
        decoder.start()
        log.info("stream.relay_started", url=url, content_type=ctype or None)
        while True:
            item = await out.get()
            if item is _EOF:
                return
            if isinstance(item, Exception):
                raise item
            yield item.astype(np.float32, copy=False)
    finally:
        stop.set()
        if fetcher is not None:
            fetcher.cancel()
            with contextlib.suppress(BaseException):
                await fetcher
        while True:  # unblock a decoder waiting on input
            try:
                feed.q.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    feed.q.get_nowait()
        if resp is not None:
            resp.release()
        if own:
            await session.close()


async def live_input_blocks(
    device: str | int | None = None,
    *,
    rate: int = 48000,
    blocksize: int = 960,
    max_queue: int = 50,
) -> AsyncIterator[np.ndarray]:
    """Blocks from a line/mic input. A slow consumer loses the oldest audio, never blocks it."""
    from controller.playout import AudioDeviceMissing, _sd

    sd = _sd()
    try:
        sd.query_devices(device, "input")
    except ValueError as e:
        raise AudioDeviceMissing(f"audio input {device!r} not found") from e
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
    stop = threading.Event()
    dropped = 0

    def put(item) -> None:
        nonlocal dropped
        if q.full():
            q.get_nowait()
            dropped += 1
        q.put_nowait(item)

    def reader() -> None:
        try:
            with sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=device,
                                blocksize=blocksize) as st:
                while not stop.is_set():
                    data, _overflow = st.read(blocksize)
                    loop.call_soon_threadsafe(put, data[:, 0])
        except Exception as e:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(put, StreamError(f"audio input failed: {e}"))

    t = threading.Thread(target=reader, name="loaxa-line-in", daemon=True)
    t.start()
    try:
        while True:
            item = await q.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        if dropped:
            log.warning("stream.live_input_dropped", blocks=dropped)


# ---- live Ogg/Opus feed ------------------------------------------------------------

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # libsndfile >= 1.2


class _Sink:
    """Write-only target for libsndfile's virtual I/O; collects encoded bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.pos = 0

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        self.pos += len(data)
        return len(data)

    def seek(self, offset, whence=0) -> int:
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n=-1) -> bytes:
        return b""

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class OggOpusEncoder:
    """Incremental Ogg/Opus encoder: feed float32 blocks, get whole Ogg pages back."""

    def __init__(self, rate: int = 48000, page_ms: float = 100.0) -> None:
        import soundfile as sf

        self.in_rate = int(rate)
        self.rate = self.in_rate if self.in_rate in OPUS_RATES else 48000
        self._rs = None
        if self.rate != self.in_rate:
            import soxr

            self._rs = soxr.ResampleStream(self.in_rate, self.rate, 1, dtype="float32")
        self._sink = _Sink()
        self._f = sf.SoundFile(self._sink, "w", samplerate=self.rate, channels=1,
                               format="OGG", subtype="OPUS")
        ms = sf._ffi.new("double*", float(page_ms))
        sf._snd.sf_command(self._f._file, _SFC_SET_OGG_PAGE_LATENCY_MS, ms, sf._ffi.sizeof("double"))
        self._pending = b""

    def encode(self, block: np.ndarray) -> list[bytes]:
        x = np.asarray(block, dtype=np.float32).reshape(-1)
        if self._rs is not None:
            x = self._rs.resample_chunk(x)
        if len(x):
            self._f.write(x)
        return self._pages()

    def close(self) -> list[bytes]:
        if not self._f.closed:
            self._f.close()
        return self._pages()

    def _pages(self) -> list[bytes]:
        data = self._pending + self._sink.take()
        pages = []
        i = 0
        while len(data) - i >= 27:
            if data[i : i + 4] != b"OggS":
                raise StreamError("encoder produced a malformed Ogg page")
            nseg = data[i + 26]
            if len(data) - i < 27 + nseg:
                break
            size = 27 + nseg + sum(data[i + 27 : i + 27 + nseg])
            if len(data) - i < size:
                break
            pages.append(data[i : i + size])
            i += size
        self._pending = data[i:]
        return pages


def page_granule(page: bytes) -> int:
    return struct.unpack_from("<q", page, 6)[0]


_BITREV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (poly 0x04c11db7, not reflected, init 0) via zlib on bit-reversed bytes."""
    r = ~zlib.crc32(data.translate(_BITREV), 0xFFFFFFFF) & 0xFFFFFFFF
    return int(f"{r:032b}"[::-1], 2)


def resequence(page: bytes, seq: int) -> bytes:
    """The page with a new sequence number: a late listener's stream has no gap (libogg
    decoders otherwise report a hole and some refuse the stream)."""
    head = bytearray(page[:27])
    struct.pack_into("<I", head, 18, seq & 0xFFFFFFFF)
    head[22:26] = b"\0\0\0\0"
    body = page[27:]
    struct.pack_into("<I", head, 22, ogg_crc(bytes(head) + body))
    return bytes(head) + body


class LiveOggStream:
    """One live programme encoded once and fanned out to any number of HTTP listeners.

    A listener joining late gets the Ogg header pages, then pages from "now". A listener
    that falls too far behind is dropped rather than allowed to grow memory.
    """

    content_type = "audio/ogg"

    def __init__(self, rate: int = 48000, page_ms: float = 100.0, max_listeners: int = 16,
                 listener_pages: int = 100) -> None:
        self.enc = OggOpusEncoder(rate, page_ms)
        self.headers: list[bytes] = []
        self._in_headers = True
        self.listeners: dict[asyncio.Queue, int] = {}  # queue -> next page sequence number
        self.max_listeners = max_listeners
        self.listener_pages = listener_pages
        self.closed = False

    def feed(self, block: np.ndarray) -> None:
        if not self.closed:
            self._distribute(self.enc.encode(block))

    def close(self) -> None:
        if self.closed:
            return
        self._distribute(self.enc.close())
        self.closed = True
        for q in list(self.listeners):
            self._offer(q, None)

    def _distribute(self, pages: list[bytes]) -> None:
        for page in pages:
            if self._in_headers and page_granule(page) == 0:
                self.headers.append(page)
            else:
                self._in_headers = False
            orig = struct.unpack_from("<I", page, 18)[0]
            for q, seq in list(self.listeners.items()):
                self.listeners[q] = seq + 1
                self._offer(q, page if seq == orig else resequence(page, seq))

    def _offer(self, q: asyncio.Queue, page: bytes | None) -> None:
        try:
            q.put_nowait(page)
        except asyncio.QueueFull:
            self.listeners.pop(q, None)
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
            q.put_nowait(None)
            log.warning("stream.listener_dropped", reason="too slow")

    def subscribe(self) -> asyncio.Queue:
        """Queue of pages (None = end); the header pages come first."""
        if len(self.listeners) >= self.max_listeners:
            raise StreamError(f"too many listeners (limit {self.max_listeners})")
        q: asyncio.Queue = asyncio.Queue(maxsize=self.listener_pages + len(self.headers) + 1)
        for h in self.headers:
            q.put_nowait(h)
        if self.closed:
            q.put_nowait(None)
        else:
            self.listeners[q] = len(self.headers)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.listeners.pop(q, None)

    async def tee(self, source: AsyncIterable[np.ndarray]) -> AsyncIterator[np.ndarray]:
        """Pass `source` through (to the player) while encoding it for IP clusters."""
        try:
            async for block in source:
                self.feed(block)
                yield block
        finally:
            self.close()

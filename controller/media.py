"""Media assets: decode, resample, loudness-normalise, verify and cache.

Everything here is blocking CPU/disk work except `fetch_verified`; the engine runs the
blocking parts with `asyncio.to_thread` (or `AssetCache.load_async`). Prepared assets are
written once per content hash (the SD card is precious) and read back on every later play.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import structlog

log = structlog.get_logger(__name__)

# Bump when the preparation changes so stale cached renderings are not reused.
PREP_VERSION = "1"
SUPPORTED_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3"}
DEFAULT_MAX_FETCH_BYTES = 200 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class MediaError(Exception):
    """Media could not be used; the message says why in words an operator can act on."""


class ChecksumMismatch(MediaError):
    pass


class MediaTooLarge(MediaError):
    pass


class FetchError(MediaError):
    pass


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG(Vorbis/Opus)/MP3 to float32 mono (channels averaged)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"media file not found: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise MediaError(f"cannot decode {path.name}: {e} (supported: WAV, FLAC, OGG, MP3)") from e
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float32)
    import soxr

    return soxr.resample(np.asarray(x, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(
        np.float32, copy=False
    )


def loudness_lufs(x: np.ndarray, sr: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4, gated); -inf for silence or clips under 0.4 s."""
    import pyloudnorm

    if len(x) < int(0.4 * sr) + 1:
        return float("-inf")
    with np.errstate(divide="ignore"):
        value = pyloudnorm.Meter(sr).integrated_loudness(np.asarray(x, dtype=np.float64))
    return float(value)


def true_peak(x: np.ndarray, sr: int) -> float:
    """Peak of a 4x-oversampled signal (BS.1770 annex 2 style), linear; bounded memory."""
    import soxr

    if len(x) == 0:
        return 0.0
    rs = soxr.ResampleStream(sr, sr * 4, 1, dtype="float32", quality="HQ")
    peak = float(np.max(np.abs(x)))
    step = sr  # one second per chunk
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        y = rs.resample_chunk(chunk, last=i + step >= len(x))
        if len(y):
            peak = max(peak, float(np.max(np.abs(y))))
    return peak


def limit(y: np.ndarray, ceiling: float, sr: int, lookahead_s: float = 0.005) -> np.ndarray:
    """Look-ahead peak limiter: smooth gain that keeps every sample at or under `ceiling`.

    Gain is the running minimum of the needed reduction over +-L samples, then averaged
    over +-L/2: every averaged value is <= the need at the centre sample, so no overshoot,
    and the gain moves over ~L samples (no clicks).
    """
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    a = np.abs(y)
    if len(y) == 0 or float(a.max()) <= ceiling:
        return y
    need = np.minimum(1.0, ceiling / np.maximum(a, 1e-12)).astype(np.float32)
    la = max(1, int(lookahead_s * sr))
    g = minimum_filter1d(need, size=2 * la + 1, mode="nearest")
    g = uniform_filter1d(g, size=la | 1, mode="nearest")
    return (y * np.minimum(g, need)).astype(np.float32)


def normalise(
    x: np.ndarray,
    sr: int,
    target_lufs: float = -16.0,
    peak_dbfs: float = -1.0,
    max_limiting_db: float = 6.0,
) -> tuple[np.ndarray, dict]:
    """Gain to `target_lufs`; peaks over `peak_dbfs` are limited, never clipped.

    Speech (espeak-ng especially) peaks well above its loudness, so plain gain could not
    reach broadcast loudness without clipping; a gentle look-ahead limiter takes up to
    `max_limiting_db` of peaks. Beyond that the gain is lowered instead: a very peaky
    recording ends up below target rather than crushed.
    """
    x = np.asarray(x, dtype=np.float32)
    measured = loudness_lufs(x, sr)
    info = {"measured_lufs": measured, "gain_db": 0.0, "peak_limited": False}
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if not np.isfinite(measured) or peak <= 0.0:
        return x, info
    ceiling = 10 ** (peak_dbfs / 20)
    gain_db = target_lufs - measured
    excess_db = gain_db + 20 * np.log10(peak / ceiling)  # peak over ceiling after gain
    if excess_db > max_limiting_db:
        gain_db -= excess_db - max_limiting_db
        info["peak_limited"] = True
    y = x
    for _ in range(3):  # limiting lowers loudness a little: re-aim twice
        y = limit(x * np.float32(10 ** (gain_db / 20)), ceiling, sr)
        if info["peak_limited"]:
            break
        err = target_lufs - loudness_lufs(y, sr)
        if abs(err) < 0.2:
            break
        gain_db += err
    tp = true_peak(y, sr)
    if tp > ceiling:  # inter-sample overs: trim statically
        y = (y * np.float32(ceiling / tp)).astype(np.float32)
    info["gain_db"] = float(gain_db)
    return y.astype(np.float32, copy=False), info


def prepare(
    x: np.ndarray, sr: int, rate: int, target_lufs: float = -16.0, peak_dbfs: float = -1.0
) -> np.ndarray:
    """Resample to the device rate, then normalise (loudness measured at the rate played)."""
    y = resample(x, sr, rate)
    y, info = normalise(y, rate, target_lufs, peak_dbfs)
    log.debug("media.prepared", frames=len(y), rate=rate, **info)
    return y


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(dest: Path, write) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class AssetCache:
    """Prepared (device-rate, normalised) audio on disk, keyed by a content hash.

    Stored as FLAC 24-bit: lossless for playout purposes, about half the size of WAV,
    and written exactly once per key.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        rate: int = 48000,
        target_lufs: float = -16.0,
        peak_dbfs: float = -1.0,
    ) -> None:
        self.dir = Path(cache_dir)
        self.rate = int(rate)
        self.target_lufs = float(target_lufs)
        self.peak_dbfs = float(peak_dbfs)
        self.prepared = 0  # how many times we actually decoded+normalised (cache misses)

    def key(self, content_id: str) -> str:
        spec = f"{content_id}|{self.rate}|{self.target_lufs}|{self.peak_dbfs}|{PREP_VERSION}"
        return hashlib.sha256(spec.encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.dir / f"{key}.flac"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path_for(key)
        if not p.is_file():
            return None
        try:
            data, sr = sf.read(str(p), dtype="float32")
        except (sf.LibsndfileError, RuntimeError) as e:
            log.warning("media.cache_corrupt", file=p.name, error=str(e))
            with contextlib.suppress(OSError):
                p.unlink()
            return None
        if sr != self.rate:
            return None
        return data

    def put(self, key: str, x: np.ndarray) -> None:
        def write(tmp):
            sf.write(tmp, x, self.rate, format="FLAC", subtype="PCM_24")

        try:
            _atomic_write(self.path_for(key), write)
        except (OSError, RuntimeError) as e:  # full or read-only disk: the cache is optional
            log.warning("media.cache_not_written", file=self.path_for(key).name, error=str(e))

    def load(self, path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
        """Prepared samples of a media file (blocking). `sha256`, if known, saves a hash pass."""
        path = Path(path)
        if not path.is_file():
            raise MediaError(f"media file not found: {path}")
        key = self.key(sha256 or sha256_file(path))
        cached = self.get(key)
        if cached is not None:
            return cached
        x, sr = decode(path)
        y = prepare(x, sr, self.rate, self.target_lufs, self.peak_dbfs)
        self.prepared += 1
        self.put(key, y)
        return y

    async def load_async(self, path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
        import asyncio

        return await asyncio.to_thread(self.load, path, sha256)


async def fetch_verified(
    url: str,
    sha256: str,
    cache_dir: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_FETCH_BYTES,
    timeout_s: float = 300.0,
    session=None,
) -> Path:
    """Download `url` into `cache_dir/<sha256>` unless already there; refuse on hash mismatch.

    The file only appears under its final name after the whole body hashed correctly,
    so a cached file is trusted without re-hashing.
    """
    import aiohttp

    want = (sha256 or "").strip().lower()
    if not _SHA256_RE.match(want):
        raise MediaError(f"sha256 must be 64 hex digits (got {sha256!r})")
    if not url.startswith(("http://", "https://")):
        raise MediaError(f"media url must be http:// or https:// (got {url!r})")
    cache_dir = Path(cache_dir)
    dest = cache_dir / want
    if dest.is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".fetch-")
    h = hashlib.sha256()
    size = 0
    own = session is None
    if own:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        raise FetchError(f"fetching media failed: HTTP {resp.status} from {url}")
                    if resp.content_length is not None and resp.content_length > max_bytes:
                        raise MediaTooLarge(
                            f"media is {resp.content_length} bytes, over the {max_bytes} limit"
                        )
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > max_bytes:
                            raise MediaTooLarge(f"media exceeds the {max_bytes} byte limit")
                        h.update(chunk)
                        out.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as e:
                raise FetchError(f"fetching media failed: {type(e).__name__}: {e}") from e
        got = h.hexdigest()
        if got != want:
            raise ChecksumMismatch(
                f"media sha256 mismatch for {url}: expected {want}, got {got}; refused"
            )
        os.replace(tmp, dest)
        log.info("media.fetched", sha256=want[:12], bytes=size)
        return dest
    finally:
        if own:
            await session.close()
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Text to speech: espeak-ng (Vietnamese voices) or a locally installed engine via a template.

Output is resampled to the device rate and loudness-normalised like any other media, and
cached on disk by sha256(engine version, voice, rate, loudness, text) so a repeated
announcement (the daily programme, an emergency re-run) never re-synthesises.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import numpy as np
import structlog

from controller.media import AssetCache, MediaError, decode, prepare

log = structlog.get_logger(__name__)

VIETNAMESE_VOICES = ("vi", "vi-vn-x-central", "vi-vn-x-south")
MAX_TEXT_CHARS = 5000


class TTSError(Exception):
    """Speech could not be produced; the message names the cause (engine missing, voice…)."""


class TTS:
    """Synthesises speech to prepared device-rate samples.

    `command`, if given, replaces espeak-ng: a template such as
    ``piper --model /opt/voices/vi.onnx --output_file {out}`` that reads the text on stdin
    and writes a WAV to `{out}` (`{voice}` is substituted too). It is split with shlex and
    run without a shell, so text never reaches a command line.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        rate: int = 48000,
        target_lufs: float = -16.0,
        peak_dbfs: float = -1.0,
        voice: str = "vi",
        speed_wpm: int | None = None,
        command: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.cache = AssetCache(cache_dir, rate=rate, target_lufs=target_lufs, peak_dbfs=peak_dbfs)
        self.voice = voice
        self.speed_wpm = speed_wpm
        self.command = command
        self.timeout_s = timeout_s
        self.runs = 0  # engine invocations (cache misses)
        self._version: str | None = None

    async def engine_version(self) -> str:
        if self._version is None:
            if self.command:
                self._version = "cmd:" + self.command + self._model_stamp()
            else:
                out, _ = await self._run([self._espeak(), "--version"], b"")
                self._version = out.decode(errors="replace").strip()
        return self._version

    def _model_stamp(self) -> str:
        # A replaced voice model file must invalidate the cache: stamp paths in the template.
        stamps = []
        for tok in shlex.split(self.command or ""):
            p = Path(tok)
            if p.is_absolute() and p.is_file():
                st = p.stat()
                stamps.append(f"{p}:{st.st_size}:{int(st.st_mtime)}")
        return "|" + ",".join(stamps)

    @staticmethod
    def _espeak() -> str:
        exe = shutil.which("espeak-ng")
        if not exe:
            raise TTSError("espeak-ng is not installed (Debian package: espeak-ng)")
        return exe

    async def _run(self, argv: list[str], stdin: bytes) -> tuple[bytes, bytes]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as e:
            raise TTSError(f"TTS engine not found: {argv[0]}") from e
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TTSError(f"TTS engine timed out after {self.timeout_s:.0f} s") from None
        if proc.returncode != 0:
            msg = (err or out).decode(errors="replace").strip()
            raise TTSError(f"TTS engine failed (exit {proc.returncode}): {msg}")
        return out, err

    def cache_key(self, text: str, voice: str, version: str) -> str:
        spec = json.dumps([version, voice, self.speed_wpm, text], ensure_ascii=False)
        return self.cache.key("tts:" + hashlib.sha256(spec.encode()).hexdigest())

    async def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        """Prepared float32 mono samples at the device rate for `text`."""
        text = (text or "").strip()
        voice = voice or self.voice
        if not text:
            raise TTSError("TTS text is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise TTSError(f"TTS text is {len(text)} characters, over the {MAX_TEXT_CHARS} limit")
        version = await self.engine_version()
        key = self.cache_key(text, voice, version)
        cached = await asyncio.to_thread(self.cache.get, key)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="loaxa-tts-") as tmp:
            wav = Path(tmp) / "out.wav"
            argv = self._argv(voice, wav)
            try:
                await self._run(argv, text.encode("utf-8"))
            except TTSError as e:
                if not self.command and "voice does not exist" in str(e):
                    raise TTSError(
                        f"unknown espeak-ng voice {voice!r} (Vietnamese voices: "
                        f"{', '.join(VIETNAMESE_VOICES)})"
                    ) from e
                raise
            self.runs += 1
            if not wav.is_file() or wav.stat().st_size <= 44:
                raise TTSError(f"TTS engine produced no audio for voice {voice!r}")
            try:
                x, sr = await asyncio.to_thread(decode, wav)
            except MediaError as e:
                raise TTSError(f"TTS output unreadable: {e}") from e
        c = self.cache
        y = await asyncio.to_thread(prepare, x, sr, c.rate, c.target_lufs, c.peak_dbfs)
        await asyncio.to_thread(c.put, key, y)
        log.info("tts.synthesized", voice=voice, chars=len(text), seconds=round(len(y) / c.rate, 2))
        return y

    def _argv(self, voice: str, out: Path) -> list[str]:
        if self.command:
            return [
                tok.replace("{out}", str(out)).replace("{voice}", voice)
                for tok in shlex.split(self.command)
            ]
        argv = [self._espeak(), "-v", voice, "-b", "1", "-w", str(out)]
        if self.speed_wpm:
            argv += ["-s", str(int(self.speed_wpm))]
        return [*argv, "--stdin"]

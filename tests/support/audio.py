"""The real sounddevice -> PortAudio -> ALSA path, captured to a raw S16_LE mono file."""
from __future__ import annotations

import os
from pathlib import Path

ASOUNDRC = """
pcm.!default {
    type plug
    slave {
        pcm {
            type file
            slave.pcm { type null }
            file { @func getenv vars [ LOAXA_AUDIO_CAPTURE ] default "/tmp/loaxa-air.raw" }
            format "raw"
        }
        format S16_LE
        rate %(rate)d
        channels 1
    }
}
"""


def capture_env(workdir: Path, rate: int = 48000, base: dict | None = None) -> tuple[dict, Path]:
    """Environment for a subprocess whose audio output lands in `workdir/air.raw`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "asound.conf"
    conf.write_text(ASOUNDRC % {"rate": rate})
    raw = workdir / "air.raw"
    env = dict(os.environ if base is None else base)
    env["ALSA_CONFIG_PATH"] = str(conf)
    env["LOAXA_AUDIO_CAPTURE"] = str(raw)
    return env, raw

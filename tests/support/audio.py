"""The real sounddevice -> PortAudio -> ALSA path, captured to a raw S16_LE mono file.

The ALSA configuration is the simulation harness's own (device_drivers/sim/runner.py),
so tests and `loaxa simulate` capture the air the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

from device_drivers.sim.runner import ASOUND_CONF


def capture_env(workdir: Path, rate: int = 48000, base: dict | None = None) -> tuple[dict, Path]:
    """Environment for a subprocess whose audio output lands in `workdir/air.raw`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "asound.conf"
    conf.write_text(ASOUND_CONF % {"rate": rate})
    raw = workdir / "air.raw"
    env = dict(os.environ if base is None else base)
    env["ALSA_CONFIG_PATH"] = str(conf)
    env["LOAXA_AUDIO_CAPTURE"] = str(raw)
    return env, raw

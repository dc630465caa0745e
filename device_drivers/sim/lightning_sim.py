"""A simulated lightning sensor bridge: writes the profile's event lines to a pty master.

Lines are rendered from the profile's `events` templates, so the driver under test reads
exactly what the (assumed) bridge firmware prints.
"""
from __future__ import annotations

import os
import random
from typing import Any

from device_drivers.profile_codec import ProfileCodec
from device_drivers.profiles import Profile, load_profile


class LightningSim:
    def __init__(self, master_fd: int, profile: Profile | str, *, seed: int | None = None):
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self.codec = ProfileCodec(self.profile)
        self._framer = self.profile.transport.decoder()  # type: ignore[union-attr]
        self.fd = master_fd
        self.sent: list[bytes] = []
        self._rng = random.Random(seed)

    def emit(self, event: str, **fields: Any) -> bytes:
        """Write one event line; returns the bytes written."""
        wire = self._framer.encode(self.codec.render_event(event, **fields))
        try:
            os.write(self.fd, wire)
        except OSError:   # nobody listening, or the port is gone: the line is lost
            pass
        self.sent.append(wire)
        return wire

    def strike(self, distance_km: float | None, energy: int | None = None) -> bytes:
        if energy is None:
            energy = self._rng.randrange(20_000, 600_000)
        return self.emit("strike", distance_km=distance_km, energy=int(energy))

    def strikes(self, count: int, distance_km: float | None) -> list[bytes]:
        return [self.strike(distance_km) for _ in range(int(count))]

    def disturber(self) -> bytes:
        return self.emit("disturber")

    def noise(self) -> bytes:
        return self.emit("noise")

    def stop(self) -> None:
        """Nothing to release: the pty belongs to whoever created it."""

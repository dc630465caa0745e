"""Planned codes -> what goes on air: DTMF audio to put before/after the programme, or UECP
TDC message elements for the RDS encoder driver.  No policy here: the caller decides whom
to address and when; this only turns a Plan and a profile into samples or bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_drivers import uecp
from device_drivers.dtmf import silence, synthesize
from device_drivers.fm_addressing import Plan
from device_drivers.fm_profile import FmReceiverSpec


def wake_codes(plan: Plan, spec: FmReceiverSpec, volume: int | None = None) -> list[str]:
    codes = plan.wake_codes(spec)
    if volume is not None and codes:
        if spec.codes.volume is None:
            raise ValueError("this receiver profile has no volume code")
        if not 0 <= volume < spec.volume_levels:
            raise ValueError(f"volume {volume} out of range 0..{spec.volume_levels - 1}")
        codes.append(spec.codes.render("volume", volume))
    return codes


def release_codes(plan: Plan, spec: FmReceiverSpec) -> list[str]:
    return plan.release_codes(spec)


def dtmf_audio(codes: list[str], spec: FmReceiverSpec, rate: int) -> np.ndarray:
    """Lead-in silence, the codes separated by the code gap, lead-out silence (float32 mono)."""
    d = _dtmf(spec)
    if not codes:
        return np.zeros(0, dtype=np.float32)
    parts = [silence(rate, d.lead_in_ms)]
    for i, code in enumerate(codes):
        if i:
            parts.append(silence(rate, d.code_gap_ms))
        parts.append(synthesize(code, rate, d.tone_ms, d.gap_ms, d.level_dbfs, d.twist_db))
    parts.append(silence(rate, d.lead_out_ms))
    return np.concatenate(parts)


def wake_audio(plan: Plan, spec: FmReceiverSpec, rate: int, volume: int | None = None) -> np.ndarray:
    """Audio to play after the carrier is up (and receivers are awake), before the programme."""
    return dtmf_audio(wake_codes(plan, spec, volume), spec, rate)


def release_audio(plan: Plan, spec: FmReceiverSpec, rate: int) -> np.ndarray:
    """Audio to play after the programme so the addressed receivers switch off again."""
    return dtmf_audio(release_codes(plan, spec), spec, rate)


@dataclass(frozen=True)
class TimedMessage:
    """One UECP message element to send `at_s` seconds after the first one."""
    at_s: float
    code: str
    element: uecp.Tdc

    def encode(self) -> bytes:
        return self.element.encode()


def rds_messages(codes: list[str], spec: FmReceiverSpec) -> list[TimedMessage]:
    """Each code as a TDC element, repeated per the profile (encoders often never ACK).

    Repeats are interleaved (A B C, A B C, …) rather than A A A B B B, so a burst of noise
    on the RDS subcarrier cannot take out every copy of the same code.
    """
    r = spec.rds
    if r is None or spec.signalling != "rds":
        raise ValueError("this receiver profile does not use RDS signalling")
    out: list[TimedMessage] = []
    step = r.repeat_gap_ms / 1000
    for _ in range(r.repeats):
        for code in codes:
            payload = (r.prefix + code).encode("ascii")
            out.append(TimedMessage(len(out) * step, code, uecp.Tdc(r.tdc_channel, payload)))
    return out


def rds_wake(plan: Plan, spec: FmReceiverSpec, volume: int | None = None) -> list[TimedMessage]:
    return rds_messages(wake_codes(plan, spec, volume), spec)


def rds_release(plan: Plan, spec: FmReceiverSpec) -> list[TimedMessage]:
    return rds_messages(release_codes(plan, spec), spec)


def parse_rds_payload(payload: bytes, spec: FmReceiverSpec) -> str | None:
    """The code text inside a TDC payload, or None if it is not ours (wrong prefix/not text)."""
    r = spec.rds
    prefix = (r.prefix if r else "").encode("ascii")
    if not payload.startswith(prefix):
        return None
    try:
        return payload[len(prefix):].decode("ascii")
    except UnicodeDecodeError:
        return None


def _dtmf(spec: FmReceiverSpec):
    if spec.signalling != "dtmf" or spec.dtmf is None:
        raise ValueError("this receiver profile does not use DTMF signalling")
    return spec.dtmf

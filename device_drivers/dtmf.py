"""DTMF (ITU-T Q.23) synthesis and a streaming detector.

The FM receiver clusters are switched by DTMF codes keyed into the programme audio, so
the detector is what the receiver simulator "hears" with.  It works like a Q.24-style
receiver: the input is cut into 20 ms Hann windows every 10 ms (shorter for profiles
with shorter tones/gaps) at its own rate (no resampler, so no added latency), and each
window is accepted as a key only if

- one low-group and one high-group peak lie each within ±2.5 % of a Q.23 frequency
  (Q.24: must accept ±1.5 %, must reject ±3.5 %; the estimate comes from a zero-padded
  FFT with parabolic interpolation, so it is good to a few Hz),
- the twist (high minus low level) is within ±8 dB,
- the two tones carry most of the window's energy below 4 kHz (speech and music spread
  theirs over harmonics and formants),
- the level is above a floor and steady across the window (the two halves within 4 dB),
  so windows that straddle a tone edge do not count and a tone shorter than a window
  never yields the two agreeing windows a key needs.

A key is reported once per press: two consecutive windows must agree before it is
emitted, and two consecutive windows without it must pass before the same key can be
emitted again — which is why tone and gap must each cover at least two hops.
"""
from __future__ import annotations

from collections import deque

import numpy as np

LOW = (697.0, 770.0, 852.0, 941.0)
HIGH = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = ("123A", "456B", "789C", "*0#D")
KEY_FREQS: dict[str, tuple[float, float]] = {
    KEYS[r][c]: (LOW[r], HIGH[c]) for r in range(4) for c in range(4)
}


def synthesize(digits: str, rate: int = 48000, tone_ms: int = 70, gap_ms: int = 70,
               level_dbfs: float = -10.0, twist_db: float = 0.0, ramp_ms: float = 2.0) -> np.ndarray:
    """Key `digits` as float32 audio: tone, gap, tone, …, tone (no trailing gap).

    `level_dbfs` is the peak level of each of the two tones (low group); the high group is
    `twist_db` above it.  Short raised-cosine ramps keep the spectrum clean.
    """
    digits = digits.upper()
    bad = sorted({d for d in digits if d not in KEY_FREQS})
    if bad:
        raise ValueError(f"not DTMF keys: {''.join(bad)!r} (allowed 0-9 * # A-D)")
    n_tone = round(rate * tone_ms / 1000)
    n_gap = round(rate * gap_ms / 1000)
    t = np.arange(n_tone) / rate
    a_lo = 10 ** (level_dbfs / 20)
    a_hi = a_lo * 10 ** (twist_db / 20)
    env = np.ones(n_tone)
    n_ramp = min(int(rate * ramp_ms / 1000), n_tone // 2)
    if n_ramp:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
        env[:n_ramp] = ramp
        env[-n_ramp:] = ramp[::-1]
    parts = []
    for i, d in enumerate(digits):
        lo, hi = KEY_FREQS[d]
        parts.append(env * (a_lo * np.sin(2 * np.pi * lo * t) + a_hi * np.sin(2 * np.pi * hi * t)))
        if i < len(digits) - 1:
            parts.append(np.zeros(n_gap))
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)


def silence(rate: int, ms: float) -> np.ndarray:
    return np.zeros(round(rate * ms / 1000), dtype=np.float32)


class DtmfDecoder:
    """Streaming detector; `feed()` returns keys as they are pressed, once per press."""

    def __init__(self, rate: int = 48000, *, min_tone_ms: float = 40, min_gap_ms: float = 40,
                 tolerance: float = 0.025, max_twist_db: float = 8.0, min_level_dbfs: float = -40.0,
                 min_tone_ratio: float = 0.75) -> None:
        self.rate = rate
        hop_ms = min(10.0, min(min_tone_ms, min_gap_ms) / 4)
        self.hop = max(16, round(rate * hop_ms / 1000))
        self.win = 2 * self.hop
        self.tolerance = tolerance
        self.max_twist_db = max_twist_db
        self.min_energy = self.win * 10 ** (min_level_dbfs / 10)  # two tones at the floor level
        self.min_tone_ratio = min_tone_ratio
        self._nfft = 1 << int(np.ceil(np.log2(rate / 4)))  # ~3-4 Hz bins before interpolation
        self._window = np.hanning(self.win).astype(np.float64)
        self._freqs = np.fft.rfftfreq(self._nfft, 1 / rate)
        self._lo_band = (self._freqs > 600) & (self._freqs < 1050)
        self._hi_band = (self._freqs > 1100) & (self._freqs < 1800)
        self._audio_band = (self._freqs > 50) & (self._freqs < 4000)
        self._buf = np.zeros(0, dtype=np.float32)
        self._consumed = 0        # samples dropped from the front of _buf
        self._history: deque[str | None] = deque(maxlen=2)
        self._current: str | None = None
        self._none_run = 0
        self.tone_spans: list[tuple[int, int]] = []  # input-rate spans of windows holding a key, last feed

    # ----- public --------------------------------------------------------------------
    def feed(self, samples: np.ndarray) -> list[str]:
        return [d for d, _ in self.feed_timed(samples)]

    def feed_timed(self, samples: np.ndarray) -> list[tuple[str, int]]:
        """Like feed(), with the input-rate sample position where each key started."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate((self._buf, x))
        events: list[tuple[str, int]] = []
        self.tone_spans = []
        i = 0
        while i + self.win <= len(self._buf):
            key = self._classify(self._buf[i:i + self.win].astype(np.float64))
            start = self._consumed + i
            if key is not None:
                self.tone_spans.append((start, start + self.win))
            ev = self._step(key)
            if ev is not None:  # the first of the two agreeing windows, at its centre
                events.append((ev, start - self.hop + self.win // 2))
            i += self.hop
        self._buf = self._buf[i:]
        self._consumed += i
        return events

    @property
    def position(self) -> int:
        """Input samples already classified (windows lag the input by up to one window)."""
        return self._consumed

    def reset(self) -> None:
        self._history.clear()
        self._current = None
        self._none_run = 0

    # ----- internals -------------------------------------------------------------------
    def _step(self, key: str | None) -> str | None:
        self._history.append(key)
        if key is None:
            self._none_run += 1
            if self._none_run >= 2:
                self._current = None
            return None
        self._none_run = 0
        if len(self._history) == 2 and self._history[0] == key and key != self._current:
            self._current = key
            return key
        return None

    def _peak(self, p: np.ndarray, band: np.ndarray) -> tuple[float, float]:
        idx = np.flatnonzero(band)
        k = int(idx[np.argmax(p[idx])])
        a, b, c = np.log(p[k - 1] + 1e-30), np.log(p[k] + 1e-30), np.log(p[k + 1] + 1e-30)
        den = a - 2 * b + c
        d = 0.5 * (a - c) / den if den < 0 else 0.0
        return (k + d) * self.rate / self._nfft, p[k]

    def _classify(self, x: np.ndarray) -> str | None:
        energy = float(np.dot(x, x))
        if energy < self.min_energy:  # quiet: no key (and no FFT)
            return None
        h = self.win // 2
        e1 = float(np.dot(x[:h], x[:h]))
        if not 0.4 < e1 / (energy - e1 + 1e-30) < 2.5:  # not steady: a tone edge, a click, speech onset
            return None
        spec = np.fft.rfft(x * self._window, self._nfft)
        p = spec.real ** 2 + spec.imag ** 2
        f_lo, p_lo = self._peak(p, self._lo_band)
        f_hi, p_hi = self._peak(p, self._hi_band)
        row = _nearest(f_lo, LOW, self.tolerance)
        col = _nearest(f_hi, HIGH, self.tolerance)
        if row is None or col is None:
            return None
        twist = 10 * np.log10((p_hi + 1e-30) / (p_lo + 1e-30))
        if abs(twist) > self.max_twist_db:
            return None
        # energy of the two tones: spectrum within the Hann main lobe (±2 bins of 1/T) of each peak
        lobe = 2.0 * self.rate / self.win
        near = (np.abs(self._freqs - f_lo) < lobe) | (np.abs(self._freqs - f_hi) < lobe)
        total = float(p[self._audio_band].sum())
        if total <= 0:
            return None
        tone_e = float(p[near & self._audio_band].sum())
        if tone_e / total < self.min_tone_ratio:
            return None
        return KEYS[row][col]


def _nearest(f: float, table: tuple[float, ...], tol: float) -> int | None:
    for i, ref in enumerate(table):
        if abs(f - ref) <= tol * ref:
            return i
    return None

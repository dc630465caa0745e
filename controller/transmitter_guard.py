"""Transmitter alarms and the protective decisions that go with them.

High VSWR means power is coming back from a damaged antenna or feeder (lightning
likes masts) and can destroy the final stage: fold power back first, switch the carrier
off if it persists or is severe. An unlocked PLL radiates off frequency, which the
licence forbids: carrier off until it locks again. These are *decisions* returned as
`TransmitterAction`s; the daemon carries them out through the driver, which never
decides policy itself.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from controller.alarms import AlarmManager
from controller.storms import StormLog, local_hm, local_hms

if TYPE_CHECKING:
    from controller.diagnosis import DiagnosisSettings


@dataclass(frozen=True)
class TransmitterAction:
    """A protective decision for the daemon to carry out on the transmitter driver."""

    action: Literal["foldback", "carrier_off", "restore"]
    power_share: float | None  # share of configured power for foldback/restore
    reason: str


@dataclass
class TransmitterGuard:
    cfg: DiagnosisSettings
    alarms: AlarmManager
    storms: StormLog
    state: str = "normal"  # normal | foldback | carrier_off
    off_reason: str | None = None  # vswr | pll
    foldback_at: float = 0.0
    ok_since: float | None = None
    last_ts: float | None = None
    pll_since: float | None = None
    vswr_ev: list[str] = field(default_factory=list)
    pll_ev: list[str] = field(default_factory=list)
    temp_ev: list[str] | None = None
    unreach_ev: list[str] | None = None

    def _hms(self, ts: float) -> str:
        return local_hms(ts, self.storms.tz)

    def reading(self, v: Mapping[str, Any], ts: float, now: float) -> list[TransmitterAction]:
        cfg, al = self.cfg, self.alarms
        self.last_ts = ts
        if v.get("reachable") is False:
            detail = f" ({v['detail']})" if v.get("detail") else ""
            self._unreachable(f"no reply from the transmitter since {self._hms(ts)}{detail}")
            return []
        self.unreach_ev = None
        al.condition_off("transmitter.unreachable", None, note=f"answering at {self._hms(ts)}")
        actions = self._vswr(v, ts, now)
        temp = v.get("temperature_c")
        if temp is not None and temp >= cfg.over_temperature_c:
            self.temp_ev = self.temp_ev or [
                f"transmitter temperature {temp:.0f} °C at {local_hm(ts, self.storms.tz)} "
                f"(limit {cfg.over_temperature_c:g} °C): check fan and ventilation"]
            al.condition_on("transmitter.over_temperature", None, severity="major",
                            cause="hardware", confidence=0.6, evidence=self.temp_ev)
        elif temp is not None and temp < cfg.over_temperature_clear_c:
            self.temp_ev = None
            al.condition_off("transmitter.over_temperature", None,
                             note=f"{temp:.0f} °C at {self._hms(ts)}")
        pll = v.get("pll_locked")
        if pll is False:
            if self.pll_since is None:
                self.pll_since = now
                self.pll_ev = [f"PLL unlocked at {self._hms(ts)}: off-frequency transmission"]
            if now - self.pll_since >= cfg.pll_carrier_off_s and self.state != "carrier_off":
                self.state, self.off_reason = "carrier_off", "pll"
                self.pll_ev = [*self.pll_ev, f"carrier switched off at {self._hms(ts)}"]
                actions.append(TransmitterAction("carrier_off", None,
                                                 "PLL unlocked: off-frequency transmission"))
            al.condition_on("transmitter.pll_unlocked", None, severity="critical",
                            cause="hardware", confidence=0.7, evidence=self.pll_ev)
        elif pll is True:
            self.pll_since = None
            al.condition_off("transmitter.pll_unlocked", None,
                             note=f"PLL locked at {self._hms(ts)}")
            if self.state == "carrier_off" and self.off_reason == "pll":
                self.state, self.off_reason = "normal", None
                actions.append(TransmitterAction("restore", 1.0, "PLL locked again"))
        return actions

    def tick(self, now: float) -> None:
        """Readings stopped arriving altogether (driver stuck, cable pulled)."""
        if self.last_ts is not None and now - self.last_ts > self.cfg.transmitter_silence_s:
            self._unreachable(f"no transmitter reading since {self._hms(self.last_ts)}")

    def _unreachable(self, text: str) -> None:
        self.unreach_ev = self.unreach_ev or [text]
        self.alarms.condition_on("transmitter.unreachable", None, severity="critical",
                                 cause="unknown", confidence=0.5, evidence=self.unreach_ev)

    def _vswr(self, v: Mapping[str, Any], ts: float, now: float) -> list[TransmitterAction]:
        cfg = self.cfg
        fwd, ref, vswr = v.get("forward_w"), v.get("reflected_w"), v.get("vswr")
        if vswr is None and fwd and ref is not None and fwd > 0:
            g = math.sqrt(min(ref / fwd, 1.0))
            vswr = (1 + g) / (1 - g) if g < 1 else math.inf
        on_air = v.get("on_air", fwd > 0 if fwd is not None else self.state != "carrier_off")
        if vswr is None or not on_air:
            return []  # no RF, no meaningful VSWR
        if self.state == "carrier_off" and self.off_reason == "vswr":
            self.state, self.off_reason = "normal", None  # carrier restored by someone: re-arm
        readout = f"VSWR {vswr:.1f}" + (f" (forward {fwd:.0f} W, reflected {ref:.0f} W)"
                                        if fwd is not None and ref is not None else "")
        at, acts = self._hms(ts), []
        if vswr < cfg.vswr_foldback:
            if vswr < cfg.vswr_clear:
                self.ok_since = self.ok_since if self.ok_since is not None else now
                if self.state == "foldback" and now - self.ok_since >= cfg.vswr_restore_after_s:
                    self.state = "normal"
                    acts.append(TransmitterAction("restore", 1.0, f"{readout}: back to normal"))
                if self.state == "normal":
                    self.alarms.condition_off("transmitter.vswr_high", None,
                                              note=f"{readout} at {at}")
                    if self.alarms.get("transmitter.vswr_high") is None:
                        self.vswr_ev = []
            return acts
        self.ok_since = None
        persists = self.state == "foldback" and now - self.foldback_at >= cfg.vswr_persist_s
        if vswr >= cfg.vswr_carrier_off or persists:
            self.vswr_ev.append(
                f"{readout} still above {cfg.vswr_foldback:g} after {now - self.foldback_at:.0f} s "
                f"at reduced power: carrier switched off at {at}" if persists else
                f"{readout} at {at}, at or above {cfg.vswr_carrier_off:g}: carrier switched off")
            self.state, self.off_reason = "carrier_off", "vswr"
            acts.append(TransmitterAction("carrier_off", None, f"{readout} persists"
                                          if persists else f"{readout} too high"))
        elif self.state == "normal":
            self.state, self.foldback_at = "foldback", now
            self.vswr_ev.append(f"{readout} at {at} above {cfg.vswr_foldback:g}: power folded "
                                f"back to {cfg.foldback_power_share:.0%}")
            acts.append(TransmitterAction("foldback", cfg.foldback_power_share,
                                          f"{readout} above {cfg.vswr_foldback:g}"))
        strikes, sid = self.storms.near(ts - cfg.fault_after_storm_s, ts)
        cur = self.alarms.get("transmitter.vswr_high")
        if strikes:
            cause, conf, extra = "lightning", 0.7, [self.storms.text(strikes)]
        elif cur and cur["cause"] == "lightning" and cur.get("incident_id"):
            # a restart forgot the storm this alarm rested on: keep the diagnosis
            cause, conf, sid = cur["cause"], cur["confidence"], cur["incident_id"]
            extra = [e for e in cur["evidence"] if e.startswith("storm: ")]
        else:
            cause, conf, extra = "hardware", 0.6, ["check antenna, feeder cable and connectors"]
        self.alarms.condition_on("transmitter.vswr_high", None, severity="critical", cause=cause,
                                 confidence=conf, evidence=[*self.vswr_ev, *extra],
                                 incident_id=sid)
        return acts

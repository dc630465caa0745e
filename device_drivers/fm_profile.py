"""The `fm:` section of an fm_receiver firmware profile: how the commune's FM receiver
clusters are addressed, by DTMF tones in the programme audio or by RDS data.

Addressable PA receivers listen to one frequency and switch their amplifier on only when
a code for them arrives.  The logical commands are the same for both signalling kinds:

- page ``{address}`` (one cluster), group ``{group}``, all-call: enable the amplifier;
- page-off ``{address}``, group-off, all-off: disable it again (the "release");
- volume ``{level}`` (0-9): set the volume of every currently enabled receiver.

Each command is a text template; for DTMF it is keyed as tones (alphabet 0-9 * # A-D),
for RDS the same text is the payload of a UECP transparent-data-channel message.  The
profile validator renders every possible address/group/level and rejects templates that
two different commands could render to the same code, because a receiver would then
wake for somebody else's announcement.
"""
from __future__ import annotations

import itertools
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTMF_KEYS = "123A456B789C*0#D"

COMMANDS = ("page", "group", "all_call", "page_off", "group_off", "all_off", "volume")
_PLACEHOLDER = {"page": "address", "page_off": "address", "group": "group",
                "group_off": "group", "volume": "level"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FmCodes(_Strict):
    """Code templates.  ``volume`` may be null for receivers without remote volume."""
    page: str = "*{address}#"
    group: str = "*9{group}#"
    all_call: str = "*000#"
    page_off: str = "#{address}*"
    group_off: str = "#9{group}*"
    all_off: str = "#000*"
    volume: str | None = "*D{level}#"

    def template(self, command: str) -> str | None:
        return getattr(self, command)

    def render(self, command: str, value: str | int | None = None) -> str:
        t = self.template(command)
        if t is None:
            raise ValueError(f"this receiver has no {command} code")
        ph = _PLACEHOLDER.get(command)
        return t.format(**({ph: value} if ph else {}))


class DtmfSpec(_Strict):
    """Tone timing as the transmitter should key it and the receivers need it."""
    tone_ms: int = Field(70, ge=40, le=1000, description="duration of each key")
    gap_ms: int = Field(70, ge=20, le=1000, description="silence between keys of one code")
    code_gap_ms: int = Field(250, ge=40, le=5000, description="silence between two codes")
    level_dbfs: float = Field(-10.0, ge=-40.0, le=-3.0, description="level of each of the two tones")
    twist_db: float = Field(0.0, ge=-4.0, le=4.0, description="high group minus low group level")
    lead_in_ms: int = Field(300, ge=0, le=10000, description="silence before the first code")
    lead_out_ms: int = Field(300, ge=0, le=10000, description="silence after the last code")
    interdigit_timeout_ms: int = Field(1500, ge=200, le=10000,
                                       description="receivers forget a partial code after this")


class RdsSpec(_Strict):
    """Codes carried as UECP TDC (0x26) messages; many encoders never ACK, so repeat."""
    tdc_channel: int = Field(0, ge=0, le=31)
    prefix: str = Field("", max_length=8, description="constant text before each code")
    repeats: int = Field(3, ge=1, le=10, description="times each message is sent")
    repeat_gap_ms: int = Field(200, ge=0, le=10000)


class FmReceiverSpec(_Strict):
    signalling: Literal["dtmf", "rds"]
    address_digits: int = Field(3, ge=1, le=6)
    group_digits: int = Field(1, ge=1, le=3)
    codes: FmCodes = Field(default_factory=FmCodes)
    volume_levels: int = Field(10, ge=2, le=10, description="levels 0..volume_levels-1")
    wake_on_carrier: bool = Field(True, description="receiver sleeps without carrier and wakes on it")
    wake_delay_ms: int = Field(500, ge=0, le=10000, description="carrier-on to decoder ready")
    sleep_after_carrier_drop_s: float = Field(5.0, ge=0, le=600)
    play_threshold_dbfs: float = Field(-45.0, ge=-80, le=-10,
                                       description="programme level at which the horn audibly plays")
    dtmf: DtmfSpec | None = None
    rds: RdsSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> FmReceiverSpec:
        other = "rds" if self.signalling == "dtmf" else "dtmf"
        if getattr(self, other) is not None:
            raise ValueError(f"a {other}: section does not apply when signalling is {self.signalling}")
        if self.signalling == "dtmf" and self.dtmf is None:
            self.dtmf = DtmfSpec()
        if self.signalling == "rds" and self.rds is None:
            self.rds = RdsSpec()
        for cmd in COMMANDS:
            t = self.codes.template(cmd)
            if t is None:
                if cmd != "volume":
                    raise ValueError(f"codes.{cmd} is required")
                continue
            names = set(re.findall(r"\{(\w*)\}", t))
            want = {_PLACEHOLDER[cmd]} if cmd in _PLACEHOLDER else set()
            if names != want:
                raise ValueError(f"codes.{cmd} {t!r} must use exactly {sorted(want) or 'no placeholder'}"
                                 f" (got {sorted(names) or 'none'})")
            if self.signalling == "dtmf":
                bad = set(re.sub(r"\{\w*\}", "", t)) - set(DTMF_KEYS)
                if bad:
                    raise ValueError(f"codes.{cmd} {t!r} has {''.join(sorted(bad))!r} which is not "
                                     f"a DTMF key (allowed {DTMF_KEYS})")
        seen: dict[str, str] = {}
        for code, meaning in self.all_codes():
            if code in seen and seen[code] != meaning:
                raise ValueError(f"code {code!r} would mean both {seen[code]} and {meaning}; "
                                 "change the templates or the digit counts")
            seen[code] = meaning
        return self

    # ----- addressing helpers -------------------------------------------------
    def all_codes(self) -> list[tuple[str, str]]:
        """Every (code, meaning) the templates can produce; all-call wins over page 000."""
        out = [(self.codes.all_call, "all-call"), (self.codes.all_off, "all-off")]
        reserved = {self.codes.all_call, self.codes.all_off}
        for a in _digits(self.address_digits):
            for cmd in ("page", "page_off"):
                c = self.codes.render(cmd, a)
                if c not in reserved:
                    out.append((c, f"{cmd.replace('_', '-')} {a}"))
        for g in _digits(self.group_digits):
            out += [(self.codes.render("group", g), f"group {g}"),
                    (self.codes.render("group_off", g), f"group-off {g}")]
        if self.codes.volume is not None:
            out += [(self.codes.render("volume", v), f"volume {v}") for v in range(self.volume_levels)]
        return out

    def check_addressing(self, address: str, groups: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Errors for a cluster's address/groups under this profile (empty list = usable)."""
        errs = []
        if not (address.isdigit() and len(address) == self.address_digits):
            errs.append(f"address {address!r} must be {self.address_digits} digits")
        elif self.codes.render("page", address) == self.codes.all_call:
            errs.append(f"address {address!r} is the all-call code")
        for g in groups:
            if not (g.isdigit() and len(g) == self.group_digits):
                errs.append(f"group {g!r} must be {self.group_digits} digit(s)")
        return errs


def _digits(n: int):
    return ("".join(p) for p in itertools.product("0123456789", repeat=n))

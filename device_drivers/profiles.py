"""Firmware profiles: one YAML file per device model says how to talk to it.

Adding a supported model must be adding a file, not code, and the person adding it is
a technician with a vendor manual (or a serial sniffer), so every key is checked and
every error points at the file's line (controller.yamlsrc).  The generic byte-level
work lives in `profile_codec.ProfileCodec`; drivers and simulators both use it, so the
two ends of the wire cannot drift apart, and the profile's test_vectors (literal bytes)
catch the case where both are wrong in the same way.

Format reference and a walk-through: docs/firmware-profiles.md.
"""
from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from controller.yamlsrc import YamlError, dotted, line_for, load_model, load_yaml
from device_drivers.fm_profile import FmReceiverSpec
from device_drivers.framing import BinaryFramer, BinarySpec, CrcSpec, LineFramer
from device_drivers.ip_profile import IpMqttSpec

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"
Kind = Literal["transmitter", "rds_encoder", "fm_receiver", "ip_cluster", "lightning_sensor"]
SERIAL_KINDS = ("transmitter", "rds_encoder", "lightning_sensor")
# the logical commands a transmitter driver calls (each takes exactly one argument)
TRANSMITTER_COMMANDS = ("set_carrier", "set_frequency", "set_power")
RESERVED_POINTS = ("reachable", "detail")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_yaml_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("YAML reads unquoted on/off/yes/no/true/false as a boolean; "
                         'put the text in quotes, e.g. "ON"')
    return v


# text a technician may write unquoted (ON, OFF, YES...): a clear error instead of "not a string"
Text = Annotated[str, BeforeValidator(_not_yaml_bool)]


def placeholders(template: str) -> list[str]:
    """Names used in a str.format template, in order ('{freq_mhz:.1f}' -> ['freq_mhz'])."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None


class Identity(_Strict):
    vendor: str
    model: str
    firmware: str = Field("any", description="free-text version range, e.g. '>=2.0,<3'")
    notes: str = ""


# ------------------------------------------------------------------------- transport

class LineFraming(_Strict):
    terminator: str = Field("\r\n", min_length=1, description='YAML "\\r\\n" style escapes')
    max_length: int = Field(256, ge=8, le=65536)
    printable_only: bool = True
    encoding: Literal["ascii", "latin-1"] = "ascii"


class CrcModel(_Strict):
    width: Literal[8, 16, 32]
    poly: int = Field(ge=1)
    init: int = Field(0, ge=0)
    xorout: int = Field(0, ge=0)
    refin: bool = False
    refout: bool = False
    byte_order: Literal["big", "little"] = "big"
    span: Literal["body", "with_stx"] = "body"

    @model_validator(mode="after")
    def _fits(self) -> CrcModel:
        top = 1 << self.width
        for k in ("poly", "init", "xorout"):
            if getattr(self, k) >= top:
                raise ValueError(f"{k} {getattr(self, k):#x} does not fit in {self.width} bits")
        return self


class BinaryFraming(_Strict):
    stx: int = Field(ge=0, le=255)
    etx: int = Field(ge=0, le=255)
    escape: int | None = Field(None, ge=0, le=255)
    escape_scheme: Literal["none", "index", "xor"] = "none"
    escaped: list[int] = Field(default_factory=list, description="bytes stuffed (index scheme order)")
    xor_mask: int = Field(0x20, ge=0, le=255)
    crc: CrcModel | None = None
    max_length: int = Field(1024, ge=4, le=65536)

    @model_validator(mode="after")
    def _consistent(self) -> BinaryFraming:
        if self.escape_scheme != "none" and self.escape is None:
            raise ValueError(f"escape_scheme {self.escape_scheme!r} needs an escape byte")
        return self

    def spec(self) -> BinarySpec:
        c = self.crc
        crc = CrcSpec(c.width, c.poly, c.init, c.xorout, c.refin, c.refout, c.byte_order,
                      c.span) if c else None
        return BinarySpec(self.stx, self.etx, self.escape, self.escape_scheme,
                          tuple(self.escaped), self.xor_mask, crc, self.max_length)


class Transport(_Strict):
    type: Literal["serial"] = "serial"
    baud: int = Field(9600, ge=50, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    framing: Literal["line", "binary"] = "line"
    line: LineFraming | None = None
    binary: BinaryFraming | None = None
    push: bool = Field(False, description="the device sends without being asked")

    @model_validator(mode="after")
    def _framing(self) -> Transport:
        if self.framing == "line" and self.line is None:
            self.line = LineFraming()
        if self.framing == "binary" and self.binary is None:
            raise ValueError("framing: binary needs a binary: section (stx, etx, ...)")
        return self

    def decoder(self) -> LineFramer | BinaryFramer:
        if self.framing == "binary":
            return BinaryFramer(self.binary.spec())  # type: ignore[union-attr]
        ln = self.line
        assert ln is not None
        return LineFramer(ln.terminator.encode("latin-1"), ln.max_length, ln.printable_only)


# -------------------------------------------------------------------------- commands

class ArgSpec(_Strict):
    type: Literal["int", "float", "enum", "bool", "str"]
    min: float | None = None
    max: float | None = None
    step: float | None = Field(None, gt=0)
    choices: list[Text] | None = None
    on_text: Text = "1"
    off_text: Text = "0"
    scale: float = Field(1.0, description="sent value = given value * scale")
    unit: str = ""
    max_length: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ArgSpec:
        if self.type == "enum" and not self.choices:
            raise ValueError("an enum argument needs choices")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self


class CommandSpec(_Strict):
    send: str = Field(description="template, e.g. 'TX.FREQ {freq_mhz:.1f}'")
    args: dict[Text, ArgSpec] = Field(default_factory=dict)
    ok: str | None = Field("OK", description="reply meaning success (template); null = no reply")
    timeout_s: float | None = Field(None, gt=0, le=60)
    retries: int | None = Field(None, ge=0, le=10)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> CommandSpec:
        used = placeholders(self.send)
        missing, unused = set(used) - set(self.args), set(self.args) - set(used)
        if missing:
            raise ValueError(f"send uses {sorted(missing)} which are not in args "
                             f"(args: {sorted(self.args) or 'none'})")
        if unused:
            raise ValueError(f"args {sorted(unused)} are not used in send {self.send!r}")
        if self.ok is not None and set(placeholders(self.ok)) - set(self.args):
            raise ValueError(f"ok {self.ok!r} uses names that are not args")
        return self


# ---------------------------------------------------------------------------- values

class ValueSpec(_Strict):
    """raw text/number -> value: map first, else number * scale + offset."""
    type: Literal["float", "int", "bool", "str", "enum", "flags"] = "float"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    base: Literal[2, 8, 10, 16] = 10
    map: dict[Text, Any] | None = Field(None, description="raw text -> value (bool/enum/str)")
    bits: dict[int, str] | None = Field(None, description="flags: bit number -> name")

    @model_validator(mode="after")
    def _check(self) -> ValueSpec:
        if self.type == "enum" and not self.map:
            raise ValueError("an enum needs a map of raw text -> value")
        if self.type == "flags" and not self.bits:
            raise ValueError("flags need bits: {bit number: name}")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self


class ParseSpec(_Strict):
    regex: str | None = None
    group: str = "value"
    slice: tuple[int, int | None] | None = None
    struct: str | None = Field(None, description="struct format of a binary reply")
    index: int = Field(0, ge=0, description="which struct field")

    @model_validator(mode="after")
    def _one(self) -> ParseSpec:
        given = [k for k in ("regex", "slice", "struct") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of regex, slice, struct (got {given or 'none'})")
        if self.regex is not None:
            try:
                rx = re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
            if self.group not in rx.groupindex:
                raise ValueError(f"regex {self.regex!r} has no named group (?P<{self.group}>...)")
        if self.struct is not None:
            import struct
            try:
                size = struct.calcsize(self.struct)
                if size > 65536:  # no frame is longer; and bytes(size) below must stay small
                    raise ValueError(f"struct {self.struct!r} needs {size} bytes; "
                                     "a reply is at most 65536")
                n = len(struct.unpack(self.struct, bytes(size)))
            except struct.error as e:
                raise ValueError(f"struct {self.struct!r}: {e}") from None
            if self.index >= n:
                raise ValueError(f"index {self.index} but struct {self.struct!r} has {n} fields")
        return self


class PointSpec(ValueSpec):
    query: str = Field(description="request text that makes the device report this point")
    reply: str | None = Field(None, description="reply template, e.g. 'TX.FREQ={value:.1f}'")
    parse: ParseSpec | None = None
    poll: Literal["fast", "slow", "static"] = "slow"
    description: str = ""

    @model_validator(mode="after")
    def _how(self) -> PointSpec:
        if self.reply is None and self.parse is None:
            raise ValueError("a point needs a reply template or a parse rule (or both)")
        if self.reply is not None:
            placeholders(self.reply)
        return self


class EventSpec(_Strict):
    """A line the device pushes; `line` is a template whose placeholders are the fields."""
    line: str | None = None
    regex: str | None = None
    fields: dict[str, ValueSpec] = Field(default_factory=dict)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> EventSpec:
        if (self.line is None) == (self.regex is None):
            raise ValueError("give exactly one of line (template) or regex")
        names = placeholders(self.line) if self.line is not None else list(
            re.compile(self.regex).groupindex)  # type: ignore[arg-type]
        if set(names) != set(self.fields):
            raise ValueError(f"fields {sorted(self.fields)} must be exactly the names in the "
                             f"{'line' if self.line else 'regex'} ({sorted(names)})")
        return self


# ---------------------------------------------------------------------------- alarms

class ProtectiveAction(_Strict):
    """What the profile's maker recommends; the controller decides and carries it out."""
    foldback_to_w: float | None = Field(None, gt=0)
    foldback_share: float | None = Field(None, gt=0, lt=1)
    carrier_off_after_s: float | None = Field(None, ge=0)
    carrier_off_above: float | None = None


class AlarmSpec(_Strict):
    code: str = Field(pattern=r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
    point: str
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    threshold: float | bool | str
    clear_threshold: float | None = Field(None, description="hysteresis: clears past this")
    severity: Literal["info", "minor", "major", "critical"]
    requires: dict[str, Any] = Field(default_factory=dict, description="point: value preconditions")
    action: ProtectiveAction | None = None
    description: str = ""


class Timeouts(_Strict):
    command_timeout_s: float = Field(1.0, gt=0, le=60)
    retries: int = Field(2, ge=0, le=10)
    min_gap_ms: int = Field(0, ge=0, le=10000)
    reconnect_max_s: float = Field(5.0, gt=0, le=300)


class UecpSpec(_Strict):
    """kind rds_encoder: UECP (SPB 490) settings; many encoders never acknowledge."""
    site_address: int = Field(0, ge=0, le=1023)
    encoder_address: int = Field(0, ge=0, le=63)
    acks: bool = False
    repeat: int = Field(3, ge=1, le=10, description="sends of each frame when acks is false")
    repeat_gap_ms: int = Field(100, ge=0, le=10000)
    data_channel: Literal["tdc"] = "tdc"


class TestVector(_Strict):
    __test__ = False  # not a pytest class
    name: str
    request: str = ""
    response: str = ""
    format: Literal["text", "hex"] | None = None
    command: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    expect: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    event: str | None = None


class Profile(_Strict):
    kind: Kind
    identity: Identity
    assumptions: list[str] = Field(default_factory=list)
    transport: Transport | None = None
    commands: dict[str, CommandSpec] = Field(default_factory=dict)
    points: dict[str, PointSpec] = Field(default_factory=dict)
    events: dict[str, EventSpec] = Field(default_factory=dict)
    errors: dict[Text, str] = Field(default_factory=dict, description="reply -> meaning")
    alarms: list[AlarmSpec] = Field(default_factory=list)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    capabilities: list[str] = Field(default_factory=list)
    test_vectors: list[TestVector] = Field(default_factory=list)
    uecp: UecpSpec | None = None
    fm: FmReceiverSpec | None = None
    mqtt: IpMqttSpec | None = None
    _name: str = PrivateAttr("")  # file stem, filled by the loader

    @property
    def name(self) -> str:
        return self._name

    def problems(self) -> list[tuple[tuple, str]]:
        """Cross-section mistakes pydantic cannot see, as (location, message)."""
        errs: list[tuple[tuple, str]] = []
        sections = {"fm": "fm_receiver", "mqtt": "ip_cluster", "uecp": "rds_encoder"}
        for sec, kind in sections.items():
            if getattr(self, sec) is None and self.kind == kind:
                errs.append(((sec,), f"kind {kind} needs a {sec}: section"))
            elif getattr(self, sec) is not None and self.kind != kind:
                errs.append(((sec,), f"{sec}: is only for kind {kind} (this is {self.kind})"))
        if self.kind in SERIAL_KINDS and self.transport is None:
            errs.append((("transport",), f"kind {self.kind} needs a transport: section"))
        if self.kind == "transmitter":
            for c in TRANSMITTER_COMMANDS:
                if c not in self.commands:
                    errs.append((("commands",), f"a transmitter needs command {c!r}"))
                elif len(self.commands[c].args) != 1:
                    errs.append((("commands", c, "args"), f"{c} takes exactly one argument"))
        if self.kind == "lightning_sensor":
            ev = self.events.get("strike")
            if ev is None or not {"distance_km", "energy"} <= set(ev.fields):
                errs.append((("events",), "a lightning sensor needs event 'strike' with fields "
                             "distance_km and energy"))
        for p in self.points:
            if p in RESERVED_POINTS:
                errs.append((("points", p), f"point name {p!r} is reserved"))
        for q, names in self._by_query().items():
            for n in names:
                r = self.points[n].reply
                if r is not None:
                    bad = set(placeholders(r)) - {"value", *names}
                    if bad:
                        errs.append((("points", n, "reply"), f"reply uses {sorted(bad)}: only "
                                     f"'value' or points sharing query {q!r} ({names})"))
        for i, a in enumerate(self.alarms):
            for j, p in enumerate([a.point, *a.requires]):
                if p not in self.points:
                    errs.append((("alarms", i, "point" if j == 0 else "requires"),
                                 _unknown("point", p, self.points)))
        for i, v in enumerate(self.test_vectors):
            if v.command is not None and self.kind != "rds_encoder" and v.command not in self.commands:
                errs.append((("test_vectors", i, "command"), _unknown("command", v.command, self.commands)))
            if v.event is not None and v.event not in self.events:
                errs.append((("test_vectors", i, "event"), _unknown("event", v.event, self.events)))
            known = self.events[v.event].fields if v.event in self.events else self.points
            if self.kind in ("transmitter", "lightning_sensor"):
                for k in v.expect:
                    if k not in known:
                        errs.append((("test_vectors", i, "expect", k), _unknown("name", k, known)))
        return errs

    def _by_query(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n, p in self.points.items():
            out.setdefault(p.query, []).append(n)
        return out


def _unknown(what: str, name: str, known: Any) -> str:
    hint = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return (f"no {what} {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; known: {', '.join(known) or 'none'}")


# --------------------------------------------------------------------------- loading

def _resolve(name_or_path: str | Path) -> Path:
    s = str(name_or_path)
    p = Path(s)
    if "/" in s or s.endswith((".yaml", ".yml")):
        return p
    return PROFILE_DIR / f"{s}.yaml"


def _load(path: Path) -> Profile:
    prof = load_model(path, Profile)
    probs = prof.problems()
    if probs:
        _, lines = load_yaml(path)
        raise YamlError([f"{path}:{line_for(lines, loc)}: {dotted(loc)}: {msg}" for loc, msg in probs])
    prof._name = path.stem
    return prof


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (file stem) or any profile file by path; YamlError if bad."""
    path = _resolve(name_or_path)
    if not path.exists():
        names = [p.stem for p in sorted(PROFILE_DIR.glob("*.yaml"))]
        raise YamlError([_unknown("profile", str(name_or_path), names)
                         + f" (looked for {path})"])
    return _load(path)


def list_profiles() -> list[tuple[str, str, str, str, str]]:
    """(name, kind, vendor, model, firmware) of every shipped profile; broken ones say so."""
    rows = []
    for p in sorted(PROFILE_DIR.glob("*.yaml")):
        try:
            prof = _load(p)
        except YamlError as e:
            rows.append((p.stem, "INVALID", "-", e.errors[0] if e.errors else "?", "-"))
            continue
        rows.append((p.stem, prof.kind, prof.identity.vendor, prof.identity.model,
                     prof.identity.firmware))
    return rows


def check_profile(path: str | Path) -> list[str]:
    """Every problem of one profile file as 'FILE:LINE: where: what'; [] when it is fine."""
    try:
        _load(_resolve(path))
    except YamlError as e:
        return list(e.errors)
    return []


def __getattr__(name: str) -> Any:  # ProfileCodec lives next door (kept small)
    if name == "ProfileCodec":
        from device_drivers.profile_codec import ProfileCodec
        return ProfileCodec
    raise AttributeError(name)

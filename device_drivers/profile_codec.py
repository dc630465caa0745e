"""Both ends of a text/struct serial protocol, driven only by a firmware profile.

Host side (drivers): render a command with checked arguments, recognise its reply, parse
point replies and pushed event lines.  Device side (simulators): recognise a command line
and its arguments, render point replies and event lines.  A template like
``TX.FREQ={value:.1f}`` is rendered with str.format and, read the other way, becomes the
anchored regex ``^TX\\.FREQ=(?P<value>.+?)$``.
"""
from __future__ import annotations

import math
import operator
import re
import string
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from device_drivers.profiles import ArgSpec, Profile, ValueSpec, placeholders

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne}


class DeviceError(Exception):
    """The device answered with one of the profile's error replies."""

    def __init__(self, command: str, reply: str, meaning: str):
        self.command, self.reply, self.meaning = command, reply, meaning
        super().__init__(f"{command}: device replied {reply!r} ({meaning})")


class AlarmState(NamedTuple):
    code: str
    severity: str
    active: bool
    detail: str


def template_regex(template: str, groups: dict[str, str] | None = None) -> re.Pattern[str]:
    """Anchored regex reading `template` back: literal text must be equal, each placeholder
    becomes `groups[name]` (a regex fragment, typically a named group) or any text."""
    groups = groups or {}
    out, seen = ["^"], set()
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is None:
            continue
        frag = groups.get(field, "(?:.+?)")
        m = re.match(r"\(\?P<(\w+)>", frag)
        if m and m.group(1) in seen:
            frag = f"(?P={m.group(1)})"  # the same name twice must carry the same text
        elif m:
            seen.add(m.group(1))
        out.append(frag)
    out.append("$")
    return re.compile("".join(out))


def _num(raw: str, v: ValueSpec) -> float | int:
    return int(raw, v.base) if v.type in ("int", "flags") or v.base != 10 else float(raw)


def to_value(raw: Any, v: ValueSpec) -> Any:
    """Raw reply field -> value per the profile; ValueError if it does not fit."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if isinstance(raw, str):
        raw = raw.strip()
        if v.map is not None:
            for k, val in v.map.items():
                if str(k).upper() == raw.upper():
                    return val
            if v.type in ("bool", "enum"):
                raise ValueError(f"{raw!r} is not one of {list(v.map)}")
        if v.type == "str":
            return raw
        if v.type == "bool":
            if raw.upper() in ("1", "ON", "TRUE", "YES"):
                return True
            if raw.upper() in ("0", "OFF", "FALSE", "NO"):
                return False
            raise ValueError(f"{raw!r} is not a boolean")
        raw = _num(raw, v)
    if v.type == "flags":
        n = int(raw)
        bits = v.bits or {}
        return [bits.get(i, f"bit{i}") for i in range(n.bit_length()) if n >> i & 1]
    if v.type == "bool":
        return bool(raw)
    x = raw * v.scale + v.offset
    if v.type == "int":
        return int(round(x))
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"{raw!r} is not a finite number")
    return float(x)


def to_raw(value: Any, v: ValueSpec) -> Any:
    """Inverse of to_value, for simulators rendering replies."""
    if v.map is not None:
        for k, val in v.map.items():
            if val == value and (val is not None or value is None):
                if v.type in ("float", "int") and isinstance(k, str):
                    return _num(k, v)
                return k
    if v.type == "flags":
        names = {name: bit for bit, name in (v.bits or {}).items()}
        return sum(1 << names[n] for n in value if n in names)
    if v.type == "bool":
        return int(bool(value))
    if v.type in ("str", "enum"):
        return value
    raw = (value - v.offset) / v.scale
    return int(round(raw)) if v.type == "int" or v.base != 10 else raw


class ProfileCodec:
    def __init__(self, profile: Profile):
        self.p = profile
        enc = profile.transport.line.encoding if profile.transport and profile.transport.line else "ascii"
        self.encoding = enc
        self.by_query = profile._by_query()
        self._point_rx: dict[str, re.Pattern[str]] = {}
        for name, pt in profile.points.items():
            if pt.parse is not None and pt.parse.regex is not None:
                self._point_rx[name] = re.compile(pt.parse.regex)
            elif pt.parse is None and pt.reply is not None:
                own = "value" if "value" in placeholders(pt.reply) else name
                self._point_rx[name] = template_regex(pt.reply, {own: "(?P<value>.+?)"})
        self._event_rx = {
            n: re.compile(e.regex) if e.regex else
            template_regex(e.line or "", {f: f"(?P<{f}>.+?)" for f in e.fields})
            for n, e in profile.events.items()}
        self._cmd_rx = {
            n: template_regex(c.send, {a: f"(?P<{a}>{self._arg_pattern(s)})" for a, s in c.args.items()})
            for n, c in profile.commands.items()}

    # ---- host side: commands -----------------------------------------------------------
    def command_args(self, command: str, *pos: Any, **kw: Any) -> dict[str, Any]:
        spec = self.p.commands.get(command)
        if spec is None:
            raise ValueError(f"profile {self.p.name!r} has no command {command!r} "
                             f"(has {', '.join(self.p.commands) or 'none'})")
        names = list(spec.args)
        if len(pos) > len(names):
            raise ValueError(f"{command} takes {len(names)} argument(s): {names}")
        given = dict(zip(names, pos, strict=False)) | kw
        unknown, missing = set(given) - set(names), set(names) - set(given)
        if unknown or missing:
            raise ValueError(f"{command} takes {names}; missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        return {n: self.check_arg(command, n, spec.args[n], given[n]) for n in names}

    @staticmethod
    def check_arg(command: str, name: str, a: ArgSpec, value: Any) -> Any:
        """Value in the argument's units -> the value formatted into the template."""
        where = f"{command}: {name} = {value!r}"
        if a.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false")
            return a.on_text if value else a.off_text
        if a.type == "enum":
            for c in a.choices or []:
                if str(value).upper() == c.upper():
                    return c
            raise ValueError(f"{where} is not allowed (allowed {', '.join(a.choices or [])})")
        if a.type == "str":
            s = str(value)
            if a.max_length is not None and len(s) > a.max_length:
                raise ValueError(f"{where} is {len(s)} characters (allowed at most {a.max_length})")
            if not all(0x20 <= ord(ch) < 0x7F for ch in s):
                raise ValueError(f"{where} has characters outside printable ASCII")
            return s
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where} must be a number")
        if a.type == "int" and value != int(value):
            raise ValueError(f"{where} must be a whole number")
        lo = a.min if a.min is not None else -math.inf
        hi = a.max if a.max is not None else math.inf
        rng = f"allowed {a.min if a.min is not None else '-inf'}..{a.max if a.max is not None else 'inf'}"
        rng += f" {a.unit}" if a.unit else ""
        if not lo - 1e-9 <= value <= hi + 1e-9:
            raise ValueError(f"{where} is out of range ({rng})")
        if a.step:
            n = (value - (a.min or 0)) / a.step
            if abs(n - round(n)) > 1e-6:
                raise ValueError(f"{where} is not a multiple of {a.step:g} ({rng} in steps of {a.step:g})")
        scaled = value * a.scale
        return int(round(scaled)) if a.type == "int" else scaled

    def render(self, command: str, *pos: Any, **kw: Any) -> bytes:
        """Payload (no framing) of a command; ValueError naming the arg, value and what is allowed."""
        args = self.command_args(command, *pos, **kw)
        return self.p.commands[command].send.format(**args).encode(self.encoding)

    def reply_matcher(self, command: str, args: dict[str, Any]) -> Callable[[bytes], bool] | None:
        ok = self.p.commands[command].ok
        if ok is None:
            return None
        want = ok.format(**args)
        return lambda f: self._text(f) == want or self._text(f) in self.p.errors

    def check_reply(self, command: str, frame: bytes) -> None:
        text = self._text(frame)
        if text in self.p.errors:
            raise DeviceError(command, text, self.p.errors[text])

    def _text(self, frame: bytes) -> str:
        return frame.decode(self.encoding, "replace") if isinstance(frame, bytes) else str(frame)

    # ---- host side: points and events ----------------------------------------------------
    def queries(self, poll: str = "all") -> dict[str, list[str]]:
        """query text -> point names it reports, for one poll class (or 'all')."""
        return {q: names for q, names in self.by_query.items()
                if poll == "all" or any(self.p.points[n].poll == poll for n in names)}

    def query_matcher(self, query: str) -> Callable[[bytes], bool]:
        names = self.by_query[query]
        rxs = [self._point_rx[n] for n in names if n in self._point_rx]

        def match(frame: bytes) -> bool:
            if not rxs:
                return True  # slice/struct parses: the first reply is the answer
            t = self._text(frame)
            return t in self.p.errors or any(rx.search(t) for rx in rxs)
        return match

    def parse_point(self, name: str, frame: bytes) -> Any:
        pt = self.p.points[name]
        if pt.parse is not None and pt.parse.struct is not None:
            raw = struct.unpack(pt.parse.struct, frame)[pt.parse.index]
        elif pt.parse is not None and pt.parse.slice is not None:
            a, b = pt.parse.slice
            raw = self._text(frame)[a:b]
        else:
            m = self._point_rx[name].search(self._text(frame))
            if m is None:
                raise ValueError(f"reply {self._text(frame)!r} does not match point {name}")
            raw = m.group(pt.parse.group if pt.parse else "value")
        return to_value(raw, pt)

    def parse_points(self, query: str, frame: bytes) -> tuple[dict[str, Any], list[str]]:
        """(values, problems) for every point the query reports."""
        values, problems = {}, []
        for n in self.by_query[query]:
            try:
                values[n] = self.parse_point(n, frame)
            except (ValueError, struct.error, TypeError) as e:
                problems.append(f"{n}: {e}")
        return values, problems

    def parse_event(self, frame: bytes) -> tuple[str, dict[str, Any]] | None:
        text = self._text(frame)
        for name, rx in self._event_rx.items():
            m = rx.search(text)
            if m:
                spec = self.p.events[name]
                return name, {f: to_value(m.group(f), spec.fields[f]) for f in spec.fields}
        return None

    def evaluate_alarms(self, readings: dict[str, Any]) -> list[AlarmState]:
        out = []
        for a in self.p.alarms:
            v = readings.get(a.point)
            unit = self.p.points[a.point].unit
            pre = [k for k, want in a.requires.items() if readings.get(k) != want]
            if v is None:
                out.append(AlarmState(a.code, a.severity, False, f"no reading of {a.point}"))
            elif pre:
                out.append(AlarmState(a.code, a.severity, False,
                                      f"not evaluated: {', '.join(f'{k} != {a.requires[k]!r}' for k in pre)}"))
            else:
                try:
                    active = bool(_OPS[a.op](v, a.threshold))
                except TypeError:
                    active = False
                shown = f"{v:g}" if isinstance(v, float) else repr(v)
                out.append(AlarmState(a.code, a.severity, active,
                                      f"{a.point} {shown}{' ' + unit if unit else ''} "
                                      f"{a.op if active else 'not ' + a.op} {a.threshold}"))
        return out

    # ---- device side (simulators) ----------------------------------------------------------
    @staticmethod
    def _arg_pattern(a: ArgSpec) -> str:
        if a.type == "bool":
            return f"{re.escape(a.on_text)}|{re.escape(a.off_text)}"
        if a.type == "enum":
            return "|".join(re.escape(c) for c in a.choices or [])
        return ".+?"

    def parse_command(self, frame: bytes) -> tuple[str, dict[str, Any]] | None:
        """(command, args in user units) for a command line, None if it is no known command.
        ValueError if the arguments are malformed or out of range (device answers an error)."""
        text = self._text(frame)
        for name, c in self.p.commands.items():
            m = self._cmd_rx[name].match(text)
            if not m:
                continue
            args = {}
            for a, s in c.args.items():
                raw = m.group(a)
                if s.type == "bool":
                    args[a] = raw == s.on_text
                elif s.type in ("enum", "str"):
                    args[a] = raw
                else:
                    try:
                        args[a] = (int(raw) if s.type == "int" else float(raw)) / s.scale
                    except ValueError:
                        raise ValueError(f"{name}: {a} = {raw!r} is not a number") from None
                self.check_arg(name, a, s, args[a])
            return name, args
        return None

    def render_reply(self, query: str, values: dict[str, Any]) -> bytes:
        names = self.by_query[query]
        tmpl = next(self.p.points[n].reply for n in names if self.p.points[n].reply)
        raws = {n: to_raw(values[n], self.p.points[n]) for n in names}
        if len(names) == 1:
            raws["value"] = raws[names[0]]
        return tmpl.format(**raws).encode(self.encoding)

    def render_ok(self, command: str, args: dict[str, Any]) -> bytes | None:
        c = self.p.commands[command]
        if c.ok is None:
            return None
        wire = {a: self.check_arg(command, a, s, args[a]) for a, s in c.args.items()}
        return c.ok.format(**wire).encode(self.encoding)

    def render_event(self, event: str, **fields: Any) -> bytes:
        e = self.p.events[event]
        if e.line is None:
            raise ValueError(f"event {event} has no line template to render")
        return e.line.format(**{f: to_raw(v, e.fields[f]) for f, v in fields.items()}).encode(self.encoding)

    def error_reply(self, meaning_word: str) -> bytes | None:
        """The device's error reply whose meaning mentions `meaning_word` (simulators)."""
        for reply, meaning in self.p.errors.items():
            if meaning_word in meaning.lower():
                return reply.encode(self.encoding)
        return None

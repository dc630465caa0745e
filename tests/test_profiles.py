"""Firmware profiles: every shipped file loads; mistakes are reported at their line."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from controller.yamlsrc import YamlError
from device_drivers.profile_codec import ProfileCodec
from device_drivers.profiles import PROFILE_DIR, check_profile, list_profiles, load_profile

SHIPPED = sorted(PROFILE_DIR.glob("*.yaml"))
KIND_SECTION = {"fm_receiver": "fm", "ip_cluster": "mqtt", "rds_encoder": "uecp"}


def test_the_three_serial_profiles_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"exciter-ascii-v2", "uecp-encoder", "lightning-as3935-bridge"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_profile_loads(path: Path):
    assert check_profile(path) == []
    prof = load_profile(path.stem)
    assert prof.name == path.stem
    assert prof.identity.vendor and prof.identity.model
    assert prof.assumptions, "say what was assumed rather than taken from a vendor manual"
    section = KIND_SECTION.get(prof.kind)
    if section:
        assert getattr(prof, section) is not None
    if prof.kind in ("transmitter", "rds_encoder", "lightning_sensor"):
        assert prof.transport is not None and prof.test_vectors


def test_list_profiles_names_every_file():
    rows = list_profiles()
    assert [r[0] for r in rows] == [p.stem for p in SHIPPED]
    assert all(r[1] != "INVALID" for r in rows), rows
    by_name = {r[0]: r for r in rows}
    assert by_name["exciter-ascii-v2"][1:3] == ("transmitter", "generic")


BROKEN = """\
kind: transmitter
identity: {vendor: acme, model: X1}
transport:
  baud: fast
  framing: line
commands:
  set_frequency:
    send: "F {mhz:.1f}"
    args: {mhz: {type: float, min: 87.5, max: 108}}
  set_power:
    send: "P {w}"
    args: {w: {type: float}}
  set_carrier:
    send: "C {on}"
    args: {on: {type: bool}}
points:
  vswr: {query: "V?", reply: "V={value}", poll: sometimes}
alarms:
  - {code: transmitter.vswr_high, point: vswrr, op: ">", threshold: 2, severity: critical}
timeouts:
  retries: 50
  min_gap: 20
"""


def _errors(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    return check_profile(p)


def test_broken_profile_errors_point_at_their_lines(tmp_path: Path):
    errs = _errors(tmp_path, BROKEN)
    path = str(tmp_path / "broken.yaml")
    text = "\n".join(errs)
    assert all(e.startswith(path + ":") for e in errs), errs
    assert f"{path}:4: transport.baud: " in text and "'fast'" in text               # bad type
    # `on:` unquoted is YAML's boolean true: say so rather than "not a string"
    assert f"{path}:15: commands.set_carrier.args" in text and "put the text in quotes" in text
    assert f"{path}:17: points.vswr.poll: " in text and "'sometimes'" in text      # bad enum
    assert f"{path}:21: timeouts.retries: " in text and "<= 10" in text            # bad range
    assert f"{path}:22: timeouts.min_gap: unknown key 'min_gap' (did you mean 'min_gap_ms'?)" in text


def test_cross_reference_errors_have_lines_and_suggestions(tmp_path: Path):
    text = BROKEN.replace("baud: fast", "baud: 9600").replace("{on}", "{carrier}") \
        .replace("args: {on:", "args: {carrier:").replace("poll: sometimes", "poll: fast") \
        .replace("retries: 50", "retries: 2").replace("min_gap: 20", "min_gap_ms: 20")
    errs = _errors(tmp_path, text)
    assert len(errs) == 1, errs
    assert errs[0].endswith(":19: alarms[0].point: no point 'vswrr' (did you mean 'vswr'?); known: vswr")


def test_missing_kind_sections_and_template_mistakes(tmp_path: Path):
    errs = _errors(tmp_path, "kind: rds_encoder\nidentity: {vendor: a, model: b}\n")
    assert any(":1: uecp: kind rds_encoder needs a uecp: section" in e for e in errs), errs
    text = BROKEN.replace('send: "P {w}"', 'send: "P {watts}"')
    errs = _errors(tmp_path, text)
    assert any(":10: commands.set_power: send uses ['watts'] which are not in args" in e
               for e in errs), errs


def test_unknown_profile_name_suggests_the_near_one():
    with pytest.raises(YamlError, match=r"no profile 'exciter-ascii-v3' \(did you mean 'exciter-ascii-v2'\?\)"):
        load_profile("exciter-ascii-v3")


def test_codec_rejects_bad_arguments_naming_arg_value_and_allowed():
    c = ProfileCodec(load_profile("exciter-ascii-v2"))
    assert c.render("set_frequency", 98.5) == b"TX.FREQ 98.5"
    assert c.render("set_carrier", carrier=False) == b"TX.OPMODE OFF"
    with pytest.raises(ValueError, match=r"freq_mhz = 108.1 is out of range \(allowed 87.5..108.0 MHz\)"):
        c.render("set_frequency", 108.1)
    with pytest.raises(ValueError, match=r"freq_mhz = 98.55 is not a multiple of 0.1"):
        c.render("set_frequency", 98.55)
    with pytest.raises(ValueError, match=r"carrier = 'yes' must be true or false"):
        c.render("set_carrier", "yes")
    with pytest.raises(ValueError, match=r"power_w = nan must be a number"):
        c.render("set_power", float("nan"))
    with pytest.raises(ValueError, match=r"no command 'set_volume'"):
        c.render("set_volume", 3)


PARSE_PROFILE = """\
kind: transmitter
identity: {vendor: acme, model: status-line exciter}
assumptions: [test fixture]
transport: {framing: line}
commands:
  set_frequency: {send: "F{f:05.0f}", args: {f: {type: float, min: 87.5, max: 108, scale: 100}}}
  set_power: {send: "P{w:03d}", args: {w: {type: int, min: 0, max: 500}}}
  set_carrier: {send: "M{m}", args: {m: {type: enum, choices: ["ON", "OFF", STBY]}}}
points:
  forward_w: {query: "S?", parse: {regex: 'FWD:(?P<fwd>\\d+)', group: fwd}, scale: 0.1, unit: W}
  temperature_c: {query: "S?", parse: {slice: [0, 3]}, offset: -40}
  faults: {query: "S?", parse: {regex: 'F=(?P<value>[0-9A-F]{2})'}, type: flags, base: 16,
           bits: {0: vswr, 7: psu}}
  mode: {query: "M?", reply: "MODE {value}", type: enum, map: {"1": "on", "0": "off"}}
"""


def test_regex_slice_struct_and_scaled_args(tmp_path: Path):
    p = tmp_path / "status.yaml"
    p.write_text(PARSE_PROFILE)
    assert check_profile(p) == []
    c = ProfileCodec(load_profile(p))
    assert c.render("set_frequency", 98.5) == b"F09850"
    assert c.render("set_power", 7) == b"P007"
    assert c.render("set_carrier", "stby") == b"MSTBY"
    with pytest.raises(ValueError, match=r"m = 'HALF' is not allowed \(allowed ON, OFF, STBY\)"):
        c.render("set_carrier", "HALF")
    values, problems = c.parse_points("S?", b"075 FWD:1234 F=81")
    assert values == {"forward_w": pytest.approx(123.4), "temperature_c": 35.0,
                      "faults": ["vswr", "psu"]}
    assert problems == []
    assert c.parse_points("M?", b"MODE 1") == ({"mode": "on"}, [])
    assert c.render_reply("M?", {"mode": "off"}) == b"MODE 0"
    assert c.parse_command(b"F09850") == ("set_frequency", {"f": 98.5})
    # struct parse for binary replies
    prof = load_profile(p)
    prof.points["forward_w"].parse = type(prof.points["forward_w"].parse)(struct=">HhB", index=1)
    c2 = ProfileCodec(prof)
    assert c2.parse_point("forward_w", struct.pack(">HhB", 1, -250, 3)) == pytest.approx(-25.0)


def test_cli_profiles_check_reports_a_broken_file(tmp_path: Path):
    p = tmp_path / "broken.yaml"
    p.write_text(BROKEN)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "profiles", "check", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{p}:22: timeouts.min_gap: unknown key" in r.stderr

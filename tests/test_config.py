"""The site file: example configs load, and each class of mistake names file, line and fix."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller.checkconfig import schema_text
from controller.config import load_site
from controller.yamlsrc import YamlError

ROOT = Path(__file__).resolve().parent.parent
LOAXA = [sys.executable, "-m", "controller.cli"]

GOOD = """\
site:
  id: t1
  name: Test
central:
  broker: mqtt://127.0.0.1:1883
transmitter:
  port: /dev/null
  frequency_mhz: 98.5
  power_w: 30
zones:
  - {id: z1, name: Zone 1}
  - {id: z2, name: Zone 2}
clusters:
  - {id: fm01, kind: fm, zone: z1, fm: {address: "101"}}
  - {id: fm02, kind: fm, zone: z2, fm: {address: "102"}}
  - {id: ip01, kind: ip, zone: z1, ip: {device_id: dev1}}
programmes:
  - id: p1
    title: Morning
    source: {tts: {text: "Xin chào"}}
    targets: [z1]
    schedule: {cron: "30 5 * * *"}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def errors_of(path: Path) -> list[str]:
    with pytest.raises(YamlError) as ei:
        load_site(path)
    return ei.value.errors


@pytest.mark.parametrize("name", ["binhlu.yaml", "minimal.yaml"])
def test_example_configs_load(name):
    cfg = load_site(ROOT / "config" / name)
    assert cfg.site.timezone == "Asia/Ho_Chi_Minh"
    if name == "binhlu.yaml":
        kinds = [c.kind for c in cfg.clusters]
        assert kinds.count("ip") == 6 and kinds.count("fm") == 29
        assert [c.id for c in cfg.clusters if c.kind == "ip"] == [f"ip{i:02d}" for i in range(1, 7)]


def test_good_file_loads_and_resolves_targets(tmp_path):
    cfg = load_site(write(tmp_path, GOOD))
    assert cfg.resolve_targets(["z1"]) == (["fm01", "ip01"], [])
    assert cfg.resolve_targets("all")[0] == ["fm01", "fm02", "ip01"]
    assert len(cfg.source_hash) == 64


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = write(tmp_path, GOOD.replace("  name: Test\n", "  name: Test\n  timezon: Asia/Bangkok\n"))
    (err,) = errors_of(p)
    assert err.startswith(f"{p}:4: site.timezon: unknown key 'timezon'")
    assert "did you mean 'timezone'" in err


def test_bad_type_and_out_of_range_report_value_and_allowed(tmp_path):
    text = GOOD.replace("frequency_mhz: 98.5", "frequency_mhz: 120").replace("power_w: 30", "power_w: thirty")
    errs = errors_of(write(tmp_path, text))
    assert any(":8: transmitter.frequency_mhz:" in e and "got 120" in e and "<= 108" in e for e in errs), errs
    assert any(":9: transmitter.power_w:" in e and "'thirty'" in e and "a number" in e for e in errs), errs
    assert len(errs) == 2  # every error, not just the first


def test_dangling_reference_and_duplicate_id(tmp_path):
    text = GOOD.replace("zone: z2, fm: {address: \"102\"}", "zone: z3, fm: {address: \"102\"}")
    text = text.replace("{id: ip01, kind: ip", "{id: fm01, kind: ip")
    text = text.replace("targets: [z1]", "targets: [z1, fm99]")
    errs = errors_of(p := write(tmp_path, text))
    assert any(e.startswith(f"{p}:15: clusters[1].zone: no zone with id 'z3'") for e in errs), errs
    assert any(e.startswith(f"{p}:16: clusters[2].id: duplicate id 'fm01'") for e in errs), errs
    assert any(":21: programmes[0].targets[1]: no zone or cluster with id 'fm99'" in e for e in errs), errs


def test_fm_address_used_twice(tmp_path):
    errs = errors_of(p := write(tmp_path, GOOD.replace('address: "102"', 'address: "101"')))
    assert any(e.startswith(f"{p}:15: clusters[1].fm.address: FM address 101 is already used by fm01") for e in errs)


def test_disabled_target_is_a_warning(tmp_path):
    text = GOOD.replace("{id: fm01, kind: fm, zone: z1,", "{id: fm01, kind: fm, zone: z1, enabled: false,")
    text = text.replace("targets: [z1]", "targets: [fm01, z1]")
    cfg = load_site(write(tmp_path, text))
    assert any("programmes[0].targets[0]: cluster fm01 is disabled" in w for w in cfg.warnings)
    assert cfg.resolve_targets(["z1"]) == (["ip01"], ["fm01"])


def test_yaml_syntax_error_has_a_line(tmp_path):
    errs = errors_of(p := write(tmp_path, GOOD.replace("  name: Test", "  name: [Test")))
    assert errs[0].startswith(f"{p}:")
    assert "YAML syntax" in errs[0]


def test_duplicate_key_is_reported(tmp_path):
    errs = errors_of(p := write(tmp_path, GOOD.replace("  name: Test\n", "  name: Test\n  name: Other\n")))
    assert errs == [f"{p}:4: site.name: key given twice (the later value would silently win; keep one)"]


def test_schema_file_is_current():
    committed = (ROOT / "config" / "site.schema.json").read_text()
    assert committed == schema_text(), "run: loaxa config schema -o config/site.schema.json"


def test_check_config_cli(tmp_path):
    ok = subprocess.run([*LOAXA, "check-config", str(ROOT / "config" / "binhlu.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "35 (6 IP, 29 FM)" in ok.stdout and "news-morning" in ok.stdout
    bad = write(tmp_path, GOOD.replace("power_w: 30", "power_w: -1"))
    r = subprocess.run([*LOAXA, "check-config", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert f"{bad}:9: transmitter.power_w:" in r.stderr


def test_same_priority_overlap_is_reported(tmp_path):
    text = GOOD + """\
  - id: p2
    title: Clash
    source: {tts: {text: "Hai"}}
    targets: [fm01]
    schedule: {cron: "40 5 * * *"}
"""
    p = write(tmp_path, text)
    r = subprocess.run([*LOAXA, "check-config", str(p)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "programmes p1 and p2 (both normal) overlap on 1 cluster(s) (fm01)" in r.stderr


def test_fm_receivers_must_share_a_profile_and_fit_its_code_plan(tmp_path):
    text = GOOD.replace('{id: fm02, kind: fm, zone: z2, fm: {address: "102"}}',
                        '{id: fm02, kind: fm, zone: z2, profile: fm-receiver-rds, fm: {address: "102"}}')
    text = text.replace('{id: fm01, kind: fm, zone: z1, fm: {address: "101"}}',
                        '{id: fm01, kind: fm, zone: z1, fm: {address: "101", groups: ["12"]}}')
    errs = errors_of(p := write(tmp_path, text))
    assert any(e.startswith(f"{p}:15: clusters[1].profile: FM receivers must share one profile") for e in errs), errs
    assert any(e.startswith(f"{p}:14: clusters[0].fm:") and "12" in e for e in errs), errs

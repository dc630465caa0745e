"""FM addressing: exact, minimal covers; the fm: profile section; code air time vs real audio."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from device_drivers import fm_signalling as sig
from device_drivers import uecp
from device_drivers.dtmf import DtmfDecoder
from device_drivers.fm_addressing import FmAddress, plan_codes
from device_drivers.fm_profile import FmReceiverSpec

ROOT = Path(__file__).resolve().parent.parent
R = 48000


def layout(sizes=(7, 6, 6, 5, 5)):
    out, n = {}, 0
    for zone, size in enumerate(sizes, start=1):
        for _ in range(size):
            n += 1
            out[f"fm{n:02d}"] = FmAddress(f"{100 + n:03d}", [str(zone)])
    return out


DTMF = FmReceiverSpec(signalling="dtmf")
CL = layout()
ZONE = {g: {c for c, a in CL.items() if g in a.groups} for g in "12345"}


def test_all_targets_use_all_call():
    plan = plan_codes(set(CL), CL)
    assert plan.wake_codes(DTMF) == ["*000#"] and plan.release_codes(DTMF) == ["#000*"]


def test_zone_uses_its_group_and_two_zones_two_groups():
    assert plan_codes(ZONE["2"], CL).wake_codes(DTMF) == ["*92#"]
    assert sorted(plan_codes(ZONE["2"] | ZONE["5"], CL).wake_codes(DTMF)) == ["*92#", "*95#"]


def test_partial_zone_never_uses_its_group():
    t = ZONE["1"] - {"fm01"}
    plan = plan_codes(t, CL)
    assert plan.wake_codes(DTMF) == [f"*{100 + i}#" for i in range(2, 8)]
    assert plan.release_codes(DTMF) == [f"#{100 + i}*" for i in range(2, 8)]


def test_mixed_zone_and_singles():
    plan = plan_codes(ZONE["3"] | {"fm01", "fm29"}, CL)
    assert plan.wake_codes(DTMF) == ["*93#", "*101#", "*129#"]
    assert plan.covered == ZONE["3"] | {"fm01", "fm29"}


def test_empty_and_unknown_targets():
    assert plan_codes(set(), CL).codes == ()
    with pytest.raises(ValueError, match="not FM clusters: ip01"):
        plan_codes({"fm01", "ip01"}, CL)


def _brute_min(targets, clusters):
    groups = {}
    for c, a in clusters.items():
        for g in a.groups:
            groups.setdefault(g, set()).add(c)
    usable = [g for g, m in groups.items() if m <= targets]
    best = len(targets)
    for k in range(len(usable) + 1):
        for combo in itertools.combinations(usable, k):
            cov = set().union(*(groups[g] for g in combo)) if combo else set()
            best = min(best, k + len(targets - cov))
    return best


layouts = st.integers(2, 14).flatmap(lambda n: st.lists(
    st.frozensets(st.sampled_from("12345678"), max_size=3), min_size=n, max_size=n))


@settings(max_examples=300, deadline=None)
@given(layouts, st.data())
def test_cover_is_exact_and_minimal(group_lists, data):
    clusters = {f"fm{i:02d}": FmAddress(f"{101 + i:03d}", gs) for i, gs in enumerate(group_lists)}
    targets = data.draw(st.sets(st.sampled_from(sorted(clusters))))
    plan = plan_codes(targets, clusters)
    woken = set()
    for code in plan.codes:
        if code.kind == "all_call":
            woken |= set(clusters)
        elif code.kind == "group":
            members = {c for c, a in clusters.items() if code.value in a.groups}
            assert members <= targets, "a group code would wake a non-target"
            woken |= members
        else:
            woken |= {c for c, a in clusters.items() if a.address == code.value}
    assert woken == set(targets)
    expected = 1 if targets and set(targets) == set(clusters) else _brute_min(set(targets), clusters)
    assert len(plan.codes) == expected


def test_air_time_matches_the_audio_actually_produced():
    plan = plan_codes(ZONE["3"] | {"fm01"}, CL)
    audio = sig.wake_audio(plan, DTMF, R, volume=6)
    assert len(audio) / R == pytest.approx(plan.signalling_time_s(DTMF, volume=6), abs=1e-3)
    assert "".join(DtmfDecoder(R).feed(np.concatenate([audio, np.zeros(R // 10)]))) == "*93#*101#*D6#"
    rel = sig.release_audio(plan, DTMF, R)
    assert "".join(DtmfDecoder(R).feed(rel)) == "#93*#101*"


def test_rds_messages_repeat_interleaved_as_tdc():
    spec = FmReceiverSpec(signalling="rds", rds={"tdc_channel": 5, "prefix": "LX", "repeats": 3,
                                                  "repeat_gap_ms": 200})
    msgs = sig.rds_wake(plan_codes(ZONE["1"] | {"fm29"}, CL), spec, volume=4)
    assert [m.code for m in msgs] == ["*91#", "*129#", "*D4#"] * 3
    assert [round(m.at_s, 3) for m in msgs] == [round(0.2 * i, 3) for i in range(9)]
    el = uecp.decode_frame(uecp.encode_frame([msgs[1].element])).elements[0]
    assert el == uecp.Tdc(5, b"LX*129#")
    assert sig.parse_rds_payload(el.data, spec) == "*129#"
    assert sig.parse_rds_payload(b"XX*129#", spec) is None
    with pytest.raises(ValueError, match="DTMF"):
        sig.wake_audio(plan_codes({"fm01"}, CL), spec, R)


def test_volume_out_of_range():
    with pytest.raises(ValueError, match="volume 10"):
        sig.wake_codes(plan_codes({"fm01"}, CL), DTMF, volume=10)


# ----- the fm: profile section -------------------------------------------------------------

def test_ambiguous_templates_rejected():
    with pytest.raises(ValidationError, match=r"'\*900#' would mean both page 900 and group 00"):
        FmReceiverSpec(signalling="dtmf", group_digits=2)


def test_non_dtmf_key_rejected_and_unknown_key_rejected():
    with pytest.raises(ValidationError, match="'V' which is not a DTMF key"):
        FmReceiverSpec(signalling="dtmf", codes={"volume": "*V{level}#"})
    with pytest.raises(ValidationError, match="extra"):
        FmReceiverSpec(signalling="dtmf", dtmf={"tone_ms": 70, "tone_len": 3})
    with pytest.raises(ValidationError, match="greater than or equal to 40"):
        FmReceiverSpec(signalling="dtmf", dtmf={"tone_ms": 30})
    with pytest.raises(ValidationError, match="a rds: section does not apply when signalling is dtmf"):
        FmReceiverSpec(signalling="dtmf", rds={"repeats": 2})
    with pytest.raises(ValidationError, match="exactly"):
        FmReceiverSpec(signalling="dtmf", codes={"page": "*{group}#"})


def test_check_addressing():
    assert DTMF.check_addressing("101", ["1"]) == []
    assert DTMF.check_addressing("000", ["12"]) == ["address '000' is the all-call code",
                                                     "group '12' must be 1 digit(s)"]


@pytest.mark.parametrize("name", ["fm-receiver-dtmf", "fm-receiver-rds"])
def test_shipped_profiles_and_their_test_vectors(name):
    doc = yaml.safe_load((ROOT / "firmware_profiles" / f"{name}.yaml").read_text())
    assert doc["kind"] == "fm_receiver"
    spec = FmReceiverSpec.model_validate(doc["fm"])
    meaning = dict(spec.all_codes())
    assert doc["test_vectors"]
    for tv in doc["test_vectors"]:
        if spec.signalling == "dtmf":
            code = tv["request"]
        else:
            (el,) = uecp.decode_frame(bytes.fromhex(tv["request"])).elements
            assert el.channel == spec.rds.tdc_channel
            code = sig.parse_rds_payload(el.data, spec)
        assert meaning[code] == tv["response"], tv["name"]

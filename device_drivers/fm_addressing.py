"""Which codes to send so that exactly the target FM clusters wake.

Every code costs air time before the programme can start (an emergency must be on air
within a second), so the planner covers the target set with the fewest codes: all-call
when every receiver is a target, group codes for groups whose members are all targets,
individual pages for the rest.  A group with even one member outside the target set is
never used: that receiver would blare an announcement meant for another village.

`clusters` must list every FM receiver that can hear the transmitter (disabled ones too):
all-call wakes them all, so it is used only when all of them are targets.
Minimum cover is exact (enumeration over the usable groups) when at most 16 groups are
usable, greedy beyond that.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from device_drivers.fm_profile import FmReceiverSpec

EXACT_LIMIT = 16


@dataclass(frozen=True)
class FmAddress:
    address: str
    groups: frozenset[str] = frozenset()

    def __init__(self, address: str, groups: Iterable[str] = ()) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "groups", frozenset(groups))


@dataclass(frozen=True)
class Code:
    kind: Literal["all_call", "group", "page"]
    value: str | None
    covers: frozenset[str]

    def wake(self, spec: FmReceiverSpec) -> str:
        return spec.codes.render(self.kind, self.value)

    def release(self, spec: FmReceiverSpec) -> str:
        off = {"all_call": "all_off", "group": "group_off", "page": "page_off"}[self.kind]
        return spec.codes.render(off, self.value)


@dataclass(frozen=True)
class Plan:
    targets: frozenset[str]
    codes: tuple[Code, ...] = field(default_factory=tuple)

    @property
    def covered(self) -> frozenset[str]:
        return frozenset().union(*(c.covers for c in self.codes)) if self.codes else frozenset()

    def wake_codes(self, spec: FmReceiverSpec) -> list[str]:
        return [c.wake(spec) for c in self.codes]

    def release_codes(self, spec: FmReceiverSpec) -> list[str]:
        return [c.release(spec) for c in self.codes]

    def signalling_time_s(self, spec: FmReceiverSpec, *, volume: int | None = None,
                          release: bool = False) -> float:
        codes = self.release_codes(spec) if release else self.wake_codes(spec)
        if volume is not None and not release:
            codes.append(spec.codes.render("volume", volume))
        return codes_time_s(codes, spec)


def codes_time_s(codes: list[str], spec: FmReceiverSpec) -> float:
    """Air time of a code sequence, including the profile's lead-in/lead-out for DTMF."""
    if not codes:
        return 0.0
    if spec.signalling == "rds":
        r = spec.rds
        return len(codes) * r.repeats * r.repeat_gap_ms / 1000
    d = spec.dtmf
    keys = sum(len(c) for c in codes)
    gaps = sum(len(c) - 1 for c in codes)
    ms = d.lead_in_ms + keys * d.tone_ms + gaps * d.gap_ms + (len(codes) - 1) * d.code_gap_ms + d.lead_out_ms
    return ms / 1000


def plan_codes(targets: set[str] | frozenset[str], clusters: Mapping[str, FmAddress]) -> Plan:
    """Fewest codes covering exactly `targets` (ids of `clusters`)."""
    targets = frozenset(targets)
    unknown = sorted(targets - clusters.keys())
    if unknown:
        raise ValueError(f"not FM clusters: {', '.join(unknown)} (known: {', '.join(sorted(clusters))})")
    if not targets:
        return Plan(targets)
    if targets == frozenset(clusters):
        return Plan(targets, (Code("all_call", None, targets),))
    members: dict[str, set[str]] = {}
    for cid, a in clusters.items():
        for g in a.groups:
            members.setdefault(g, set()).add(cid)
    usable = sorted((g for g, m in members.items() if m <= targets),
                    key=lambda g: (-len(members[g]), g))
    # a group covering a single target is no better than paging it
    usable = [g for g in usable if len(members[g]) > 1]
    chosen = _exact(usable, members, targets) if len(usable) <= EXACT_LIMIT \
        else _greedy(usable, members, targets)
    covered: set[str] = set()
    codes = [Code("group", g, frozenset(members[g])) for g in chosen]
    for c in codes:
        covered |= c.covers
    codes += [Code("page", clusters[cid].address, frozenset({cid}))
              for cid in sorted(targets - covered, key=lambda c: clusters[c].address)]
    return Plan(targets, tuple(codes))


def _cost(groups: tuple[str, ...], members: dict[str, set[str]], targets: frozenset[str]) -> int:
    covered = set().union(*(members[g] for g in groups)) if groups else set()
    return len(groups) + len(targets - covered)


def _exact(usable: list[str], members: dict[str, set[str]], targets: frozenset[str]) -> tuple[str, ...]:
    best: tuple[str, ...] = ()
    best_cost = len(targets)
    for k in range(1, len(usable) + 1):
        if k >= best_cost:  # k groups cannot beat a cover that already costs ≤ k
            break
        for combo in itertools.combinations(usable, k):
            c = _cost(combo, members, targets)
            if c < best_cost:
                best, best_cost = combo, c
    return best


def _greedy(usable: list[str], members: dict[str, set[str]], targets: frozenset[str]) -> tuple[str, ...]:
    chosen: list[str] = []
    left = set(targets)
    while True:
        g = max(usable, key=lambda g: len(members[g] & left), default=None)
        if g is None or len(members[g] & left) < 2:
            return tuple(chosen)
        chosen.append(g)
        left -= members[g]


def addresses_from_site(clusters: Iterable) -> dict[str, FmAddress]:
    """{cluster id: FmAddress} from config `Cluster` objects (kind fm), enabled or not."""
    return {c.id: FmAddress(c.fm.address, c.fm.groups) for c in clusters
            if getattr(c, "kind", None) == "fm" and c.fm is not None}

"""Signalling air time: planned codes vs paging every target cluster one by one.

A representative Bình Lư layout: 29 FM clusters in 5 zones, each cluster in its zone's
group.  Prints, per target subset, the number of codes and the seconds of DTMF (and RDS)
signalling before the programme can start, planned vs naive, and the planner's own CPU
time (median of several runs).

    .venv/bin/python -m bench.fm_addressing
"""
from __future__ import annotations

import random
import statistics
import time

from device_drivers.fm_addressing import Code, FmAddress, Plan, plan_codes


def layout() -> dict[str, FmAddress]:
    sizes = [7, 6, 6, 5, 5]  # 29 clusters
    out: dict[str, FmAddress] = {}
    n = 0
    for zone, size in enumerate(sizes, start=1):
        for _ in range(size):
            n += 1
            out[f"fm{n:02d}"] = FmAddress(f"{100 + n:03d}", [str(zone)])
    return out


def naive(targets: set[str], clusters: dict[str, FmAddress]) -> Plan:
    return Plan(frozenset(targets), tuple(Code("page", clusters[c].address, frozenset({c}))
                                          for c in sorted(targets)))


def main() -> None:
    from device_drivers.fm_profile import FmReceiverSpec

    dtmf = FmReceiverSpec(signalling="dtmf")
    rds = FmReceiverSpec(signalling="rds")
    clusters = layout()
    zones: dict[str, set[str]] = {}
    for cid, a in clusters.items():
        for g in a.groups:
            zones.setdefault(g, set()).add(cid)
    rng = random.Random(7)
    ids = sorted(clusters)
    cases = [
        ("one cluster", {"fm05"}),
        ("one zone", zones["1"]),
        ("two zones", zones["2"] | zones["4"]),
        ("zone minus one", zones["1"] - {"fm01"}),
        ("all", set(ids)),
        ("all but one", set(ids) - {"fm29"}),
        ("random 30 %", set(rng.sample(ids, round(0.3 * len(ids))))),
        ("random 60 %", set(rng.sample(ids, round(0.6 * len(ids))))),
        ("worst: every other", set(ids[::2])),
    ]
    print(f"{'targets':<20}{'n':>4}{'codes':>7}{'naive':>7}{'DTMF s':>9}{'naive s':>9}"
          f"{'ratio':>7}{'RDS s':>8}{'plan µs':>9}")
    for name, t in cases:
        plan = plan_codes(t, clusters)
        base = naive(t, clusters)
        runs = []
        for _ in range(7):
            t0 = time.perf_counter()
            plan_codes(t, clusters)
            runs.append(time.perf_counter() - t0)
        s, sn = plan.signalling_time_s(dtmf), base.signalling_time_s(dtmf)
        print(f"{name:<20}{len(t):>4}{len(plan.codes):>7}{len(base.codes):>7}{s:>9.2f}{sn:>9.2f}"
              f"{s / sn:>7.2f}{plan.signalling_time_s(rds):>8.2f}{statistics.median(runs) * 1e6:>9.0f}")


if __name__ == "__main__":
    main()

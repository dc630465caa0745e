"""Fault detection on the simulated site: how fast, and is the cause right?

Runs the health scenarios (tests/scenarios_health/) and the shipped ones (smoke,
demo-day) against the real daemon, each N times, and reads only the records:

- latency per injected cause: the scenario line that injected the fault (its `t`) to
  the first `alarm.raised` for that cluster (or the transmitter) received by the
  simulated central server (its mqtt line `t`); median and max over runs and clusters.
  Loss-based alarms wait `settle_s` (= the scenario's heartbeat timeout) on purpose,
  so those rows print the timeout they ran with;
- a confusion matrix of diagnosed cause against injected cause
  (controller.diagnosis_score.score; a healed link outage counts as its final cause).

    .venv/bin/python -m bench.detection [--repeat 2] [--jobs 3] [--quick]

Writes bench/results/detection.json. The suite definition (which site copy each
scenario runs on) is shared with tests/test_health_scenarios.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "config" / "binhlu.yaml"
HEALTH_DIR = ROOT / "tests" / "scenarios_health"
RESULTS = ROOT / "bench" / "results" / "detection.json"

CLUSTER_CODES = ("cluster.offline", "cluster.subscription_expired", "cluster.power_loss",
                 "cluster.surge_protector_tripped", "cluster.amplifier_fault",
                 "cluster.speaker_line_fault")   # diagnoses (an expiring reminder is not one)
DAMAGE_CODE = {"surge_protector_tripped": "cluster.surge_protector_tripped",
               "amplifier_fault": "cluster.amplifier_fault",
               "speaker_line_fault": "cluster.speaker_line_fault", "dead": "cluster.offline"}


# ---------------------------------------------------------------------- the suite
def site_today(data: dict) -> dt.date:
    return dt.datetime.now(ZoneInfo(data["site"]["timezone"])).date()


def _sim_dates(**days: int) -> Callable[[dict], None]:
    """Site copy where the named clusters' SIMs expire `days` from today (negative: expired)."""
    def patch(data: dict) -> None:
        today = site_today(data)
        for c in data["clusters"]:
            if c["id"] in days:
                c["subscription"]["expires_on"] = today + dt.timedelta(days=days[c["id"]])
    return patch


def _bad_antenna_site(data: dict) -> None:
    data["transmitter"]["carrier"] = "always"          # on air without a programme
    data["diagnosis"] = {**(data.get("diagnosis") or {}), "vswr_persist_s": 3}


@dataclass(frozen=True)
class Case:
    name: str
    scenario: str                                  # a path, or a shipped scenario's name
    patch: Callable[[dict], None] | None = None    # how its site copy differs from binhlu.yaml

    def site(self, out_dir: Path) -> Path:
        """The site file this case runs on (binhlu.yaml itself, or a patched copy)."""
        if self.patch is None:
            return SITE
        data = yaml.safe_load(SITE.read_text(encoding="utf-8"))
        self.patch(data)
        out = Path(out_dir) / f"{self.name}.site.yaml"
        out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        return out


HEALTH = {
    # storm damage, then kill -9; ip01's SIM expires in 5 days (a reminder across the restart)
    "storm": Case("storm", str(HEALTH_DIR / "storm.yaml"), _sim_dates(ip01=5)),
    "quiet-storm": Case("quiet-storm", str(HEALTH_DIR / "quiet-storm.yaml"), _bad_antenna_site),
    # ip05's SIM expires in 3 days (then runs out in the scenario), ip06's expired yesterday
    "quiet-faults": Case("quiet-faults", str(HEALTH_DIR / "quiet-faults.yaml"),
                         _sim_dates(ip05=3, ip06=-1)),
}
SHIPPED = {"smoke": Case("smoke", "smoke"), "demo-day": Case("demo-day", "demo-day")}


def run_case(case: Case, out_dir: Path, tag: str = "") -> Path:
    """Run one case to its end; returns the record path (raises if the harness failed)."""
    from device_drivers.sim.runner import run_scenario

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / f"{case.name}{tag}.jsonl"
    problems: list[str] = []
    rc = run_scenario(case.site(out_dir), case.scenario, record, report=problems.append)
    if rc != 0:
        raise RuntimeError(f"{case.name}: simulate exited {rc}: " + " | ".join(problems))
    return record


# ---------------------------------------------------------------------- reading a record
def read(record: Path) -> list[dict]:
    from device_drivers.sim.record import read_record

    return list(read_record(record))


def events(rec: list[dict], prefix: str = "alarm.") -> list[tuple[float, dict]]:
    """(t, event) for events of the given type prefix, first delivery of each event id
    only (outbox redelivery after a restart or outage repeats the same id)."""
    seen: set[str] = set()
    out = []
    for r in rec:
        if r["kind"] != "mqtt" or not r["topic"].endswith("/events"):
            continue
        p = r["payload"]
        if isinstance(p, dict) and str(p.get("type", "")).startswith(prefix) and p["id"] not in seen:
            seen.add(p["id"])
            out.append((r["t"], p))
    return out


def retained_alarms(rec: list[dict]) -> list[tuple[float, list[dict]]]:
    return [(r["t"], r["payload"]) for r in rec
            if r["kind"] == "mqtt" and r["topic"].endswith("/alarms") and r.get("retain")]


def scenario_lines(rec: list[dict], kind: str) -> list[tuple[float, dict]]:
    return [(r["t"], r["event"]) for r in rec if r["kind"] == "scenario" and kind in r["event"]]


@dataclass
class Injection:
    t: float               # the scenario line that applied it (0 for a date in the site file)
    target: str            # cluster id, or "transmitter"
    cause: str             # what really happened (a cluster cause), or "transmitter VSWR"
    fault: str             # dead, surge_protector_tripped, power_cut, link_cut, sim, sim date, vswr


def injections(rec: list[dict], cfg: Any) -> tuple[list[Injection], list[str]]:
    """What the scenario did to the monitored parts of the site, and the parts it hurt that
    nothing can observe (FM receivers have no return channel)."""
    ip = {c.id for c in cfg.clusters if c.kind == "ip" and c.enabled}
    out: list[Injection] = []
    unobservable: list[str] = []
    today = dt.datetime.now(ZoneInfo(cfg.site.timezone)).date()
    for c in cfg.clusters:
        exp = c.subscription.expires_on if c.subscription else None
        if c.id in ip and exp is not None and exp < today:
            out.append(Injection(0.0, c.id, "subscription_expired", "sim date"))

    def add(t: float, cid: str, cause: str, fault: str) -> None:
        if cid in ip:
            out.append(Injection(t, cid, cause, fault))
        else:
            unobservable.append(cid)
    for t, ev in scenario_lines(rec, "lightning"):
        for cid, kinds in ev["lightning"].get("damage", {}).items():
            for k in kinds:
                add(t, cid, "lightning", k)
    for t, ev in scenario_lines(rec, "subscription_expired"):
        add(t, ev["subscription_expired"]["cluster"], "subscription_expired", "sim")
    for t, ev in scenario_lines(rec, "power_cut"):
        for cid in ev.get("result", {}).get("clusters", ev["power_cut"]["clusters"]):
            add(t, cid, "power_loss", "power_cut")
    for t, ev in scenario_lines(rec, "link_cut"):
        add(t, ev["link_cut"]["cluster"], "link_loss", "link_cut")
    for t, ev in scenario_lines(rec, "transmitter"):
        if ev["transmitter"].get("vswr", 0) >= 2.0:
            out.append(Injection(t, "transmitter", "transmitter VSWR", "alarm"))
    return out, sorted(set(unobservable))


def first_alarm(alarms: list[tuple[float, dict]], inj: Injection, after: float) -> float | None:
    for t, a in alarms:
        if t < after or a["type"] != "alarm.raised":
            continue
        if inj.target == "transmitter":
            if a["code"] == "transmitter.vswr_high":
                return t
        elif a.get("cluster_id") == inj.target and a["code"] in CLUSTER_CODES:
            return t
    return None


def analyse(rec: list[dict], cfg: Any, heartbeat_s: float | None) -> dict:
    """Latencies and the score of one record."""
    from controller.diagnosis_score import score

    alarms = events(rec)
    injs, unobs = injections(rec, cfg)
    lat = []
    for inj in injs:
        if inj.fault == "sim date":
            continue    # there from the start: no injection moment to measure from
        t = first_alarm(alarms, inj, inj.t - 0.5)
        lat.append({"cause": inj.cause, "fault": inj.fault, "target": inj.target,
                    "heartbeat_s": heartbeat_s,
                    "latency_s": None if t is None else round(max(0.0, t - inj.t), 3)})
    lat += _foldbacks(rec, injs, heartbeat_s)
    truth = {}
    for inj in injs:
        if inj.target != "transmitter":
            truth.setdefault(inj.target, inj.cause)
    s = score(truth.items(), [a for _, a in alarms if a.get("cluster_id")])
    return {"latency": lat, "score": s, "unobservable": unobs}


def _foldbacks(rec: list[dict], injs: list[Injection], heartbeat_s: float | None) -> list[dict]:
    """VSWR injected while on air -> the transmitter's own power reading drops (ground truth)."""
    tx = [r for r in rec if r["kind"] == "transmitter"]
    out = []
    for inj in injs:
        if inj.target != "transmitter":
            continue
        prev = [r for r in tx if r["t"] < inj.t - 0.01]
        if not prev or not prev[-1]["carrier"]:
            continue    # off air: nothing to measure, nothing to protect
        p0 = prev[-1]["power_w"]
        hit = next((r for r in tx if r["t"] >= inj.t - 0.01 and r["carrier"]
                    and r["power_w"] < p0), None)
        out.append({"cause": "transmitter VSWR", "fault": "foldback on air", "target": "transmitter",
                    "heartbeat_s": heartbeat_s,
                    "latency_s": None if hit is None else round(max(0.0, hit["t"] - inj.t), 3)})
    return out


# ---------------------------------------------------------------------- the bench
def _row_key(x: dict) -> str:
    return x["cause"] if x["cause"] == x["fault"] else f"{x['cause']} ({x['fault']})"


def summarise(runs: list[dict]) -> dict:
    rows: dict[str, list[dict]] = {}
    for r in runs:
        for x in r["latency"]:
            rows.setdefault(_row_key(x), []).append(x)
    latency = {}
    for key, xs in sorted(rows.items()):
        got = [x["latency_s"] for x in xs if x["latency_s"] is not None]
        hbs = sorted({x["heartbeat_s"] for x in xs if x["heartbeat_s"]})
        latency[key] = {"n": len(xs), "detected": len(got),
                        "median_s": round(statistics.median(got), 2) if got else None,
                        "max_s": round(max(got), 2) if got else None,
                        "heartbeat_timeout_s": hbs}
    matrix: dict[str, dict[str, int]] = {}
    correct = total = 0
    for r in runs:
        s = r["score"]
        correct += s["correct"]
        total += s["n_injected"]
        for t, row in s["matrix"].items():
            for p, n in row.items():
                matrix.setdefault(t, {}).setdefault(p, 0)
                matrix[t][p] += n
    return {"latency": latency, "matrix": matrix, "correct": correct, "injected": total,
            "accuracy": round(correct / total, 3) if total else None,
            "false_alarms": sum(len(r["score"]["false_alarms"]) for r in runs),
            "unobservable": sorted({c for r in runs for c in r["unobservable"]})}


_SHORT = {"subscription_expired": "subscr.exp", "vandalism_or_unknown": "vandalism?"}


def print_table(summary: dict, meta: dict) -> None:
    print(f"detection on the simulated Bình Lư site: {meta['runs']} runs "
          f"({', '.join(meta['cases'])}; each x{meta['repeat']}), {meta['wall_s']:.0f} s")
    print(f"\n{'injected cause (fault)':<42}{'N':>4}{'det':>5}{'median s':>10}{'max s':>8}"
          f"{'  heartbeat':>11}")
    for key, v in summary["latency"].items():
        med = "-" if v["median_s"] is None else f"{v['median_s']:.2f}"
        mx = "-" if v["max_s"] is None else f"{v['max_s']:.2f}"
        hb = ",".join(f"{h:g}" for h in v["heartbeat_timeout_s"]) or "-"
        print(f"{key:<42}{v['n']:>4}{v['detected']:>5}{med:>10}{mx:>8}{hb:>9} s")
    m = summary["matrix"]
    cols = sorted({p for row in m.values() for p in row} | set(m))
    short = {c: _SHORT.get(c, c[:11]) for c in cols}
    print("\nconfusion matrix (rows: injected, columns: diagnosed; per cluster and run)")
    print(f"{'':<22}" + "".join(f"{short[c]:>12}" for c in cols))
    for t in cols:
        if t not in m:
            continue
        print(f"{t:<22}" + "".join(f"{m[t].get(c, 0) or '.':>12}" for c in cols))
    print(f"\naccuracy {summary['correct']}/{summary['injected']} = {summary['accuracy']}; "
          f"false alarms (cluster diagnosed, nothing injected): {summary['false_alarms']}")
    if summary["unobservable"]:
        print(f"not scored (FM receivers have no return channel): {', '.join(summary['unobservable'])}")


def _heartbeat(case: Case) -> float | None:
    from device_drivers.sim.scenario import load_scenario, resolve_scenario

    sc = load_scenario(resolve_scenario(case.scenario))
    return sc.timing.heartbeat_timeout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.detection", description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2, help="runs of each scenario (default 2)")
    ap.add_argument("--jobs", type=int, default=3, help="scenarios run at once (default 3)")
    ap.add_argument("--quick", action="store_true", help="skip demo-day (2 minutes)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the records in this directory")
    args = ap.parse_args(argv)

    import structlog

    from controller.config import load_site

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    cases = [*HEALTH.values(), *(v for k, v in SHIPPED.items() if not (args.quick and k == "demo-day"))]
    work = args.keep or Path(tempfile.mkdtemp(prefix="loaxa-bench-detect-"))
    jobs = [(c, i) for i in range(args.repeat) for c in cases]
    jobs.sort(key=lambda j: j[0].name != "demo-day")     # the long one first
    t0 = time.monotonic()

    def one(job: tuple[Case, int]) -> dict:
        case, i = job
        record = run_case(case, work / f"run{i}", tag="")
        cfg = load_site(case.site(work / f"run{i}"))
        res = analyse(read(record), cfg, _heartbeat(case))
        res["case"], res["run"] = case.name, i
        return res
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        runs = list(ex.map(one, jobs))
    meta = {"runs": len(runs), "repeat": args.repeat, "cases": [c.name for c in cases],
            "wall_s": time.monotonic() - t0, "jobs": args.jobs,
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    summary = summarise(runs)
    print_table(summary, meta)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1,
                                  ensure_ascii=False), encoding="utf-8")
    print(f"\nwritten: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

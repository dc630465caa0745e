"""Broadcast timing on the simulated Bình Lư site, measured from ground truth.

The real daemon (`loaxa run`) runs against every simulator (scenario runner, ALSA
capture as the air, FM receivers that switch only on what they decode from it).

1. Schedule start error: N programmes with `at:` times a few seconds apart (short TTS,
   one FM-only zone, on-demand carrier with the site's 2 s pre-roll). Per start, against
   the scheduled time: carrier up (transmitter ground truth), first sample on the air and
   first programme sample after the wake codes (the daemon's `on air` log line), and the
   first / last target receiver playing (FM receiver ground truth, which needs 100 ms of
   programme audio to count as playing). Baseline: the configured pre-roll.
2. Emergency latency: an emergency to all clusters while a normal programme plays to two
   zones (preempting it), and from an idle air as the baseline, interleaved. From the
   command (sent by the simulated central server, and as accepted by the daemon) to the
   first emergency sample on air, the first / last FM receiver playing it, every IP cluster
   playing it and broadcast.started at the central server. Each emergency has new text,
   so its TTS synthesis is on the path, as it would be for a real alert.
3. CPU: daemon process CPU (utime+stime of all its threads, /proc) while idle vs while
   playing to all 35 clusters.

    .venv/bin/python -m bench.broadcast_timing [--quick] [--starts 20] [--runs 5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import tempfile
import time
from pathlib import Path

import yaml

from bench._simsite import (
    SITE,
    SimSite,
    fmt_ms,
    parse_ts,
    proc_cpu_s,
    quiet_logs,
    summary,
    write_results,
)

SCHED_ZONE = "ban-06"                       # FM-only zone
NORMAL_TARGETS = ["trung-tam", "ban-01"]    # 2 IP + 9 FM clusters
LONG_TEXT = ("Đài truyền thanh xã Bình Lư xin kính chào bà con. Sau đây là bản tin nông nghiệp: "
             "thời tiết tuần này thuận lợi cho việc gieo cấy lúa mùa, bà con chú ý kiểm tra mực "
             "nước ruộng, bón phân cân đối và phòng trừ sâu cuốn lá nhỏ. Hội nông dân xã sẽ tổ "
             "chức tập huấn kỹ thuật vào sáng thứ năm tại nhà văn hóa trung tâm. ") * 2


def site_layout() -> tuple[dict[str, list[str]], list[str], list[str]]:
    from controller.config import load_site

    cfg = load_site(SITE)
    zones: dict[str, list[str]] = {}
    for c in cfg.clusters:
        zones.setdefault(c.zone, []).append(c.id)
    fm = [c.id for c in cfg.clusters if c.kind == "fm"]
    ip = [c.id for c in cfg.clusters if c.kind == "ip"]
    return zones, fm, ip


def site_with_schedule(out: Path, starts: int, gap_s: float, lead_s: float) -> list[tuple[str, float]]:
    """binhlu.yaml with its programmes replaced by `starts` one-shot programmes."""
    data = yaml.safe_load(SITE.read_text(encoding="utf-8"))
    t0 = math.ceil(time.time()) + lead_s
    plan, progs = [], []
    for i in range(starts):
        at = t0 + i * gap_s
        pid = f"bench-{i + 1:02d}"
        plan.append((pid, at))
        progs.append({"id": pid, "title": f"Bản tin {i + 1}", "priority": "normal",
                      "source": {"tts": {"text": f"Bản tin số {i + 1} của đài truyền thanh xã."}},
                      "targets": [SCHED_ZONE], "misfire_grace_s": 30, "max_duration_s": 60,
                      "schedule": {"at": [dt.datetime.fromtimestamp(at, dt.UTC).isoformat()]}})
    data["programmes"] = progs
    out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return plan


# ---------------------------------------------------------------------- 1. schedule
def schedule_part(s: SimSite, plan: list[tuple[str, float]], targets: list[str], gap_s: float,
                  preroll_s: float) -> dict:
    last = plan[-1][0]
    s.wait(lambda o: o["kind"] == "mqtt" and isinstance(o.get("payload"), dict)
           and o["payload"].get("programme_id") == last
           and o["payload"].get("type") in ("broadcast.finished", "broadcast.skipped",
                                            "broadcast.failed"),
           timeout=plan[-1][1] - time.time() + 60)
    lines = s.lines()
    onair = {round(e["scheduled_at"]): e for e in s.daemon_log()
             if e.get("event") == "on air" and e.get("scheduled_at")}
    carrier_up = [w for w, o in lines if o["kind"] == "transmitter" and o.get("carrier")]
    playing = [(w, o["cluster"]) for w, o in lines
               if o["kind"] == "cluster" and o.get("playing") and o["cluster"] in targets]
    skipped = [o["payload"]["programme_id"] for _, o in lines if o["kind"] == "mqtt"
               and isinstance(o.get("payload"), dict) and o["payload"].get("type") == "broadcast.skipped"]
    cols: dict[str, list[float]] = {k: [] for k in
                                    ("carrier_up", "first_sample", "programme_sample",
                                     "first_receiver", "all_receivers", "wake_codes")}
    for _pid, at in plan:
        e = onair.get(round(at))
        # jobs fire early by pre-roll + wake codes + a preparation margin (EarlyTrigger)
        win = [w for w in carrier_up if at - 6 <= w < at + 1]
        if win:
            cols["carrier_up"].append(win[0] - at)
        if e is not None:
            cols["first_sample"].append(e["first_sample_at"] - at)
            cols["programme_sample"].append(e["first_sample_at"] + e["wake_codes_s"] - at)
            cols["wake_codes"].append(e["wake_codes_s"])
        heard: dict[str, float] = {}
        for w, c in playing:
            if at - 1.5 <= w < at + gap_s - 1.5 and c not in heard:
                heard[c] = w
        if heard:
            cols["first_receiver"].append(min(heard.values()) - at)
        if len(heard) == len(targets):
            cols["all_receivers"].append(max(heard.values()) - at)
    return {"starts": len(plan), "skipped": skipped, "preroll_s": preroll_s, "targets": targets,
            **{k: summary(v) for k, v in cols.items()}}


# ---------------------------------------------------------------------- 2. emergency
def _playing_key(fm_new: set[str], ip: list[str], old: dict[str, set]):
    def pred(o: dict) -> str | None:
        if o["kind"] != "cluster" or not o.get("playing"):
            return None
        c = o["cluster"]
        if c in fm_new:
            return c
        if c in ip and o.get("programme") not in old.get(c, set()):
            return c
        return None
    return pred


def emergency_run(s: SimSite, i: int, mode: str, zones: dict, fm: list[str], ip: list[str]) -> dict:
    normal = [c for z in NORMAL_TARGETS for c in zones[z]] if mode == "preempt" else []
    old: dict[str, set] = {}
    if normal:
        m0 = s.mark()
        rid, _ = s.send("broadcast.start", {"priority": "normal", "title": "bench normal",
                                            "source": {"tts": {"text": LONG_TEXT}},
                                            "targets": NORMAL_TARGETS})
        _, r = s.response(rid, since=m0)
        if r["payload"].get("status") != "ok":
            raise RuntimeError(f"normal broadcast refused: {r['payload']}")
        got = s.wait_all(lambda o: o["cluster"] if o["kind"] == "cluster" and o.get("playing") else None,
                         set(normal), 60, m0)
        if len(got) < len(normal):
            raise RuntimeError(f"normal programme never reached {sorted(set(normal) - set(got))}")
        for _, o in s.lines(m0):
            if o["kind"] == "cluster" and o.get("playing") and o["cluster"] in ip:
                old.setdefault(o["cluster"], set()).add(o.get("programme"))
        time.sleep(1.0)
    m = s.mark()
    text = f"Khẩn cấp, thông báo số {i}: lũ quét, bà con lên chỗ cao ngay."
    rid, t_cmd = s.send("broadcast.start", {"priority": "emergency", "title": "bench emergency",
                                            "source": {"tts": {"text": text}}, "targets": "all"})
    _, r = s.response(rid, since=m)
    if r["payload"].get("status") != "ok":
        raise RuntimeError(f"emergency refused: {r['payload']}")
    ebid = r["payload"]["data"]["broadcast_id"]
    fm_new = set(fm) - set(normal)
    got = s.wait_all(_playing_key(fm_new, ip, old), fm_new | set(ip), 30, m)
    oa = s.on_air(ebid)
    accepted = parse_ts(s.wait_log(lambda e: e.get("event") == "command_ok"
                                   and e.get("request_id") == rid, 10)["timestamp"])
    w_started, _ = s.event("broadcast.started", 30, m, ebid)
    s.event("broadcast.finished", 60, m, ebid)
    s.carrier_off(m)
    fm_t = [got[c] for c in fm_new if c in got]
    ip_t = [got[c] for c in ip if c in got]
    return {
        "mode": mode,
        "accepted": accepted - t_cmd,
        "first_sample": oa["first_sample_at"] - t_cmd,
        "first_sample_from_accept": oa["first_sample_at"] - accepted,
        "programme_sample": oa["first_sample_at"] + oa["wake_codes_s"] - t_cmd,
        "first_fm": min(fm_t) - t_cmd if fm_t else None,
        "all_fm": max(fm_t) - t_cmd if len(fm_t) == len(fm_new) else None,
        "all_ip": max(ip_t) - t_cmd if len(ip_t) == len(ip) else None,
        "started_event": w_started - t_cmd,
        "missing": sorted((fm_new | set(ip)) - set(got)),
    }


def emergency_part(s: SimSite, runs: int, zones: dict, fm: list[str], ip: list[str]) -> dict:
    rows = []
    for i in range(runs):
        for mode in ("idle", "preempt"):   # interleaved so drift hits both alike
            rows.append(emergency_run(s, 2 * i + (mode == "preempt"), mode, zones, fm, ip))
    keys = ("accepted", "first_sample", "first_sample_from_accept", "programme_sample",
            "first_fm", "all_fm", "all_ip", "started_event")
    out = {}
    for mode in ("preempt", "idle"):
        rs = [r for r in rows if r["mode"] == mode]
        out[mode] = {k: summary([r[k] for r in rs]) for k in keys}
        out[mode]["missing"] = sorted({c for r in rs for c in r["missing"]})
    return out


# ---------------------------------------------------------------------- 3. CPU
def cpu_part(s: SimSite, window_s: float) -> dict:
    pid = s.daemon_pid
    time.sleep(1.0)
    c0, t0 = proc_cpu_s(pid), time.monotonic()
    time.sleep(window_s)
    idle = (proc_cpu_s(pid) - c0) / (time.monotonic() - t0)
    m = s.mark()
    rid, _ = s.send("broadcast.start", {"priority": "normal", "title": "bench cpu",
                                        "source": {"tts": {"text": LONG_TEXT}}, "targets": "all"})
    _, r = s.response(rid, since=m)
    bid = r["payload"]["data"]["broadcast_id"]
    s.event("broadcast.started", 60, m, bid)
    time.sleep(1.0)
    c0, t0 = proc_cpu_s(pid), time.monotonic()
    time.sleep(window_s)
    busy = (proc_cpu_s(pid) - c0) / (time.monotonic() - t0)
    still_on = not any(o["kind"] == "mqtt" and isinstance(o.get("payload"), dict)
                       and o["payload"].get("broadcast_id") == bid
                       and o["payload"].get("type") == "broadcast.finished" for _, o in s.lines(m))
    s.send("broadcast.stop", {"broadcast_id": bid})
    s.event("broadcast.finished", 30, m, bid)
    return {"window_s": window_s, "idle_cpu_pct": idle * 100, "busy_cpu_pct": busy * 100,
            "ratio": busy / idle if idle > 0 else None, "on_air_whole_window": still_on}


# ---------------------------------------------------------------------- report
def report(res: dict) -> None:
    if "schedule" in res:
        sc = res["schedule"]
        print(f"1. schedule start error, {sc['starts']} `at:` starts {res['gap_s']:g} s apart, "
              f"zone {SCHED_ZONE} ({len(sc['targets'])} FM receivers), pre-roll {sc['preroll_s']:g} s"
              + (f", skipped: {sc['skipped']}" if sc["skipped"] else ""))
        for k, name in (("carrier_up", "carrier up"),
                        ("first_sample", "first sample on air (wake codes)"),
                        ("programme_sample", "first programme sample on air"),
                        ("first_receiver", "first receiver playing"),
                        ("all_receivers", "all target receivers playing")):
            print(f"   {name:36s} {fmt_ms(sc[k])}")
        ps, wc = sc["programme_sample"], sc["wake_codes"]
        if ps["n"]:
            print(f"   wake codes {wc['median']:.2f} s before the programme; the job fires early by "
                  f"pre-roll + codes + margin, so the programme's error is the figure that counts "
                  f"(|median| {abs(ps['median']) * 1000:.0f} ms vs the {sc['preroll_s'] + wc['median']:.2f} s "
                  f"a late start would add)")
    if "emergency" in res:
        em = res["emergency"]
        n = em["preempt"]["first_sample"]["n"]
        print(f"2. emergency to all 35 clusters, from the central command, {n} runs each")
        for k, name in (("accepted", "accepted by the daemon"),
                        ("first_sample", "first emergency sample on air"),
                        ("first_sample_from_accept", "  (from acceptance)"),
                        ("programme_sample", "emergency programme sample on air"),
                        ("first_fm", "first FM receiver playing it"),
                        ("all_fm", "all FM receivers playing it"),
                        ("all_ip", "all 6 IP clusters playing it"),
                        ("started_event", "broadcast.started at central")):
            p, i = em["preempt"][k], em["idle"][k]
            ratio = (f"  x{p['median'] / i['median']:.2f} vs idle" if p["n"] and i["n"] and i["median"] > 0
                     else "")
            print(f"   {name:36s} preempting: {fmt_ms(p)}{ratio}")
            print(f"   {'':36s} idle air:   {fmt_ms(i)}")
        for mode in ("preempt", "idle"):
            if em[mode]["missing"]:
                print(f"   ({mode}: never playing the emergency: {', '.join(em[mode]['missing'])})")
    if "cpu" in res:
        c = res["cpu"]
        print(f"3. daemon CPU (% of one core, {c['window_s']:g} s windows): idle {c['idle_cpu_pct']:.1f} %, "
              f"playing to all 35 clusters {c['busy_cpu_pct']:.1f} %"
              + (f" (x{c['ratio']:.1f})" if c["ratio"] else "")
              + ("" if c["on_air_whole_window"] else "  [programme ended inside the window]"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 starts, 3 runs, 5 s CPU windows")
    ap.add_argument("--starts", type=int, default=None, help="scheduled starts (default 20)")
    ap.add_argument("--gap", type=float, default=7.0, help="seconds between scheduled starts")
    ap.add_argument("--runs", type=int, default=None, help="emergency runs per mode (default 5)")
    ap.add_argument("--window", type=float, default=None, help="CPU window seconds (default 10)")
    ap.add_argument("--parts", default="schedule,emergency,cpu")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (daemon log, record)")
    a = ap.parse_args()
    starts = a.starts or (8 if a.quick else 20)
    runs = a.runs or (3 if a.quick else 5)
    window = a.window or (5.0 if a.quick else 10.0)
    parts = set(a.parts.split(","))
    quiet_logs()
    zones, fm, ip = site_layout()
    res: dict = {"quick": a.quick, "gap_s": a.gap}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loaxa-bt-") as d:
        site = Path(d) / "binhlu-bench.yaml"
        plan = site_with_schedule(site, starts if "schedule" in parts else 0, a.gap, lead_s=12)
        preroll = yaml.safe_load(site.read_text())["transmitter"].get("preroll_s", 2.0)
        with SimSite(site, keep=a.keep) as s:
            if a.keep:
                print(f"work dir: {s.dir}")
            if plan:
                res["schedule"] = schedule_part(s, plan, zones[SCHED_ZONE], a.gap, preroll)
            if "emergency" in parts:
                res["emergency"] = emergency_part(s, runs, zones, fm, ip)
            if "cpu" in parts:
                res["cpu"] = cpu_part(s, window)
    res["elapsed_s"] = time.monotonic() - t_start
    report(res)
    path = write_results("broadcast_timing", res)
    print(f"   ({res['elapsed_s']:.0f} s; figures in {path.relative_to(path.parents[2])})")


if __name__ == "__main__":
    main()

"""Footprint of the daemon on the simulated 35-cluster Bình Lư site.

The real daemon (`loaxa run`) against every simulator, as `loaxa simulate` runs it, with a
NOTIFY_SOCKET this bench binds. Reports:

- import time of `controller.runtime` (`python -X importtime`, and wall time of a bare
  import against `python -c pass` as the baseline);
- start-up time: process start to READY=1 (first start and SIGTERM restarts), and to the
  central server seeing `status: online`;
- CPU (% of one core, utime+stime of every daemon thread) idle and while playing to all
  35 clusters; resident memory (VmRSS) and its peak (VmHWM);
- command -> all 35 clusters: broadcast.start to "all" sent by the simulated central server,
  to the gateway's response, to broadcast.started at the central server, and to the last IP
  cluster / FM receiver playing (ground truth from the simulators). Baseline: the round
  trip of status.get on the same link.

    .venv/bin/python -m bench.footprint [--quick] [--iterations 25]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench._simsite import (
    ROOT,
    SimSite,
    fmt_ms,
    proc_cpu_s,
    proc_status,
    quiet_logs,
    summary,
    write_results,
)
from bench.broadcast_timing import LONG_TEXT

SHORT_TEXT = "Thông báo: chiều nay họp dân tại nhà văn hóa."


# ---------------------------------------------------------------------- imports
def import_time(runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    out = subprocess.run([py, "-X", "importtime", "-c", "import controller.runtime"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True).stderr
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)))
    total_us = sum(r[0] for r in rows)
    # where the time goes: own (self) import time summed per top-level package
    per_pkg: dict[str, int] = {}
    for self_us, _cum, _depth, name in rows:
        top = name.split(".")[0]
        per_pkg[top] = per_pkg.get(top, 0) + self_us
    heavy = sorted(per_pkg.items(), key=lambda kv: -kv[1])[:8]

    def wall(code: str) -> float:
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([py, "-c", code], env=env, cwd=ROOT, check=True)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    base = wall("pass")
    imp = wall("import controller.runtime")
    return {"importtime_total_s": total_us / 1e6, "modules": len(rows),
            "heaviest": [{"package": k, "self_s": v / 1e6} for k, v in heavy],
            "python_pass_s": base, "python_import_runtime_s": imp, "runs": runs}


# ---------------------------------------------------------------------- the site
def ready_after(s: SimSite, t_start: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with s.cond:
            for w, m in s.notify_msgs:
                if m == "READY=1" and w >= t_start:
                    return w
            s.cond.wait(0.2)
    raise TimeoutError("no READY=1")


def online_after(s: SimSite, since: int, timeout: float = 30) -> float:
    w, _ = s.wait(lambda o: o["kind"] == "mqtt" and o["topic"].endswith("/status")
                  and isinstance(o["payload"], dict) and o["payload"].get("state") == "online",
                  timeout, since)
    return w


def cpu_window(pid: int, seconds: float) -> float:
    c0, t0 = proc_cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (proc_cpu_s(pid) - c0) / (time.monotonic() - t0) * 100


def status_rtt(s: SimSite, n: int) -> list[float]:
    out = []
    for _ in range(n):
        m = s.mark()
        rid, t = s.send("status.get")
        w, _ = s.response(rid, since=m)
        out.append(w - t)
    return out


def command_to_all(s: SimSite, fm: list[str], ip: list[str]) -> dict:
    """One broadcast.start to all; when each milestone was reached, from the send."""
    m = s.mark()
    rid, t = s.send("broadcast.start", {"priority": "normal", "title": "bench ack",
                                        "source": {"tts": {"text": SHORT_TEXT}}, "targets": "all"})
    w_resp, r = s.response(rid, since=m)
    if r["payload"].get("status") != "ok":
        raise RuntimeError(f"broadcast refused: {r['payload']}")
    bid = r["payload"]["data"]["broadcast_id"]
    got = s.wait_all(lambda o: o["cluster"] if o["kind"] == "cluster" and o.get("playing") else None,
                     set(fm) | set(ip), 30, m)
    w_started, _ = s.event("broadcast.started", 30, m, bid)
    s.event("broadcast.finished", 60, m, bid)
    s.carrier_off(m)
    ip_t = [got[c] for c in ip if c in got]
    fm_t = [got[c] for c in fm if c in got]
    return {"response": w_resp - t, "started_event": w_started - t,
            "all_ip": max(ip_t) - t if len(ip_t) == len(ip) else None,
            "all_fm": max(fm_t) - t if len(fm_t) == len(fm) else None,
            "all_35": max(got.values()) - t if len(got) == len(fm) + len(ip) else None,
            "missing": sorted((set(fm) | set(ip)) - set(got))}


def site_part(iterations: int, window: float, restarts: int, keep: bool) -> dict:
    from bench.broadcast_timing import site_layout

    _zones, fm, ip = site_layout()
    res: dict = {}
    with SimSite(notify=True, keep=keep) as s:
        if keep:
            print(f"work dir: {s.dir}")
        t0 = s.sim.daemon_starts[0]
        starts = [ready_after(s, t0) - t0]
        online = [online_after(s, 0) - t0]
        pid = s.daemon_pid
        time.sleep(2.0)
        res["idle_cpu_pct"] = cpu_window(pid, window)
        st = proc_status(pid)
        res["idle_rss_mb"] = st["VmRSS"] / 1024
        res["threads"] = int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
        res["status_rtt"] = summary(status_rtt(s, 20))
        rows = [command_to_all(s, fm, ip) for _ in range(iterations)]
        res["command_to_all"] = {k: summary([r[k] for r in rows])
                                 for k in ("response", "started_event", "all_ip", "all_fm", "all_35")}
        res["command_to_all"]["missing"] = sorted({c for r in rows for c in r["missing"]})
        res["peak_rss_short_mb"] = proc_status(pid)["VmHWM"] / 1024
        # busy: a long programme to every cluster
        m = s.mark()
        rid, _ = s.send("broadcast.start", {"priority": "normal", "title": "bench busy",
                                            "source": {"tts": {"text": LONG_TEXT}}, "targets": "all"})
        _, r = s.response(rid, since=m)
        bid = r["payload"]["data"]["broadcast_id"]
        s.event("broadcast.started", 60, m, bid)
        time.sleep(1.0)
        res["busy_cpu_pct"] = cpu_window(pid, window)
        st = proc_status(pid)
        res["busy_rss_mb"] = st["VmRSS"] / 1024
        s.send("broadcast.stop", {"broadcast_id": bid})
        s.event("broadcast.finished", 30, m, bid)
        s.carrier_off(m)
        res["peak_rss_mb"] = proc_status(pid)["VmHWM"] / 1024
        for _ in range(restarts):
            m = s.mark()
            s.restart(hard=False)
            t = s.sim.daemon_starts[-1]
            starts.append(ready_after(s, t) - t)
            online.append(online_after(s, m) - t)
            time.sleep(2.0)   # let the restarted daemon set its devices up before the next
        res["fresh_rss_mb"] = proc_status(s.daemon_pid)["VmRSS"] / 1024
    res["startup_ready"] = summary(starts)
    res["startup_first_s"] = starts[0]
    res["startup_online"] = summary(online)
    res["window_s"] = window
    return res


def report(res: dict) -> None:
    im = res["imports"]
    print(f"import controller.runtime: -X importtime total {im['importtime_total_s'] * 1000:.0f} ms "
          f"({im['modules']} modules); wall {im['python_import_runtime_s'] * 1000:.0f} ms vs "
          f"`python -c pass` {im['python_pass_s'] * 1000:.0f} ms "
          f"(x{im['python_import_runtime_s'] / im['python_pass_s']:.1f}), median of {im['runs']}")
    print("   by package (self time): " + ", ".join(f"{h['package']} {h['self_s'] * 1000:.0f} ms"
                                      for h in im["heaviest"]))
    if "site" not in res:
        return
    s = res["site"]
    print(f"start-up (process start -> READY=1): first {s['startup_first_s'] * 1000:.0f} ms; "
          f"{fmt_ms(s['startup_ready'])}")
    print(f"   process start -> central sees status online: {fmt_ms(s['startup_online'])}")
    print(f"CPU (% of one core, {s['window_s']:g} s windows): idle {s['idle_cpu_pct']:.1f} %, "
          f"playing to all 35 clusters {s['busy_cpu_pct']:.1f} %"
          + (f" (x{s['busy_cpu_pct'] / s['idle_cpu_pct']:.1f})" if s["idle_cpu_pct"] > 0 else ""))
    print(f"memory: RSS idle {s['idle_rss_mb']:.0f} MB, playing {s['busy_rss_mb']:.0f} MB, "
          f"peak (VmHWM) {s['peak_rss_short_mb']:.0f} MB after the short programmes, "
          f"{s['peak_rss_mb']:.0f} MB after the long one, after a restart {s['fresh_rss_mb']:.0f} MB; "
          f"{s['threads']} threads")
    c = s["command_to_all"]
    print(f"command broadcast.start(all) -> (n={c['response']['n']}); baseline status.get round trip "
          f"{fmt_ms(s['status_rtt'], p99=True)}")
    for k, name in (("response", "gateway response (accepted)"),
                    ("all_ip", "all 6 IP clusters playing"),
                    ("started_event", "broadcast.started at central"),
                    ("all_fm", "all 29 FM receivers playing"),
                    ("all_35", "all 35 clusters playing")):
        print(f"   {name:32s} {fmt_ms(c[k], p99=True)}")
    if c["missing"]:
        print(f"   (never playing in some iteration: {', '.join(c['missing'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 iterations, 2 restarts, 5 s windows")
    ap.add_argument("--iterations", type=int, default=None, help="broadcast.start(all) runs (25)")
    ap.add_argument("--restarts", type=int, default=None, help="SIGTERM restarts timed (4)")
    ap.add_argument("--window", type=float, default=None, help="CPU window seconds (15)")
    ap.add_argument("--imports-only", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args()
    quiet_logs()
    t0 = time.monotonic()
    res: dict = {"quick": a.quick, "imports": import_time(3 if a.quick else 7)}
    if not a.imports_only:
        res["site"] = site_part(a.iterations or (8 if a.quick else 25), a.window or (5.0 if a.quick else 15.0),
                                a.restarts if a.restarts is not None else (2 if a.quick else 4), a.keep)
    res["elapsed_s"] = time.monotonic() - t0
    report(res)
    path = write_results("footprint", res)
    print(f"   ({res['elapsed_s']:.0f} s; figures in {path.relative_to(path.parents[2])})")


if __name__ == "__main__":
    main()

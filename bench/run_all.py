"""Run every bench in bench/ one after the other and write bench/RESULTS.md.

Each bench is a module with main() (bench/NAME.py; helpers starting with "_" are not
benches). With --quick, a bench that has a --quick flag gets it, and the older benches get
smaller sizes; without it every bench runs at its full default size. Each bench's stdout
goes to the console as it comes and into RESULTS.md under the exact command line, with the
date, the machine and the load average when the run started (figures taken on a busy
machine are noisier).

    .venv/bin/python -m bench.run_all [--quick] [--only broadcast_timing,scale] [--skip soak]
                                      [--set soak="--minutes 5"]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SKIP = {"__init__", "run_all"}
# benches without a --quick flag: the smaller sizes to use instead
QUICK_ARGS = {"outbox_replay": ["--events", "2000", "--runs", "2"], "uplink_bytes": ["--runs", "2"],
              "soak": ["--minutes", "1", "--report-every", "0.5", "--warmup", "20"]}


def benches() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py")
                  if p.stem not in SKIP and not p.stem.startswith("_")
                  and "def main(" in p.read_text(encoding="utf-8"))


def bench_args(name: str, quick: bool, overrides: dict[str, list[str]]) -> list[str]:
    if name in overrides:
        return overrides[name]
    if not quick:
        return []
    if name in QUICK_ARGS:
        return QUICK_ARGS[name]
    src = (BENCH / f"{name}.py").read_text(encoding="utf-8")
    return ["--quick"] if '"--quick"' in src else []


def machine() -> dict[str, str]:
    cpu = "unknown"
    ram = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("model name", "Model", "Hardware") and v.strip():
                cpu = v.strip()
                if k.strip() == "model name":
                    break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"arch": platform.machine(), "cpu": cpu, "cores": str(os.cpu_count()), "ram": ram,
            "python": platform.python_version(), "kernel": platform.release(),
            "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "load": " ".join(f"{x:.2f}" for x in load)}


def run_one(name: str, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    shown = " ".join(shlex.quote(x) for x in [".venv/bin/python", "-m", f"bench.{name}", *args])
    print(f"\n$ {shown}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    out: list[str] = []
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    err: list[str] = []
    import threading

    def drain_err() -> None:
        for line in p.stderr:
            err.append(line)
    th = threading.Thread(target=drain_err, daemon=True)
    th.start()
    try:
        deadline = t0 + timeout
        for line in p.stdout:
            out.append(line)
            print(line, end="", flush=True)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        rc = p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        rc = "timeout"
    th.join(5)
    secs = time.monotonic() - t0
    if rc != 0:
        tail = "".join(err[-25:])
        print(f"[{name} failed: rc {rc}]\n{tail}", flush=True)
    return {"name": name, "command": shown, "rc": rc, "seconds": round(secs, 1),
            "stdout": "".join(out), "stderr_tail": "".join(err[-25:]) if rc != 0 else ""}


def write_md(path: Path, argv: list[str], mach: dict, runs: list[dict], started: dt.datetime) -> None:
    lines = ["# Bench results", "",
             "Written by `" + shlex.join(argv) + "` (`make bench` runs `python -m bench.run_all`). "
             "What each bench measures: bench/README.md. Machine-readable figures: bench/results/*.json.",
             "",
             f"- date: {started.isoformat(timespec='seconds')} (UTC)",
             f"- machine: {mach['arch']}, {mach['cpu']}, {mach['cores']} cores, {mach['ram']} RAM, "
             f"Linux {mach['kernel']}",
             f"- python: {mach['python']}",
             f"- code: {mach['commit']}",
             f"- load average at start: {mach['load']}",
             f"- total time: {sum(r['seconds'] for r in runs):.0f} s", ""]
    for r in runs:
        status = "" if r["rc"] == 0 else f" — FAILED (rc {r['rc']})"
        lines += [f"## {r['name']}{status}", "", f"`{r['command']}` ({r['seconds']:.0f} s)", "",
                  "```", r["stdout"].rstrip("\n"), "```", ""]
        if r["stderr_tail"]:
            lines += ["stderr (tail):", "", "```", r["stderr_tail"].rstrip("\n"), "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes where a bench supports it")
    ap.add_argument("--only", default=None, help="comma-separated bench names")
    ap.add_argument("--set", action="append", default=[], metavar='NAME="ARGS"',
                    help='arguments for one bench, e.g. --set soak="--minutes 5" (repeatable)')
    ap.add_argument("--skip", default="", help="comma-separated bench names not to run")
    ap.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per bench (default 600 with --quick, 1800 without)")
    a = ap.parse_args()
    names = benches()
    if a.only:
        want = a.only.split(",")
        unknown = [w for w in want if w not in names]
        if unknown:
            sys.exit(f"unknown bench(es): {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in want]
    names = [n for n in names if n not in set(a.skip.split(","))]
    overrides: dict[str, list[str]] = {}
    for item in a.set:
        k, eq, v = item.partition("=")
        if not eq or k not in benches():
            sys.exit(f"--set wants NAME=\"ARGS\" with a known bench name (got {item!r})")
        overrides[k] = shlex.split(v)
    started = dt.datetime.now(dt.UTC)
    mach = machine()
    argv = [".venv/bin/python", "-m", "bench.run_all", *sys.argv[1:]]
    print(f"{len(names)} benches: {', '.join(names)}; {mach['arch']}, {mach['cpu']}, "
          f"{mach['cores']} cores, load {mach['load']}")
    timeout = a.timeout or (600.0 if a.quick else 1800.0)
    runs = [run_one(n, bench_args(n, a.quick, overrides), timeout) for n in names]
    out = Path(a.out)
    write_md(out, argv, mach, runs, started)
    summary = {"argv": argv, "machine": mach, "started": started.isoformat(timespec="seconds"),
               "runs": [{k: r[k] for k in ("name", "command", "rc", "seconds")} for r in runs]}
    res = BENCH / "results"
    res.mkdir(exist_ok=True)
    (res / f"run_all{'-quick' if a.quick else ''}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    failed = [r["name"] for r in runs if r["rc"] != 0]
    print(f"\n{len(runs) - len(failed)}/{len(runs)} benches ran in {sum(r['seconds'] for r in runs):.0f} s; "
          f"results in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The real daemon against the simulated site, driven step by step by a bench (not a bench).

A scenario file fires events at fixed offsets; a bench wants the next command as soon as
the last one has played out, the daemon's pid for /proc, its NOTIFY_SOCKET and the wall
time of every record line. This wraps the scenario runner's `Simulation` (same mosquitto,
same simulators, same `loaxa run` child) with an empty scenario and exposes those.

Times: every record line is stamped with time.time() as the Recorder hands it over (the
writer's own thread, microseconds after `t`); the daemon's log lines carry their own UTC
timestamps. Both are wall clocks of the same machine.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from device_drivers.sim.runner import Simulation, _run_loop

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "config" / "binhlu.yaml"


def quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


def parse_ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k.startswith("Vm") and v.strip().endswith("kB"):
            out[k] = int(v.split()[0])
    return out


class _BenchSimulation(Simulation):
    def __init__(self, *a: Any, notify_path: Path | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.notify_path = notify_path
        self.loop: asyncio.AbstractEventLoop | None = None
        self.daemon_starts: list[float] = []   # wall time just before each Popen

    def _daemon_env(self, *a: Any, **kw: Any) -> dict[str, str]:
        env = super()._daemon_env(*a, **kw)
        if self.notify_path is not None:
            env["NOTIFY_SOCKET"] = str(self.notify_path)
        return env

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        return await super().run()

    async def _play(self, cfg: Any, sc: Any) -> int:
        start = self.daemon.start

        def timed_start() -> int:
            self.daemon_starts.append(time.time())
            return start()
        self.daemon.start = timed_start
        return await super()._play(cfg, sc)


class SimSite:
    """`with SimSite(site_file) as s:` the site runs; `s.send(...)`, `s.wait(...)`."""

    def __init__(self, site: Path = SITE, *, timing: dict[str, str] | None = None,
                 notify: bool = False, duration_s: int = 3600, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="loaxa-bench-"))
        self.keep = keep
        self.site = Path(site)
        sc = {"duration": f"{duration_s}s", "title": "bench", "events": []}
        if timing:
            sc["timing"] = timing
        self.scenario = self.dir / "bench-scenario.yaml"
        self.scenario.write_text(json.dumps(sc))
        self.records: list[tuple[float, dict]] = []
        self.cond = threading.Condition()
        self.notify_msgs: list[tuple[float, str]] = []
        self._nsock: socket.socket | None = None
        if notify:
            self._nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._nsock.bind(str(self.dir / "notify.sock"))
            self._nsock.settimeout(0.2)
        self.stop_event = threading.Event()
        self.sim = _BenchSimulation(self.site, self.scenario, self.dir / "record.jsonl",
                                    on_record=self._on_record, stop_event=self.stop_event,
                                    workdir=self.dir / "work",
                                    notify_path=self.dir / "notify.sock" if notify else None)
        self.rc: int | None = None
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._log_pos = 0
        self._log: list[dict] = []

    # ---- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> SimSite:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        t = threading.Thread(target=self._run, name="bench-sim", daemon=True)
        t.start()
        self._threads.append(t)
        if self._nsock is not None:
            n = threading.Thread(target=self._notify_reader, name="bench-notify", daemon=True)
            n.start()
            self._threads.append(n)
        # up = the uplink said "online" and the daemon has set the exciter up (RDS name sent)
        self.wait(lambda o: o["kind"] == "mqtt" and o["topic"].endswith("/status")
                  and isinstance(o["payload"], dict) and o["payload"].get("state") == "online",
                  timeout)
        self.wait(lambda o: o["kind"] == "transmitter" and bool((o.get("rds") or {}).get("ps")),
                  timeout)

    def _run(self) -> None:
        try:
            self.rc = _run_loop(self.sim)
        except BaseException as e:
            self.rc, self.error = -1, e
            raise
        finally:
            self.sim.kill_all()
            with self.cond:
                self.cond.notify_all()

    def _notify_reader(self) -> None:
        while not self.stop_event.is_set():
            try:
                data = self._nsock.recv(4096)
            except (TimeoutError, OSError):
                continue
            now = time.time()
            with self.cond:
                self.notify_msgs += [(now, m) for m in data.decode().splitlines()]
                self.cond.notify_all()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join(30)
        self.sim.kill_all()
        if self._nsock is not None:
            self._nsock.close()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the record ----------------------------------------------------------------
    def _on_record(self, obj: dict) -> None:
        now = time.time()
        with self.cond:
            self.records.append((now, obj))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.records)

    def wait(self, pred: Callable[[dict], bool], timeout: float, since: int = 0) -> tuple[float, dict]:
        """The first record line from index `since` on that satisfies `pred` (its wall time)."""
        deadline = time.monotonic() + timeout
        i = since
        with self.cond:
            while True:
                while i < len(self.records):
                    w, o = self.records[i]
                    i += 1
                    if pred(o):
                        return w, o
                left = deadline - time.monotonic()
                if left <= 0 or (self.rc is not None):
                    why = f" (the simulation ended: rc {self.rc}, {self.error!r})" if self.rc is not None else ""
                    raise TimeoutError(f"no matching record line within {timeout} s{why}")
                self.cond.wait(min(left, 0.5))

    def wait_all(self, pred: Callable[[dict], Any], keys: set[str], timeout: float,
                 since: int = 0) -> dict[str, float]:
        """Wall time at which each key (pred returns the key or None) first matched."""
        got: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        i = since
        with self.cond:
            while len(got) < len(keys):
                while i < len(self.records):
                    w, o = self.records[i]
                    i += 1
                    k = pred(o)
                    if k in keys and k not in got:
                        got[k] = w
                left = deadline - time.monotonic()
                if len(got) >= len(keys) or left <= 0 or self.rc is not None:
                    break
                self.cond.wait(min(left, 0.5))
        return got

    def lines(self, since: int = 0) -> list[tuple[float, dict]]:
        with self.cond:
            return list(self.records[since:])

    # ---- the central server ------------------------------------------------------------
    def send(self, name: str, args: dict | None = None) -> tuple[str, float]:
        """Publish a signed command; returns (request_id, wall time just before sending)."""
        t = time.time()
        sent = self.sim.central.send(name, args or {})
        return sent["request_id"], t

    def response(self, request_id: str, timeout: float = 10.0, since: int = 0) -> tuple[float, dict]:
        return self.wait(lambda o: o["kind"] == "response" and o.get("request_id") == request_id,
                         timeout, since)

    def event(self, etype: str, timeout: float, since: int = 0,
              broadcast_id: str | None = None) -> tuple[float, dict]:
        def pred(o: dict) -> bool:
            p = o.get("payload")
            return (o["kind"] == "mqtt" and o["topic"].endswith("/events") and isinstance(p, dict)
                    and p.get("type") == etype
                    and (broadcast_id is None or p.get("broadcast_id") == broadcast_id))
        return self.wait(pred, timeout, since)

    # ---- the daemon ------------------------------------------------------------------
    @property
    def daemon_pid(self) -> int:
        return self.sim.daemon.proc.pid

    def daemon_log(self) -> list[dict]:
        """Every JSON line the daemon has logged so far (read incrementally)."""
        path = self.sim.workdir / "daemon.log"
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(self._log_pos)
                chunk = f.read()
        except FileNotFoundError:
            return self._log
        end = chunk.rfind("\n") + 1
        self._log_pos += len(chunk[:end].encode("utf-8", errors="replace"))
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    self._log.append(obj)
        return self._log

    def wait_log(self, pred: Callable[[dict], bool], timeout: float, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.daemon_log()
            for e in lines[since:]:
                if pred(e):
                    return e
            if time.monotonic() > deadline or self.rc is not None:
                raise TimeoutError(f"no matching daemon log line within {timeout} s")
            time.sleep(0.05)

    def on_air(self, broadcast_id: str, timeout: float = 15.0) -> dict:
        """The daemon's `on air` line of a broadcast (first sample to the sound card)."""
        return self.wait_log(lambda e: e.get("event") == "on air" and e.get("broadcast") == broadcast_id,
                             timeout)

    def carrier_off(self, since: int, timeout: float = 30) -> None:
        """Back to an idle air (on-demand carrier dropped) before the next run."""
        tx = [o for _, o in self.lines(since) if o["kind"] == "transmitter"]
        if not tx or tx[-1].get("carrier"):
            self.wait(lambda o: o["kind"] == "transmitter" and o.get("carrier") is False, timeout,
                      since + len(self.lines(since)) - 1)
        time.sleep(1.0)

    def restart(self, *, hard: bool = False, timeout: float = 20.0) -> None:
        """Stop the daemon (SIGTERM, or SIGKILL) and start it again, as a scenario's
        gateway_restart does."""
        fut = asyncio.run_coroutine_threadsafe(
            self.sim._restart(hard, 0.0, {"at": None, "gateway_restart": {"hard": hard}, "index": -1}),
            self.sim.loop)
        fut.result(timeout)


# ---- figures ---------------------------------------------------------------------
def summary(xs: list[float]) -> dict[str, float | int | None]:
    """n, median, p90, p99 (inclusive quantiles: with few samples p99 is close to max), min, max."""
    import statistics

    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {"n": 0, "median": None, "p90": None, "p99": None, "min": None, "max": None}
    if len(xs) > 1:
        q = statistics.quantiles(xs, n=100, method="inclusive")
        p90, p99 = q[89], q[98]
    else:
        p90 = p99 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "p90": p90, "p99": p99,
            "min": xs[0], "max": xs[-1]}


def fmt_ms(s: dict, *, p99: bool = False) -> str:
    """'median 123 ms  max 456 ms  (n=20)' from a summary() of seconds."""
    if not s["n"]:
        return "no samples"
    parts = [f"median {s['median'] * 1000:7.0f} ms"]
    if p99:
        parts.append(f"p99 {s['p99'] * 1000:7.0f} ms")
    parts.append(f"max {s['max'] * 1000:7.0f} ms")
    return "  ".join(parts) + f"  (n={s['n']})"


def write_results(name: str, data: dict) -> Path:
    """bench/results/NAME.json, or NAME-quick.json for a --quick run (full figures stay)."""
    out = ROOT / "bench" / "results" / f"{name}{'-quick' if data.get('quick') else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"bench": name, "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **data}
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out

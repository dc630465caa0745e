"""Power cuts: the daemon SIGKILLed again and again at random points loses nothing.

Also home of the fault-injection rig the other `test_faults_*` files import: the real
daemon (`loaxa run`) as a child, its transmitter simulator on a pty that can vanish,
IP cluster simulators on the test's mosquitto, and a central client that checks seq.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support.audio import capture_env
from support.site import site_file

from controller.central import CentralClient, SigningKey, public_key_b64, sign_command
from controller.contract import compact, topic
from device_drivers.profiles import load_profile
from device_drivers.sim.broker import die_with_parent
from device_drivers.sim.site_sim import Pty

ROOT = Path(__file__).resolve().parent.parent
SITE_ID = "minimal"
KEY_ID = "test-central"


# ============================================================================ the rig
class SimLoop:
    """The simulators' asyncio loop, in a thread of the test process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable, *args: Any) -> Any:
        async def _call() -> Any:
            return fn(*args)
        return self.run(_call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Notify:
    """NOTIFY_SOCKET that knows which pid sent each line (SO_PASSCRED), so a READY=1 left
    over from a killed daemon is never taken for the next one's."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.lines: list[tuple[int, str]] = []

    def pump(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not r:
                return
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[:12])[0]
            self.lines += [(pid, ln) for ln in data.decode(errors="replace").splitlines()]

    def seen(self, pid: int, prefix: str) -> int:
        return sum(1 for p, ln in self.lines if p == pid and ln.startswith(prefix))

    def wait(self, pid: int, prefix: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.seen(pid, prefix):
                return True
            if not alive():
                self.pump(0.05)
                return bool(self.seen(pid, prefix))
            self.pump(0.02)
        return False

    def close(self) -> None:
        self.sock.close()


class Gateway:
    """`loaxa run` as systemd would run it: own process group, NOTIFY_SOCKET, watchdog."""

    def __init__(self, site: Path, workdir: Path, notify: Notify, *, env: dict | None = None,
                 watchdog_usec: int | None = 2_000_000) -> None:
        self.site, self.workdir, self.notify = site, Path(workdir), notify
        base, self.air = capture_env(self.workdir / "audio")
        base.update(NOTIFY_SOCKET=notify.path, PYTHONUNBUFFERED="1",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        base.pop("WATCHDOG_PID", None)
        if watchdog_usec:
            base["WATCHDOG_USEC"] = str(watchdog_usec)
        base.update(env or {})
        self.env = base
        self.log = self.workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> int:
        with open(self.log, "ab") as out:
            out.write(f"---- start {self.starts + 1}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "run", "--config", str(self.site)],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()
        self.starts += 1
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> float:
        """Seconds from spawn to READY=1; fails with the log tail if it never comes."""
        if not self.notify.wait(self.pid, "READY=1", timeout, self.alive):
            raise AssertionError(f"no READY=1 from pid {self.pid} (rc={self.proc.poll()}):\n{self.tail()}")
        return time.monotonic() - self.started_at

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def term(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (espeak-ng) of the group
        return self.proc.returncode

    def status(self, field: str) -> int:
        """A number from /proc/PID/status (VmRSS in kB, Threads)."""
        for ln in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if ln.startswith(field + ":"):
                return int(ln.split()[1])
        raise KeyError(field)

    def rss_kb(self) -> int:
        return self.status("VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_events(self) -> list[dict]:
        out = []
        for ln in self.log.read_text(errors="replace").splitlines():
            if ln.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(ln))
        return out


class Central:
    """The central server's view: every event with seq/id bookkeeping, responses by request."""

    def __init__(self, broker_url: str, key: SigningKey) -> None:
        self.key = key
        self.client = CentralClient(broker_url, SITE_ID, key=key).connect()
        self.lock = threading.Lock()
        self.obs: list[Any] = []
        self.responses: dict[str, dict] = {}
        self.client.watch(self._on)

    def _on(self, o: Any) -> None:
        with self.lock:
            self.obs.append(o)
            if o.kind == "response" and isinstance(o.payload, dict) and o.payload.get("request_id"):
                self.responses[o.payload["request_id"]] = o.payload

    def events(self, type_: str | None = None) -> list[dict]:
        with self.lock:
            return [o.payload for o in self.obs if o.kind == "event"
                    and (type_ is None or o.payload.get("type") == type_)]

    def kinds(self, *kinds: str) -> list[Any]:
        with self.lock:
            return [o for o in self.obs if o.kind in kinds]

    def retained(self, kind: str) -> Any:
        with self.lock:
            got = [o.payload for o in self.obs if o.kind == kind]
        return got[-1] if got else None

    def post(self, command: str, args: dict | None = None, *, signed: bool = True) -> str:
        """Publish a command without waiting (responses land in `responses`)."""
        rid = str(uuid.uuid4())
        env = sign_command(self.key.private_key, SITE_ID, command, args or {}, self.key.key_id,
                           request_id=rid)
        if not signed:
            env.pop("signature")
            env.pop("key_id")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.client.response_topic
        props.CorrelationData = rid.encode()
        self.client.client.publish(topic(SITE_ID, f"cmd/{command}"), compact(env), qos=1,
                                   properties=props)
        return rid

    def wait_for(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = pred()
            if got:
                return got
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def close(self) -> None:
        self.client.close()


def new_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate(), KEY_ID)


def make_site(tmp_path: Path, broker_url: str, key: SigningKey, *, tx_port: str | None = None,
              clusters: list[dict] | None = None, programmes: list[dict] | None = None,
              timing: dict | None = None, diagnosis: dict | None = None, state_dir: Path | None = None,
              storage: dict | None = None, clock_check: str = "none", preroll_s: float = 0.3) -> Path:
    """minimal.yaml with the test's endpoints, a key the test holds, short timers."""
    ov: dict[str, Any] = {
        "central": {"broker": broker_url, "keys": [{"key_id": key.key_id,
                                                    "public_key": public_key_b64(key.private_key)}]},
        "transmitter": {"port": tx_port or str(tmp_path / "no-such-tty"), "frequency_mhz": 98.5,
                        "power_w": 30, "preroll_s": preroll_s},
        "timing": {"clock_check": clock_check, "poll_fast_s": 0.5, "poll_slow_s": 5,
                   "heartbeat_timeout_s": 10, "health_interval_s": 5, **(timing or {})},
        "programmes": programmes or [],
    }
    if clusters is not None:
        ov["clusters"] = clusters
    if diagnosis is not None:
        ov["diagnosis"] = diagnosis
    path = site_file(tmp_path, broker_url=broker_url, state_dir=state_dir, overrides=ov)
    if storage:
        data = yaml.safe_load(path.read_text())
        data["storage"].update(storage)
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


IP_CLUSTERS = [
    {"id": "fm01", "kind": "fm", "zone": "trung-tam", "fm": {"address": "101"}},
    {"id": "ip01", "kind": "ip", "zone": "trung-tam", "profile": "ip-json-v1", "ip": {"device_id": "t-ip01"}},
    {"id": "ip02", "kind": "ip", "zone": "trung-tam", "profile": "ip-tasmota-like",
     "ip": {"device_id": "t-ip02"}},
]


class Transmitter:
    """The exciter simulator on a pty behind a stable symlink, so its cable can be pulled."""

    def __init__(self, sims: SimLoop, link: Path, profile: str = "exciter-ascii-v2") -> None:
        from device_drivers.sim.transmitter_sim import TransmitterSim

        self.sims = sims
        self.pty = Pty(link)
        self.link = str(link)
        self.changes: list[tuple[float, dict]] = []
        self.sim = TransmitterSim(self.pty.master, load_profile(profile),
                                  on_change=lambda t: self.changes.append((time.monotonic(), t)))
        sims.run(self.sim.start())

    def carrier(self) -> bool:
        return bool(self.sims.call(self.sim.carrier_on))

    def carrier_episodes(self, since: float = 0.0) -> int:
        n, prev = 0, False
        for t, truth in list(self.changes):
            on = bool(truth["carrier"])
            if on and not prev and t >= since:
                n += 1
            prev = on
        return n

    def unplug(self) -> None:
        """The USB cable out: the daemon's fd hangs up and the device file vanishes."""
        def _unplug() -> None:
            old = self.pty
            self.pty = Pty(Path(self.link), linked=False)
            self.sim.reattach(self.pty.master)
            old.close()
        self.sims.call(_unplug)

    def plug(self) -> None:
        self.sims.call(self.pty.plug)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sims.run(self.sim.stop(), 5)
        self.pty.close()


def start_ip_sims(sims: SimLoop, broker_url: str, clusters: list[dict], interval: float = 1.0) -> list:
    from device_drivers.sim.ip_cluster_sim import IpClusterSim

    out = []
    for c in clusters:
        if c["kind"] != "ip":
            continue
        s = IpClusterSim(c["id"], c["ip"]["device_id"], load_profile(c["profile"]), broker_url,
                         on_change=lambda *a, **k: None, telemetry_interval=interval)
        sims.run(s.start())
        out.append(s)
    return out


def stop_ip_sims(sims: SimLoop, ip_sims: list) -> None:
    for s in ip_sims:
        with contextlib.suppress(Exception):
            sims.run(s.stop(), 5)


def db(state_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(state_dir / "state.db"))


def check_seq(central: Central, top: int) -> dict:
    """The contract's delivery rule: every seq 1..top arrived, a seq only ever under one
    id (resends are the same event), no regression and no gap left unfilled."""
    seen: dict[int, set[str]] = defaultdict(set)
    for ev in central.events():
        seen[ev["seq"]].add(ev["id"])
    missing = sorted(set(range(1, top + 1)) - set(seen))
    two_ids = {s: ids for s, ids in seen.items() if len(ids) > 1}
    bad = [(o.kind, o.detail) for o in central.kinds("seq_regression", "other") if o.kind != "other"
           or o.detail.get("error")]
    assert not missing, f"seqs never delivered: {missing[:20]} (of {top})"
    assert not two_ids, f"one seq, different events: {dict(list(two_ids.items())[:5])}"
    assert not bad, f"seq problems seen by the central server: {bad[:5]}"
    assert not central.client.tracker.missing, f"gaps left open: {sorted(central.client.tracker.missing)[:20]}"
    dups = len(central.kinds("duplicate"))
    return {"top": top, "duplicates": dups}


# ============================================================================ the test
KILLS = int(os.environ.get("LOAXA_KILLS", "50"))


def test_sigkill_loop_loses_nothing_and_leaves_no_carrier(tmp_path, broker):
    rng = random.Random(int(os.environ.get("LOAXA_KILL_SEED", "0")) or None)
    seed_note = f"seed={rng.random():.6f}"
    sims = SimLoop()
    key = new_key()
    tx = Transmitter(sims, tmp_path / "dev" / "transmitter")
    ip = start_ip_sims(sims, broker.url, IP_CLUSTERS, interval=0.5)
    state = tmp_path / "state"
    site = make_site(tmp_path, broker.url, key, tx_port=tx.link, clusters=IP_CLUSTERS, state_dir=state)
    notify = Notify(tmp_path / "notify.sock")
    gw = Gateway(site, tmp_path, notify)
    central = Central(broker.url, key)
    stop_traffic = threading.Event()
    sent: dict[str, tuple[str, dict]] = {}

    def traffic() -> None:
        """A central server busy with this site: reads, refused commands, broadcasts, schedules."""
        i = 0
        while not stop_traffic.wait(0.15):
            i += 1
            k = i % 4
            if k == 0:
                central.post("status.get", signed=False)           # -> command.rejected event
            elif k == 1:
                central.post("status.get")
            elif k == 2:
                central.post("broadcast.start", {"priority": "normal", "targets": ["fm01"],
                                                 "source": {"tts": {"text": f"Thử {i}."}}})
            else:
                pid = f"p{i}"
                args = {"id": pid, "title": f"Chương trình {i}", "priority": "normal",
                        "source": {"tts": {"text": "Bản tin."}}, "targets": ["fm01"],
                        "recurrence": {"cron": {"minute": str(i % 60), "hour": str(i % 24),
                                                "day_of_week": str(i % 7)}}}
                sent[central.post("schedule.put", args)] = (pid, args)

    t0 = time.monotonic()
    th = threading.Thread(target=traffic, daemon=True)
    ready_times: list[float] = []
    kills_before_ready = kills_after_ready = 0
    try:
        gw.start()
        ready_times.append(gw.wait_ready())
        th.start()
        for n in range(KILLS):
            if n == KILLS // 3:   # faults that raise alarms, so restarts meet active alarms
                sims.call(tx.sim.set_vswr, 2.4)
                sims.call(ip[0].surge_trip)
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0.05, 0.6))            # during start-up: migrations, outbox open
                gw.notify.pump(0)
                kills_before_ready += gw.notify.seen(gw.pid, "READY=1") == 0
            else:
                ready_times.append(gw.wait_ready())
                time.sleep(rng.uniform(0.2, 1.2))              # running: broadcasts, outbox writes
                kills_after_ready += 1
            gw.kill()
            gw.start()
        loop_s = time.monotonic() - t0
        stop_traffic.set()
        th.join(5)
        # the last power cut lands mid-broadcast, with the carrier up
        ready_times.append(gw.wait_ready())
        central.post("broadcast.start", {"priority": "normal", "targets": ["fm01"],
                                         "source": {"tts": {"text": "Mất điện giữa chừng."}}})
        central.wait_for(tx.carrier, 10, "a broadcast on the air before the last kill")
        gw.kill()
        gw.start()
        ready_times.append(gw.wait_ready())
        # the restarted daemon found no broadcast to resume: the carrier must come down
        central.wait_for(lambda: not tx.carrier(), 6, "carrier off after the last restart")
        # responses to schedule.put that said ok must be in the table after the last stop
        time.sleep(1.0)
        rc = gw.term()
        assert rc == 0, gw.tail()
    finally:
        stop_traffic.set()
        gw.kill()
        stop_ip_sims(sims, ip)
        tx.close()
        central.close()
        sims.close()
        notify.close()

    con = db(state)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    top = max(con.execute("SELECT COALESCE(MAX(seq),0) FROM event_log").fetchone()[0],
              con.execute("SELECT COALESCE(MAX(seq),0) FROM outbox").fetchone()[0])
    assert con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0, "clean stop left events undelivered"
    stats = check_seq(central, top)

    # every alarm exists once: one active row per (code, cluster), each raised id stored once
    dup_active = con.execute("SELECT code, cluster_id, COUNT(*) FROM alarms WHERE active=1 "
                             "GROUP BY code, cluster_id HAVING COUNT(*) > 1").fetchall()
    assert not dup_active, dup_active
    rows = {r[0]: r[1] for r in con.execute("SELECT alarm_id, code FROM alarms")}
    raised = {e["alarm_id"]: e["code"] for e in central.events("alarm.raised")}
    assert raised, "the injected faults raised no alarm"
    assert {a: c for a, c in raised.items() if a not in rows} == {}
    open_ids: dict[tuple, set] = defaultdict(set)
    cleared = {e["alarm_id"] for e in central.events("alarm.cleared")}
    for e in central.events("alarm.raised"):
        if e["alarm_id"] not in cleared:
            open_ids[(e["code"], e.get("cluster_id"))].add(e["alarm_id"])
    assert all(len(v) == 1 for v in open_ids.values()), f"an alarm raised twice: {dict(open_ids)}"

    # the central schedule table: readable rows, every acknowledged put present and whole
    table = {r[0]: json.loads(r[1]) for r in con.execute("SELECT programme_id, payload FROM central_schedule")}
    acked = [sent[rid][0] for rid, r in central.responses.items() if rid in sent and r.get("status") == "ok"]
    assert acked, "no schedule.put was acknowledged during the loop"
    assert not [p for p in acked if p not in table], "an acknowledged schedule.put was lost"
    assert all(table[p]["id"] == p for p in table)
    con.close()

    kinds = defaultdict(int)
    for e in central.events():
        kinds[e["type"]] += 1
    started = kinds["broadcast.started"]
    assert started >= 3 and kinds["command.rejected"] >= 5, dict(kinds)
    print(f"\nkill loop ({seed_note}): {KILLS} kills ({kills_before_ready} before READY, "
          f"{kills_after_ready} after) in {loop_s:.1f} s; READY after median "
          f"{sorted(ready_times)[len(ready_times) // 2]:.2f} s (max {max(ready_times):.2f}); "
          f"{top} events, {stats['duplicates']} resent duplicates; {dict(kinds)}")

"""The control socket as the technician's tools use it: real unix socket, real asyncio server.

The api object here stands in for the daemon's Runtime (which the lead wires later) and
returns data in exactly the shapes documented for ControlApi.
"""
from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.control import MAX_REQUEST_BYTES, ControlError, ControlServer

ROOT = Path(__file__).resolve().parent.parent


def ts(minutes_ago: float = 0) -> str:
    dt = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


CLUSTERS = [
    {"id": "ip01", "kind": "ip", "zone": "trung-tam", "availability": "online",
     "last_seen": None, "playing": None, "volume": 70, "rssi_dbm": -71,
     "subscription": {"expires_on": "2027-01-10", "days_left": 200}, "faults": []},
    {"id": "ip03", "kind": "ip", "zone": "ban-na-hu", "availability": "offline",
     "last_seen": None, "playing": None, "volume": 55, "rssi_dbm": -104,
     "subscription": {"expires_on": "2026-01-01", "days_left": -3},
     "faults": ["cluster.offline", "cluster.subscription_expired"]},
    {"id": "ip04", "kind": "ip", "zone": "ban-na-hu", "availability": "online",
     "last_seen": None, "playing": "bantin-sang", "volume": 80, "rssi_dbm": -92,
     "subscription": {"expires_on": "2026-06-01", "days_left": 10}, "faults": []},
    {"id": "fm07", "kind": "fm", "zone": "ban-x", "availability": "unmonitored",
     "last_seen": None, "playing": None, "volume": None, "rssi_dbm": None,
     "subscription": None, "faults": []},
    {"id": "fm12", "kind": "fm", "zone": "ban-x", "availability": "disabled",
     "last_seen": None, "playing": None, "volume": None, "rssi_dbm": None,
     "subscription": None, "faults": []},
]


class FakeRuntime:
    """Implements ControlApi with realistic data; records calls for the tests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.gate: asyncio.Event | None = None  # test_cluster waits on it when set
        self.clusters_data = json.loads(json.dumps(CLUSTERS))
        self.clusters_data[0]["last_seen"] = ts(3)
        self.clusters_data[1]["last_seen"] = ts(125)
        self.clusters_data[2]["last_seen"] = ts(0.05)

    def _ids(self) -> set[str]:
        return {c["id"] for c in self.clusters_data}

    async def status(self) -> dict:
        self.calls.append(("status", {}))
        return {
            "site": {"id": "binhlu", "name": "Bình Lư"},
            "version": "0.1.0",
            "health": {
                "gateway": {"uptime_s": 93784, "clock_synced": True, "outbox_depth": 0,
                            "cpu_temp_c": 51.2, "disk_free_mb": 5210},
                "transmitter": {"reachable": True, "on_air": True, "frequency_mhz": 98.5,
                                "forward_w": 29.5, "reflected_w": 0.4, "vswr": 1.26,
                                "temperature_c": 41, "pll_locked": True},
                "counts": {"clusters_total": 35, "online": 5, "offline": 1, "unmonitored": 28,
                           "faulty": 1},
            },
            "central": {"connected": True},
            "on_air": {"broadcast_id": "b-0193", "programme_id": "bantin-sang",
                       "title": "Bản tin sáng", "priority": "normal", "started_at": ts(12),
                       "targets": ["ip01", "ip04", "fm07"]},
            "alarms_active": 2,
        }

    async def clusters(self, zone):
        self.calls.append(("clusters", {"zone": zone}))
        return [c for c in self.clusters_data if zone is None or c["zone"] == zone]

    async def alarms(self):
        self.calls.append(("alarms", {}))
        return [
            {"alarm_id": "a-17", "code": "cluster.offline", "severity": "major",
             "cluster_id": "ip03", "cause": "lightning", "confidence": 0.8,
             "evidence": ["storm: 6 strikes within 8 km, 14:02-14:09",
                          "3 clusters in zone ban-na-hu lost within 40 s"],
             "raised_at": ts(125), "incident_id": "inc-4"},
            {"alarm_id": "a-18", "code": "transmitter.vswr_high", "severity": "critical",
             "cause": "hardware", "confidence": 0.6, "evidence": ["VSWR 2.8 for 5 min"],
             "raised_at": ts(30), "acknowledged_by": "central:lan"},
        ]

    async def test_cluster(self, cluster_id):
        self.calls.append(("test_cluster", {"cluster_id": cluster_id}))
        if self.gate is not None:
            await self.gate.wait()
        if cluster_id == "boom":
            raise RuntimeError("driver exploded")
        if cluster_id not in self._ids():
            raise ControlError("unknown_cluster", f"no cluster {cluster_id!r}")
        if cluster_id == "ip01":
            return {"cluster_id": "ip01", "kind": "ip", "answered": True, "round_trip_ms": 412.7,
                    "reason": None, "state": self.clusters_data[0]}
        if cluster_id == "ip03":
            return {"cluster_id": "ip03", "kind": "ip", "answered": False, "round_trip_ms": None,
                    "reason": "no reply within 10 s", "state": self.clusters_data[1]}
        return {"cluster_id": cluster_id, "kind": "fm", "address": "107", "method": "dtmf",
                "wake_codes": ["A107"], "sleep_codes": ["B107"], "tone_hz": 1000, "tone_s": 10,
                "frequency_mhz": 98.5, "return_channel": False, "answered": None, "reason": None}

    async def play(self, file, tts, targets, priority, by):
        self.calls.append(("play", {"file": file, "tts": tts, "targets": targets,
                                    "priority": priority, "by": by}))
        ids = [c["id"] for c in self.clusters_data] if targets == "all" else list(targets)
        return {"broadcast_id": "b-0200", "state": "started", "priority": priority,
                "targets": [i for i in ids if i != "fm12"], "skipped": ["fm12"] if "fm12" in ids else [],
                "preempted": "b-0193" if priority == "emergency" else None}

    async def stop(self, broadcast_id):
        self.calls.append(("stop", {"broadcast_id": broadcast_id}))
        if broadcast_id not in (None, "b-0193"):
            raise ControlError("unknown_broadcast", f"{broadcast_id} is not playing")
        return {"stopped": ["b-0193"]}

    async def log(self, from_, to, type_, limit):
        self.calls.append(("log", {"from_": from_, "to": to, "type_": type_, "limit": limit}))
        return [
            {"id": "01J0", "seq": 41, "ts": ts(125), "type": "alarm.raised", "historical": False,
             "alarm_id": "a-17", "code": "cluster.offline", "cluster_id": "ip03"},
            {"id": "01J1", "seq": 42, "ts": ts(30), "type": "alarm.raised", "historical": False,
             "alarm_id": "a-18", "code": "transmitter.vswr_high"},
        ][:limit]

    async def broadcast_log(self, from_, to):
        self.calls.append(("broadcast_log", {"from_": from_, "to": to}))
        return [
            {"broadcast_id": "b-0190", "programme_id": "bantin-sang", "title": "Bản tin sáng",
             "priority": "normal", "source": {"tts": {"text": "Xin chào bà con"}},
             "ordered_by": "schedule", "targets": ["ip01", "ip03", "fm07"],
             "reached": ["ip01", "fm07"], "unreached": [{"cluster": "ip03", "reason": "offline"}],
             "started_at": ts(1440), "ended_at": ts(1410), "outcome": "finished"},
            {"broadcast_id": "b-0191", "programme_id": None, "title": None,
             "priority": "emergency", "source": {"media": {"url": "http://c/bao-lu.mp3",
                                                           "sha256": "0" * 64}},
             "ordered_by": "central:ubnd-xa", "targets": ["ip01"], "reached": ["ip01"],
             "unreached": [], "started_at": ts(600), "ended_at": ts(590), "outcome": "failed"},
        ]

    async def note(self, cluster_id, status, cause, text, by):
        self.calls.append(("note", {"cluster_id": cluster_id, "status": status, "cause": cause,
                                    "text": text, "by": by}))
        if cluster_id not in self._ids():
            raise ControlError("unknown_cluster", f"no cluster {cluster_id!r}")
        return {"cluster_id": cluster_id, "status": status, "cause": cause, "text": text,
                "by": by, "ts": ts()}


class ServerThread:
    """A real ControlServer on its own event loop in a background thread."""

    def __init__(self, path: Path, api, group: str | None = None) -> None:
        self.path = path
        self.api = api
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(path, group, api)
        self.run(self.server.start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def sock_dir():
    d = Path(tempfile.mkdtemp(prefix="lx", dir="/tmp"))  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(sock_dir):
    s = ServerThread(sock_dir / "control.sock", FakeRuntime())
    yield s
    s.close()


class Conn:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(5)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")

    def send(self, raw: bytes) -> None:
        self.s.sendall(raw)

    def ask(self, obj) -> dict:
        self.send(json.dumps(obj).encode() + b"\n")
        return self.read()

    def read(self) -> dict:
        line = self.f.readline()
        assert line, "server closed the connection"
        return json.loads(line)

    def close(self) -> None:
        self.f.close()
        self.s.close()


def test_each_op_answers_with_data_and_echoes_id(daemon):
    c = Conn(daemon.path)
    r = c.ask({"id": "q1", "op": "status", "args": {}})
    assert r["id"] == "q1" and r["ok"] is True
    assert r["data"]["health"]["transmitter"]["frequency_mhz"] == 98.5
    r = c.ask({"id": 2, "op": "clusters", "args": {"zone": "ban-x"}})
    assert [x["id"] for x in r["data"]] == ["fm07", "fm12"]
    r = c.ask({"id": 3, "op": "log", "args": {"from": ts(60 * 24), "to": ts(), "type": "alarm.",
                                              "limit": 1}})
    assert r["ok"] and len(r["data"]) == 1
    assert daemon.api.calls[-1][1]["type_"] == "alarm." and daemon.api.calls[-1][1]["limit"] == 1
    r = c.ask({"id": 4, "op": "stop"})  # args may be left out
    assert r == {"id": 4, "ok": True, "data": {"stopped": ["b-0193"]}}
    c.close()


def test_api_refusal_becomes_error_response(daemon):
    c = Conn(daemon.path)
    r = c.ask({"id": 7, "op": "test_cluster", "args": {"cluster_id": "fm99"}})
    assert r == {"id": 7, "ok": False,
                 "error": {"code": "unknown_cluster", "message": "no cluster 'fm99'"}}
    r = c.ask({"id": 8, "op": "test_cluster", "args": {"cluster_id": "boom"}})
    assert r["ok"] is False and r["error"]["code"] == "internal"
    assert "driver exploded" in r["error"]["message"]
    assert c.ask({"id": 9, "op": "alarms"})["ok"] is True  # same connection still served
    c.close()


@pytest.mark.parametrize("raw, code", [
    (b"{not json\n", "bad_json"),
    (b"\xff\xfe\n", "bad_json"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"id": 1, "op": "format_disk"}\n', "unknown_op"),
    (b'{"id": 1, "op": 5}\n', "unknown_op"),
    (b'{"id": 1, "op": "clusters", "args": [1]}\n', "bad_request"),
    (b'{"id": 1, "op": "test_cluster", "args": {}}\n', "bad_request"),
    (b'{"id": 1, "op": "play", "args": {"file": "/a.mp3", "tts": "x", "targets": "all"}}\n',
     "bad_request"),
    (b'{"id": 1, "op": "play", "args": {"tts": "x", "targets": "all", "priority": "urgent"}}\n',
     "bad_request"),
    (b'{"id": 1, "op": "play", "args": {"tts": "x", "targets": []}}\n', "bad_request"),
    (b'{"id": 1, "op": "note", "args": {"cluster_id": "fm07", "status": "broken"}}\n',
     "bad_request"),
    (b'{"id": 1, "op": "log", "args": {"limit": 100000}}\n', "bad_request"),
    (b'{"id": 1, "op": "note", "args": {"cluster_id": "fm07", "status": "note", "cause": "x"}}\n',
     "bad_request"),
    (b'{"id": 1, "op": "status", "args": {"verbose": true}}\n', "bad_request"),
])
def test_bad_requests_get_errors_and_server_keeps_serving(daemon, raw, code):
    c = Conn(daemon.path)
    c.send(raw)
    r = c.read()
    assert r["ok"] is False and r["error"]["code"] == code, r
    assert r["error"]["message"]
    assert c.ask({"id": "after", "op": "status"})["ok"] is True
    c.close()
    assert not [x for x in daemon.api.calls if x[0] in ("play", "note", "test_cluster")]


def test_bad_request_message_names_the_field(daemon):
    c = Conn(daemon.path)
    r = c.ask({"id": 1, "op": "play", "args": {"tts": "x", "targets": "all", "priority": "urgent"}})
    assert "priority" in r["error"]["message"]
    c.close()


def test_oversized_request_is_refused_and_others_still_served(daemon):
    c = Conn(daemon.path)
    c.send(b'{"id":1,"op":"status","args":{"pad":"' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}}\n')
    r = c.read()
    assert r["ok"] is False and r["error"]["code"] == "too_large"
    assert c.f.readline() == b""  # that connection is closed, not resynchronised mid-line
    c.close()
    c2 = Conn(daemon.path)
    assert c2.ask({"id": 2, "op": "status"})["ok"] is True
    c2.close()


def test_slow_client_and_slow_op_do_not_block_others(daemon):
    daemon.api.gate = daemon.run(_make_event())
    idle = Conn(daemon.path)
    idle.send(b'{"id": 1, "op": "sta')  # half a request, then nothing
    slow = Conn(daemon.path)
    slow.send(b'{"id": "slow", "op": "test_cluster", "args": {"cluster_id": "ip01"}}\n')
    other = Conn(daemon.path)
    assert other.ask({"id": "fast", "op": "status"})["ok"] is True  # while both are pending
    assert ("test_cluster", {"cluster_id": "ip01"}) in daemon.api.calls
    daemon.loop.call_soon_threadsafe(daemon.api.gate.set)
    r = slow.read()
    assert r["id"] == "slow" and r["data"]["answered"] is True
    idle.send(b'tus"}\n')  # the idle client finishes its line and is served normally
    assert idle.read()["id"] == 1
    for c in (idle, slow, other):
        c.close()


async def _make_event():
    return asyncio.Event()


def test_socket_mode_group_stale_and_cleanup(sock_dir):
    path = sock_dir / "control.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # what a crashed daemon leaves behind
    leftover.close()
    other_group = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    s = ServerThread(path, FakeRuntime(), group=other_group.gr_name if other_group else None)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        if other_group and os.geteuid() == 0:
            assert st.st_gid == other_group.gr_gid
        c = Conn(path)
        assert c.ask({"id": 1, "op": "status"})["ok"] is True
        c.close()
    finally:
        s.close()
    assert not path.exists(), "socket must be removed at stop"


def test_missing_group_still_starts(sock_dir):
    s = ServerThread(sock_dir / "c.sock", FakeRuntime(), group="no-such-group-lx")
    try:
        assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o660
    finally:
        s.close()


def test_refuses_to_steal_a_live_socket_or_delete_a_file(sock_dir, daemon):
    second = ControlServer(daemon.path, None, FakeRuntime())
    with pytest.raises(RuntimeError, match="already answering"):
        asyncio.run(second.start())
    assert Conn(daemon.path).ask({"id": 1, "op": "status"})["ok"] is True
    regular = sock_dir / "not-a-socket"
    regular.write_text("precious")
    with pytest.raises(RuntimeError, match="not a socket"):
        asyncio.run(ControlServer(regular, None, FakeRuntime()).start())
    assert regular.read_text() == "precious"


PEER_SCRIPT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(json.dumps({"id": 1, "op": "play", "args": {"tts": "thử loa", "targets": ["fm07"],
          "by": "mallory"}}).encode() + b"\n")
print(s.makefile().readline())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_ordered_by_comes_from_the_kernel_not_the_client(sock_dir):
    group = next((g for g in grp.getgrall() if g.gr_gid != 0 and g.gr_name != "nogroup"), None)
    if group is None:
        pytest.skip("no spare group")
    py = "/usr/bin/python3"  # the venv may not be readable by nobody; stdlib is enough here
    if not os.access(py, os.X_OK):
        pytest.skip("no system python3")
    os.chmod(sock_dir, 0o755)
    api = FakeRuntime()
    s = ServerThread(sock_dir / "control.sock", api, group=group.gr_name)
    try:
        out = subprocess.run([py, "-c", PEER_SCRIPT, str(s.path)], user="nobody",
                             group="nogroup", extra_groups=[group.gr_gid], capture_output=True,
                             text=True, timeout=20, cwd="/")
        assert json.loads(out.stdout)["ok"] is True, out.stderr
        assert api.calls[-1][1]["by"] == "local:nobody"
        c = Conn(s.path)  # root may speak for the sudo user
        c.ask({"id": 2, "op": "play", "args": {"tts": "x", "targets": "all", "by": "hung"}})
        c.close()
        assert api.calls[-1][1]["by"] == "local:hung"
        denied = subprocess.run([py, "-c", PEER_SCRIPT, str(s.path)], user="nobody",
                                group="nogroup", extra_groups=[], capture_output=True, text=True, timeout=20, cwd="/")
        assert "PermissionError" in denied.stderr  # not in the group: the mode keeps them out
    finally:
        s.close()

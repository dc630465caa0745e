"""Local control socket: the technician's `loaxa status/play/...` talk to the running daemon.

JSON lines over a unix stream socket, one request per line:
  -> {"id": 1, "op": "clusters", "args": {"zone": "ban-x"}}
  <- {"id": 1, "ok": true, "data": [...]}   or   {"id": 1, "ok": false, "error": {"code", "message"}}
Access control is the file mode (0660, group = the service group): whoever can open the
socket may command. Who asked is taken from the kernel (SO_PEERCRED), not from the client,
so the broadcast log's "ordered by" cannot be forged by a non-root user.
Bad input never takes the server down: every failure becomes an error response.
"""
from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 120.0
WRITE_TIMEOUT_S = 10.0
MAX_CLIENTS = 16


class ControlError(Exception):
    """Raised by the api for a request it refuses; becomes an error response (not a crash).

    Codes the CLI translates: unknown_cluster, unknown_broadcast, file_not_found, busy,
    not_ready, unsupported, bad_request (others are shown as given).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlApi(Protocol):
    """What the daemon's Runtime implements for the control socket (all run on the loop).

    Timestamps are RFC 3339 UTC strings; the CLI turns them into "3 min ago" / local time.
    Refusals (unknown id, nothing to stop, file unreadable...) raise ControlError.
    """

    async def status(self) -> dict:
        """{"site": {"id","name"}, "version", "health": <contract Health: gateway, transmitter
        (or null), counts>, "central": {"connected": bool}, "on_air": null | {"broadcast_id",
        "programme_id", "title", "priority", "started_at", "targets": [ids]},
        "alarms_active": int}"""
        ...

    async def clusters(self, zone: str | None) -> list[dict]:
        """Contract ClusterState dicts (id, kind, zone, availability, last_seen, playing, volume,
        rssi_dbm, subscription {expires_on, days_left}, faults [codes]), config order; optional
        "zone_name". Unknown zone: [] (or ControlError("unknown_zone"))."""
        ...

    async def alarms(self) -> list[dict]:
        """Active contract Alarm dicts (alarm_id, code, severity, cluster_id?, cause,
        confidence, evidence [str], raised_at, acknowledged_by?, incident_id?)."""
        ...

    async def test_cluster(self, cluster_id: str) -> dict:
        """IP: {"cluster_id", "kind": "ip", "answered": bool, "round_trip_ms": float|null,
        "reason": str|null, "state": ClusterState|null}.
        FM: {"cluster_id", "kind": "fm", "address": "107", "method": "dtmf"|"rds",
        "wake_codes": [str], "sleep_codes": [str], "tone_hz", "tone_s", "frequency_mhz",
        "return_channel": bool, "answered": bool|null (null without return channel),
        "reason": str|null}. Unknown id: ControlError("unknown_cluster")."""
        ...

    async def play(self, file: str | None, tts: str | None, targets: list[str] | Literal["all"],
                   priority: str, by: str) -> dict:
        """Exactly one of file (absolute path as the technician sees it) / tts. `by` is
        "local:<user>" from the socket peer. -> {"broadcast_id", "state": "started"|"queued",
        "priority", "targets": [resolved enabled ids], "skipped": [disabled ids],
        "preempted": broadcast_id|null}. Refusals: unknown_cluster, file_not_found, busy."""
        ...

    async def stop(self, broadcast_id: str | None) -> dict:
        """None = whatever is on air. -> {"stopped": [broadcast ids]} ([] when nothing
        played); an id that is not playing: ControlError("unknown_broadcast")."""
        ...

    async def log(self, from_: str | None, to: str | None, type_: str | None,
                  limit: int) -> list[dict]:
        """Events from the local log, oldest first, as published: envelope (id, seq, ts, type,
        historical) + body fields. type_: exact type or a prefix ending in "."."""
        ...

    async def broadcast_log(self, from_: str | None, to: str | None) -> list[dict]:
        """broadcast_log rows by started_at, JSON columns decoded: {"broadcast_id",
        "programme_id", "title", "priority", "source" (object or kind), "ordered_by",
        "targets": [ids], "reached": [ids], "unreached": [{"cluster","reason"}], "started_at",
        "ended_at", "outcome": finished|preempted|failed|skipped|stopped|playing}."""
        ...

    async def note(self, cluster_id: str, status: str, cause: str | None, text: str | None,
                   by: str) -> dict:
        """Store in maintenance_notes and emit cluster.maintenance. status: damaged|repaired|
        note; cause: a CLUSTER_CAUSES value or None. -> the note {"cluster_id", "status",
        "cause", "text", "by", "ts"}."""
        ...


# ---------------------------------------------------------------- request arguments
class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _NoArgs(_Args):
    pass


class _ClustersArgs(_Args):
    zone: str | None = None


class _ClusterIdArgs(_Args):
    cluster_id: str = Field(min_length=1, max_length=64)


class _PlayArgs(_Args):
    file: str | None = Field(None, min_length=1, max_length=4096)
    tts: str | None = Field(None, min_length=1, max_length=5000)
    targets: Literal["all"] | list[str] = Field(min_length=1)
    priority: Literal["normal", "priority", "emergency"] = "normal"
    by: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _one_source(self) -> _PlayArgs:
        if (self.file is None) == (self.tts is None):
            raise ValueError("give exactly one of file or tts")
        return self

    @field_validator("targets")
    @classmethod
    def _nonempty_ids(cls, v: Any) -> Any:
        if isinstance(v, list) and any(not t for t in v):
            raise ValueError("empty target id")
        return v


class _StopArgs(_Args):
    broadcast_id: str | None = None


class _LogArgs(_Args):
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    type_: str | None = Field(None, alias="type")
    limit: int = Field(200, ge=1, le=1000)


class _BroadcastLogArgs(_Args):
    from_: str | None = Field(None, alias="from")
    to: str | None = None


class _NoteArgs(_Args):
    cluster_id: str = Field(min_length=1, max_length=64)
    status: Literal["damaged", "repaired", "note"]
    cause: Literal["lightning", "subscription_expired", "power_loss", "link_loss", "hardware",
                   "vandalism_or_unknown", "unknown"] | None = None
    text: str | None = Field(None, max_length=2000)
    by: str | None = Field(None, max_length=64)


# op -> (api method, args model, whether `by` is filled from the peer)
OPS: dict[str, tuple[str, type[_Args], bool]] = {
    "status": ("status", _NoArgs, False),
    "clusters": ("clusters", _ClustersArgs, False),
    "alarms": ("alarms", _NoArgs, False),
    "test_cluster": ("test_cluster", _ClusterIdArgs, False),
    "play": ("play", _PlayArgs, True),
    "stop": ("stop", _StopArgs, False),
    "log": ("log", _LogArgs, False),
    "broadcast_log": ("broadcast_log", _BroadcastLogArgs, False),
    "note": ("note", _NoteArgs, True),
}


def _err(rid: Any, code: str, message: str) -> dict:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def _peer_user(writer: asyncio.StreamWriter) -> tuple[int | None, str]:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
    except (OSError, AttributeError):
        return None, "unknown"
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, f"uid{uid}"


class ControlServer:
    """One asyncio unix server; each connection is its own task, so a slow client waits alone."""

    def __init__(self, socket_path: str | os.PathLike, group: str | None, api: ControlApi) -> None:
        self.path = Path(socket_path)
        self.group = group
        self.api = api
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, 0o660)
        self._inode = os.stat(self.path).st_ino
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
                os.chown(self.path, -1, gid)
            except KeyError:
                log.warning("control.group_missing", group=self.group, path=str(self.path))
            except PermissionError:
                log.warning("control.chown_denied", group=self.group, path=str(self.path))
        log.info("control.listening", path=str(self.path))

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:  # refused: nobody listens, a leftover from a crash
            self.path.unlink()
            log.info("control.stale_socket_removed", path=str(self.path))
            return
        finally:
            probe.close()
        raise RuntimeError(f"another loaxa daemon is already answering on {self.path}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        try:  # only our own socket: a newer daemon may already have replaced it
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ per connection
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CLIENTS:
            await self._send(writer, _err(None, "busy", "too many control connections"))
            writer.close()
            return
        self._conns.add(writer)
        uid, user = _peer_user(writer)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, _err(
                        None, "too_large", f"request longer than {MAX_REQUEST_BYTES} bytes"))
                    break
                except (TimeoutError, ConnectionError):
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                resp = await self.handle_line(line, uid=uid, user=user)
                if not await self._send(writer, resp):
                    break
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, resp: dict) -> bool:
        try:
            body = json.dumps(resp, ensure_ascii=False, separators=(",", ":"), default=str)
        except (TypeError, ValueError) as e:
            log.error("control.unserialisable", error=str(e))
            body = json.dumps(_err(resp.get("id"), "internal", "reply could not be encoded"))
        try:
            writer.write(body.encode() + b"\n")
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            return True
        except (ConnectionError, TimeoutError):
            return False

    async def handle_line(self, line: bytes, *, uid: int | None = None, user: str = "unknown") -> dict:
        """One request line -> one response object. Never raises."""
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return _err(None, "bad_json", f"not a JSON line: {e}")
        if not isinstance(req, dict):
            return _err(None, "bad_request", "a request is a JSON object with id, op, args")
        rid = req.get("id")
        op = req.get("op")
        if op == "ping":
            return {"id": rid, "ok": True, "data": {"pong": True, "ops": sorted(OPS)}}
        if not isinstance(op, str) or op not in OPS:
            return _err(rid, "unknown_op", f"unknown op {op!r}; known: {', '.join(sorted(OPS))}")
        method, model, wants_by = OPS[op]
        raw_args = req.get("args") or {}
        if not isinstance(raw_args, dict):
            return _err(rid, "bad_request", "args must be a JSON object")
        try:
            args = model.model_validate(raw_args).model_dump()
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'args'}: {x['msg']}"
                             for x in e.errors())
            return _err(rid, "bad_request", msgs)
        if wants_by:
            # root may speak for the sudo user; anyone else is who the kernel says they are
            claimed = args.get("by")
            args["by"] = f"local:{claimed}" if uid == 0 and claimed else f"local:{user}"
        try:
            data = await getattr(self.api, method)(**args)
        except ControlError as e:
            return _err(rid, e.code, e.message)
        except Exception as e:
            log.exception("control.api_failed", op=op)
            return _err(rid, "internal", f"{type(e).__name__}: {e} (see journalctl -u loaxa)")
        return {"id": rid, "ok": True, "data": data}


# ---------------------------------------------------------------- client (CLI side)
class NotRunning(Exception):
    """The daemon could not be reached: reason is missing|refused|denied|timeout|closed."""

    def __init__(self, reason: str, path: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {path} {detail}".strip())
        self.reason = reason
        self.path = path
        self.detail = detail


def call(socket_path: str | os.PathLike, op: str, args: dict | None = None, *,
         timeout: float = 15.0) -> Any:
    """Blocking one-shot request for the CLI; returns data or raises ControlError/NotRunning."""
    path = str(socket_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError as e:
            raise NotRunning("missing", path) from e
        except PermissionError as e:
            raise NotRunning("denied", path) from e
        except (ConnectionRefusedError, OSError) as e:
            raise NotRunning("refused", path, str(e)) from e
        req = json.dumps({"id": 1, "op": op, "args": args or {}}, ensure_ascii=False)
        buf = bytearray()
        try:
            s.sendall(req.encode() + b"\n")
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise NotRunning("closed", path)
                buf += chunk
        except TimeoutError as e:
            raise NotRunning("timeout", path, f"{timeout:g}") from e
        except ConnectionError as e:
            raise NotRunning("closed", path, str(e)) from e
    finally:
        s.close()
    resp = json.loads(buf.split(b"\n", 1)[0])
    if not resp.get("ok"):
        err = resp.get("error") or {}
        raise ControlError(str(err.get("code", "error")), str(err.get("message", "")))
    return resp.get("data")

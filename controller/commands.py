"""Verify and dispatch commands from the central server (only the central server may command).

Checks run cheapest-first, and the replay cache is only written for commands whose
signature verified and which are fresh, so forged traffic cannot fill it or block a
genuine request id. Every rejection answers an error response and leaves a durable
`command.rejected` event; repeated forged/replayed commands also call `on_security`.
"""
from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from controller.contract import (
    COMMAND_ARGS,
    CommandEnvelope,
    parse_rfc3339,
    rfc3339,
    signing_bytes,
)

log = structlog.get_logger(__name__)

SECURITY_CODES = frozenset({"unsigned", "unknown_key", "bad_signature", "replayed", "wrong_site"})


class CommandError(Exception):
    """Raised by a handler to answer a specific error code (e.g. not_found, busy)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class CommandContext:
    request_id: str
    command: str
    site_id: str
    key_id: str
    issued_at: str


Handler = Callable[[Any, CommandContext], Awaitable[dict | None]]


def load_public_keys(keys: Mapping[str, str] | Iterable[Any]) -> dict[str, Ed25519PublicKey]:
    """{key_id: base64 raw 32 bytes} or objects/dicts with key_id and public_key."""
    items = keys.items() if isinstance(keys, Mapping) else (
        (k["key_id"], k["public_key"]) if isinstance(k, Mapping) else (k.key_id, k.public_key)
        for k in keys
    )
    out = {}
    for key_id, b64 in items:
        raw = base64.b64decode(b64, validate=True)
        if len(raw) != 32:
            raise ValueError(f"central key {key_id!r}: expected 32 raw bytes, got {len(raw)}")
        out[key_id] = Ed25519PublicKey.from_public_bytes(raw)
    return out


class CommandGate:
    def __init__(
        self,
        site_id: str,
        keys: Mapping[str, str] | Iterable[Any],
        store: Any,
        outbox: Any,
        *,
        max_age_s: float = 300,
        max_bytes: int = 65536,
        clock: Callable[[], float] = time.time,
        on_security: Callable[[dict], None] | None = None,
        security_threshold: int = 3,
        security_window_s: float = 600,
    ):
        self.site_id = site_id
        self.keys = load_public_keys(keys)
        self.store, self.outbox = store, outbox
        self.max_age_s, self.max_bytes = max_age_s, max_bytes
        self.clock = clock
        self.on_security = on_security
        self.security_threshold, self.security_window_s = security_threshold, security_window_s
        self._security_hits: deque[float] = deque()
        self._handlers: dict[str, Handler] = {}
        self.counters: dict[str, int] = {}

    def register(self, command: str, handler: Handler) -> None:
        self._handlers[command] = handler

    def register_builtin(
        self,
        *,
        rebirth: Callable[[], Awaitable[Any] | Any] | None = None,
        status_provider: Callable[[], dict] | None = None,
    ) -> None:
        """The purely uplink-side commands: rebirth, status.get and log.query."""
        if rebirth is not None:
            async def _rebirth(args: Any, ctx: CommandContext) -> dict:
                r = rebirth()
                if hasattr(r, "__await__"):
                    r = await r
                return r if isinstance(r, dict) else {}
            self.register("rebirth", _rebirth)
        if status_provider is not None:
            async def _status(args: Any, ctx: CommandContext) -> dict:
                return status_provider()
            self.register("status.get", _status)
        self.register("log.query", self._log_query)

    async def _log_query(self, args: Any, ctx: CommandContext) -> dict:
        lo, hi = rfc3339(parse_rfc3339(args.from_)), rfc3339(parse_rfc3339(args.to))
        events, truncated = self.outbox.query_log(lo, hi, args.type, args.limit)
        return {"events": events, "truncated": truncated}

    # ------------------------------------------------------------ entry point
    async def handle(self, topic: str, payload: bytes) -> dict:
        """Verify and run one command; always returns the response (never raises)."""
        command = topic.rsplit("/", 1)[-1]
        req: dict = {"request_id": None, "command": command}
        try:
            env, args = self._verify(topic, command, payload, req)
        except CommandError as e:
            return self._reject(req, e)
        ctx = CommandContext(env.request_id, env.command, env.site_id, env.key_id, env.issued_at)
        handler = self._handlers.get(env.command)
        if handler is None:
            return self._reject(req, CommandError("not_supported",
                                                  f"{env.command} is not handled by this gateway"))
        try:
            data = await handler(args, ctx)
        except CommandError as e:
            return self._reject(req, e)
        except Exception as e:  # a handler bug must never take the uplink down
            log.exception("command_handler_failed", command=env.command, request_id=env.request_id)
            return self._reject(req, CommandError("internal", f"{type(e).__name__}: {e}"))
        self._count("ok")
        log.info("command_ok", command=env.command, request_id=env.request_id, key_id=env.key_id)
        return {"request_id": env.request_id, "status": "ok", "data": data or {}}

    def _verify(self, topic: str, command: str, payload: bytes, req: dict) -> tuple:
        if len(payload) > self.max_bytes:
            raise CommandError("too_large", f"{len(payload)} bytes > {self.max_bytes}")
        try:
            raw = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CommandError("invalid_json", f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CommandError("invalid_json", "payload must be a JSON object")
        rid = raw.get("request_id")
        if isinstance(rid, str) and 0 < len(rid) <= 128:
            req["request_id"] = rid
        if not raw.get("signature") or not raw.get("key_id"):
            raise CommandError("unsigned", "key_id and signature are required")
        try:
            env = CommandEnvelope.model_validate(raw)
        except ValidationError as e:
            raise CommandError("invalid_envelope", _first_error(e)) from None
        req["key_id"] = env.key_id
        parts = topic.split("/")
        if len(parts) < 5 or env.site_id != parts[2] or env.site_id != self.site_id:
            raise CommandError("wrong_site", f"site_id {env.site_id!r} is not {self.site_id!r}")
        if env.command != command:
            raise CommandError("wrong_command", f"command {env.command!r} sent on cmd/{command}")
        key = self.keys.get(env.key_id)
        if key is None:
            raise CommandError("unknown_key", f"key_id {env.key_id!r} is not configured")
        try:
            sig = base64.b64decode(env.signature, validate=True)
            key.verify(sig, signing_bytes(raw))
        except (InvalidSignature, binascii.Error, ValueError):
            raise CommandError("bad_signature", "signature does not verify") from None
        now = self.clock()
        age = now - parse_rfc3339(env.issued_at).timestamp()
        if abs(age) > self.max_age_s:
            raise CommandError("stale", f"issued_at is {age:+.0f} s from the gateway clock "
                                        f"(allowed +/-{self.max_age_s:.0f} s)")
        self._remember(env.request_id, now)
        model = COMMAND_ARGS.get(env.command)
        if model is None:
            return env, env.args
        try:
            return env, model.model_validate(env.args)
        except ValidationError as e:
            raise CommandError("invalid_args", _first_error(e)) from None

    def _remember(self, request_id: str, now: float) -> None:
        # ids seen while the state disk failed: kept in memory for the freshness window
        mem = self.__dict__.setdefault("_seen_in_memory", {})
        for rid in [r for r, t in mem.items() if t < now - 2 * self.max_age_s]:
            del mem[rid]
        if request_id in mem:
            raise CommandError("replayed", f"request_id {request_id!r} was already seen")
        c = self.store.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("DELETE FROM replay_cache WHERE seen_at < ?", (now - 2 * self.max_age_s,))
            c.execute("INSERT INTO replay_cache(request_id, seen_at) VALUES (?, ?)",
                      (request_id, now))
            c.execute("COMMIT")
        except sqlite3.IntegrityError:
            c.execute("ROLLBACK")
            raise CommandError("replayed", f"request_id {request_id!r} was already seen") from None
        except sqlite3.Error as e:  # disk full / read-only: the command still runs
            if c.in_transaction:
                c.execute("ROLLBACK")
            mem[request_id] = now
            log.error("replay cache not stored; remembering the request in memory", error=str(e))
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ rejection
    def _reject(self, req: dict, err: CommandError) -> dict:
        self._count(err.code)
        log.warning("command_rejected", code=err.code, command=req["command"],
                    request_id=req["request_id"], message=err.message)
        body = {"request_id": req["request_id"], "command": req["command"][:128],
                "reason": err.code, "message": err.message[:500]}
        if req.get("key_id"):
            body["key_id"] = str(req["key_id"])[:128]
        try:
            self.outbox.append("command.rejected", body)
        except Exception:
            log.exception("command_rejected_event_failed")
        if err.code in SECURITY_CODES:
            self._security(body)
        return {"request_id": req["request_id"], "status": "error",
                "error": {"code": err.code, "message": err.message}}

    def _security(self, body: dict) -> None:
        now = self.clock()
        hits = self._security_hits
        hits.append(now)
        while hits and hits[0] < now - self.security_window_s:
            hits.popleft()
        if len(hits) >= self.security_threshold and self.on_security is not None:
            detail = {"count": len(hits), "window_s": self.security_window_s, "last": body}
            hits.clear()  # one alarm per burst, not one per forged message
            try:
                self.on_security(detail)
            except Exception:
                log.exception("on_security_failed")

    def _count(self, code: str) -> None:
        self.counters[code] = self.counters.get(code, 0) + 1


def _first_error(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first['msg']}{more}"

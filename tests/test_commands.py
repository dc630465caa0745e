"""Command gate: every rejection has its code, response and event; valid ones reach handlers."""
from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.central import sign_command
from controller.commands import CommandError, CommandGate
from controller.contract import canonical_json, render_api_doc
from controller.outbox import Outbox
from controller.store import Store

SITE = "binhlu"
T0 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


class Env:
    def __init__(self, path: Path, pub_b64: str, **kw):
        self.store = Store(path)
        self.outbox = Outbox(self.store)
        self.security: list[dict] = []
        self.now = T0.timestamp()
        self.gate = CommandGate(SITE, [{"key_id": "k1", "public_key": pub_b64}], self.store,
                                self.outbox, clock=lambda: self.now,
                                on_security=self.security.append, **kw)

    def send(self, cmd: str, payload: dict | bytes) -> dict:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return asyncio.run(self.gate.handle(f"loaxa/v1/{SITE}/cmd/{cmd}", raw))

    def rejections(self) -> list[dict]:
        return [e for e in self.outbox.pending(1000) if e["type"] == "command.rejected"]


@pytest.fixture
def env(state_dir, ed25519_keypair):
    return Env(state_dir / "state.db", ed25519_keypair[1])


def signed(priv, command="status.get", args=None, **kw):
    kw.setdefault("issued_at", T0)
    return sign_command(priv, kw.pop("site_id", SITE), command, args or {}, kw.pop("key_id", "k1"),
                        **kw)


def test_valid_command_reaches_its_handler_with_parsed_args(env, ed25519_keypair):
    priv, _ = ed25519_keypair
    seen = []

    async def start(args, ctx):
        seen.append((args, ctx))
        return {"broadcast_id": "b1"}

    env.gate.register("broadcast.start", start)
    cmd = signed(priv, "broadcast.start", {"priority": "emergency", "targets": "all",
                                           "source": {"tts": {"text": "Bão đang đến"}}})
    resp = env.send("broadcast.start", cmd)
    assert resp == {"request_id": cmd["request_id"], "status": "ok",
                    "data": {"broadcast_id": "b1"}}
    args, ctx = seen[0]
    assert args.priority == "emergency" and args.source.tts.text == "Bão đang đến"
    assert ctx.key_id == "k1" and ctx.request_id == cmd["request_id"]
    assert env.rejections() == []


def test_signature_covers_canonical_utf8_json(ed25519_keypair):
    priv, pub = ed25519_keypair
    cmd = signed(priv, "broadcast.start", {"source": {"tts": {"text": "Bão"}}, "b": 1})
    body = {k: v for k, v in cmd.items() if k != "signature"}
    raw = canonical_json(body)
    assert "Bão".encode() in raw and b" " not in raw.replace("Bão".encode(), b"")
    assert raw.index(b'"args"') < raw.index(b'"command"') < raw.index(b'"issued_at"')
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    Ed25519PublicKey.from_public_bytes(base64.b64decode(pub)).verify(
        base64.b64decode(cmd["signature"]), raw)


def _tampered(priv):
    cmd = signed(priv, "status.get")
    cmd["args"] = {"x": 1}
    return cmd


CASES = {
    "too_large": lambda p: b"{" + b" " * 70000 + b"}",
    "invalid_json": lambda p: b"{not json",
    "unsigned": lambda p: {k: v for k, v in signed(p).items() if k != "signature"},
    "invalid_envelope": lambda p: {**signed(p), "issued_at": "yesterday"},
    "wrong_site": lambda p: signed(p, site_id="othersite"),
    "wrong_command": lambda p: signed(p, "rebirth"),
    "unknown_key": lambda p: signed(p, key_id="k9"),
    "bad_signature": lambda p: signed(Ed25519PrivateKey.generate()),
    "stale": lambda p: signed(p, issued_at=T0 - timedelta(seconds=301)),
}


@pytest.mark.parametrize("code", [*CASES, "tampered"])
def test_each_rejection_answers_its_code_and_leaves_an_event(env, ed25519_keypair, code):
    priv, _ = ed25519_keypair
    env.gate.register_builtin(status_provider=lambda: {"ok": True})
    payload = _tampered(priv) if code == "tampered" else CASES[code](priv)
    resp = env.send("status.get", payload)
    want = "bad_signature" if code == "tampered" else code
    assert resp["status"] == "error" and resp["error"]["code"] == want, resp
    assert resp["error"]["message"]
    rid = payload.get("request_id") if isinstance(payload, dict) else None
    assert resp["request_id"] == rid
    [ev] = env.rejections()
    assert ev["reason"] == want and ev["command"] == "status.get" and ev["request_id"] == rid


def test_future_dated_command_is_stale_too(env, ed25519_keypair):
    resp = env.send("status.get", signed(ed25519_keypair[0], issued_at=T0 + timedelta(minutes=6)))
    assert resp["error"]["code"] == "stale"


def test_replay_is_rejected_also_after_a_restart(state_dir, ed25519_keypair):
    priv, pub = ed25519_keypair
    env = Env(state_dir / "state.db", pub)
    env.gate.register_builtin(status_provider=lambda: {})
    cmd = signed(priv)
    assert env.send("status.get", cmd)["status"] == "ok"
    assert env.send("status.get", cmd)["error"]["code"] == "replayed"
    env2 = Env(state_dir / "state.db", pub)  # the daemon restarted
    env2.gate.register_builtin(status_provider=lambda: {})
    assert env2.send("status.get", cmd)["error"]["code"] == "replayed"
    # forged copies never enter the cache, so they cannot block the genuine id later
    forged = signed(Ed25519PrivateKey.generate(), request_id="fresh-id")
    assert env2.send("status.get", forged)["error"]["code"] == "bad_signature"
    assert env2.send("status.get", signed(priv, request_id="fresh-id"))["status"] == "ok"


def test_replay_cache_is_pruned_beyond_twice_max_age(env, ed25519_keypair):
    priv, _ = ed25519_keypair
    env.gate.register_builtin(status_provider=lambda: {})
    env.send("status.get", signed(priv, request_id="old"))
    env.now += 601
    env.send("status.get", signed(priv, issued_at=T0 + timedelta(seconds=601)))
    ids = [r[0] for r in env.store.conn.execute("SELECT request_id FROM replay_cache")]
    assert "old" not in ids and len(ids) == 1


def test_invalid_args_unsupported_and_failing_handlers(env, ed25519_keypair):
    priv, _ = ed25519_keypair
    r = env.send("broadcast.start", signed(priv, "broadcast.start",
                                           {"priority": "urgent", "targets": "all",
                                            "source": {"tts": {"text": "x"}}}))
    assert r["error"]["code"] == "invalid_args" and "priority" in r["error"]["message"]
    ok_args = {"priority": "normal", "targets": ["fm01"], "source": {"stream": {"url": "http://x"}}}
    r = env.send("broadcast.start", signed(priv, "broadcast.start", ok_args))
    assert r["error"]["code"] == "not_supported"

    async def boom(args, ctx):
        raise RuntimeError("disk on fire")

    async def missing(args, ctx):
        raise CommandError("not_found", "no such alarm")

    env.gate.register("broadcast.start", boom)
    env.gate.register("alarm.ack", missing)
    r = env.send("broadcast.start", signed(priv, "broadcast.start", ok_args))
    assert r["error"]["code"] == "internal" and "disk on fire" in r["error"]["message"]
    r = env.send("alarm.ack", signed(priv, "alarm.ack", {"alarm_id": "a1", "by": "op"}))
    assert r["error"] == {"code": "not_found", "message": "no such alarm"}
    assert [e["reason"] for e in env.rejections()] == [
        "invalid_args", "not_supported", "internal", "not_found"]


def test_repeated_forgeries_raise_one_security_alarm_per_burst(env, ed25519_keypair):
    priv, _ = ed25519_keypair
    env.gate.register_builtin(status_provider=lambda: {})
    env.send("status.get", signed(Ed25519PrivateKey.generate()))
    env.send("status.get", signed(priv, key_id="nope"))
    assert env.security == []
    env.send("status.get", b"not json")  # a broken payload is not a security event
    assert env.security == []
    cmd = signed(priv)
    env.send("status.get", cmd)
    env.send("status.get", cmd)  # replay: third security-relevant rejection in 10 min
    assert len(env.security) == 1 and env.security[0]["count"] == 3
    assert env.security[0]["last"]["reason"] == "replayed"


def test_log_query_returns_bounded_events(env, ed25519_keypair):
    priv, _ = ed25519_keypair
    env.gate.register_builtin(rebirth=lambda: {"session": 3})
    for i in range(5):
        env.outbox.append("alarm.test", {"n": i})
    env.outbox.ack([1, 2, 3])
    r = env.send("log.query", signed(priv, "log.query", {
        "from": "2000-01-01T07:00:00+07:00", "to": "2999-01-01T00:00:00Z", "type": "alarm.test",
        "limit": 4}))
    assert r["status"] == "ok"
    assert [e["seq"] for e in r["data"]["events"]] == [1, 2, 3, 4]
    assert r["data"]["truncated"] is True
    assert env.send("rebirth", signed(priv, "rebirth"))["data"] == {"session": 3}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                      max_size=6),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"request_id": st.text(max_size=200), "site_id": st.just(SITE),
                           "command": st.sampled_from(["status.get", "log.query"]),
                           "issued_at": st.text(max_size=30), "args": st.dictionaries(
                               st.text(max_size=8), st.integers(), max_size=3),
                           "key_id": st.sampled_from(["k1", "", "x"]),
                           "signature": st.text(max_size=100)}).map(
                               lambda d: json.dumps(d).encode()),
))
def test_fuzzed_payloads_never_crash(env, payload):
    resp = env.send("status.get", payload)
    assert resp["status"] == "error" and resp["error"]["code"]


def test_committed_api_doc_is_current():
    doc = Path(__file__).resolve().parent.parent / "docs" / "mqtt-api.md"
    assert doc.read_text() == render_api_doc(), "regenerate: python -m controller.contract > docs/mqtt-api.md"

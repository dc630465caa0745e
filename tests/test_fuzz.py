"""Fuzzing every parser that reads what a person, a device or the network sends us.

Each input is a mutation of a real one (the shipped site files and firmware profiles, a
validly signed command, well-formed telemetry and UECP frames), so the fuzzer gets past
the first check and into the interesting paths. The properties are the product's rules:
bad input gets a clear error (YamlError with FILE:LINE, an error response, a `malformed`
observation), never another exception, never a hang (a SIGALRM bound per example), and
memory stays bounded over long hostile streams (tracemalloc peak).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import random
import signal
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.central import sign_command
from controller.commands import CommandGate
from controller.config import SiteConfig, load_site
from controller.contract import signing_bytes
from controller.outbox import Outbox
from controller.store import Store
from controller.yamlsrc import YamlError
from device_drivers import uecp
from device_drivers.dtmf import DtmfDecoder, synthesize
from device_drivers.ip_cluster import IpClusterDriver
from device_drivers.ip_profile import NORMALISED_FIELDS, render, set_path
from device_drivers.profiles import PROFILE_DIR, Profile, load_profile

ROOT = Path(__file__).resolve().parent.parent


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hang(BaseException):
    """BaseException so that no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def time_bound(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ YAML mutations
YAML_ALPHABET = st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\n\t  \\") + list("aZ09_.~") +
                                ["ư", "\x00", "\ufeff", "<<", "0x", "1e9", "null", "yes",
                                 "!!binary ", "*a", "&a ", "2026-13-45", "9" * 5000])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.dates(), st.just("../../etc/passwd"), st.just("x" * 5000))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=8), c, max_size=3), max_leaves=8)

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
                       | st.text(max_size=12), lambda c: st.lists(c, max_size=3)
                       | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _scalars(obj):
    return [v for p in _paths(obj) if not isinstance(v := _get(obj, p), dict | list)]


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated_yaml(draw, text: str) -> str:
    """Either a few text edits (syntax-level) or a few edits of the parsed tree (schema-level)."""
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(text)))
            op = draw(st.sampled_from(["insert", "delete", "dup_line", "indent"]))
            if op == "insert":
                text = text[:pos] + "".join(draw(st.lists(YAML_ALPHABET, min_size=1, max_size=4))) + text[pos:]
            elif op == "delete":
                text = text[:pos] + text[pos + draw(st.integers(1, 40)):]
            else:
                lines = text.splitlines(keepends=True) or [""]
                i = draw(st.integers(0, len(lines) - 1))
                lines.insert(i, lines[i] if op == "dup_line" else " " * draw(st.integers(1, 3)) + lines[i])
                if op == "indent":
                    del lines[i + 1]
                text = "".join(lines)
        return text
    data = yaml.safe_load(text)
    pool = _scalars(data)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = _get(data, path[:-1])
        op = draw(st.sampled_from(["replace", "replace_from_doc", "delete", "unknown_key", "dup_item"]))
        if op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif op == "replace_from_doc":  # an id where another id belongs: cross-reference checks
            parent[path[-1]] = draw(st.sampled_from(pool))
        elif op == "delete":
            del parent[path[-1]]
        elif op == "unknown_key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
        elif op == "dup_item" and isinstance(parent, list):
            parent.append(parent[path[-1]])
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _assert_clear_error(err: YamlError, path: Path) -> None:
    assert err.errors, "a YamlError must say what is wrong"
    for line in err.errors:
        assert isinstance(line, str) and line.startswith(str(path)), line


@pytest.mark.parametrize("base", ["minimal.yaml", "binhlu.yaml"])
@fuzz(60)
@given(data=st.data())
def test_mutated_site_files_load_or_say_where(tmp_path, base, data):
    text = (ROOT / "config" / base).read_text(encoding="utf-8")
    path = tmp_path / "site.yaml"
    path.write_text(data.draw(mutated_yaml(text)), encoding="utf-8", errors="surrogatepass")
    with time_bound(5):
        try:
            cfg = load_site(path)
        except YamlError as e:
            _assert_clear_error(e, path)
        else:
            assert isinstance(cfg, SiteConfig) and cfg.source_hash


ALIAS_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)])


@pytest.mark.parametrize("text, says", [
    (ALIAS_BOMB + "\nsite: {id: *a8, name: x}\n", "site.id"),            # 10^8 leaves by alias
    ("site: &s {id: x, name: *s}\n", "site"),                            # recursive anchor
    ("site: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),    # PyYAML recursion
    ("site: {id: x, lat: " + "9" * 5000 + "}\n", ":1: cannot read this value"),
    ("site: {id: x}\nclusters:\n - subscription: {expires_on: 2026-13-01}\n",
     ":3: cannot read this value: month must be in 1..12 (got '2026-13-01')"),
    ("site: {id: x, lat: 0x" + "f" * 5000 + "}\n", "an integer of 20000 bits"),
    ("\ufeff\x00\x01", "YAML syntax"),
    ("site: !!python/object/apply:os.system [echo pwned]\n", "YAML syntax"),
])
def test_hostile_yaml_gives_a_clear_error_quickly(tmp_path, text, says):
    """Found by the fuzzer: these hung or raised ValueError/RecursionError before the fix."""
    path = tmp_path / "site.yaml"
    path.write_text(text, encoding="utf-8")
    with time_bound(5), pytest.raises(YamlError) as e:
        load_site(path)
    _assert_clear_error(e.value, path)
    assert says in "\n".join(e.value.errors)


SHIPPED_PROFILES = sorted(p.name for p in PROFILE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_PROFILES)
@fuzz(25)
@given(data=st.data())
def test_mutated_profiles_load_or_say_where(tmp_path, name, data):
    text = (PROFILE_DIR / name).read_text(encoding="utf-8")
    path = tmp_path / name
    path.write_text(data.draw(mutated_yaml(text)), encoding="utf-8", errors="surrogatepass")
    with time_bound(5):
        try:
            prof = load_profile(path)
        except YamlError as e:
            _assert_clear_error(e, path)
        else:
            assert isinstance(prof, Profile)


def test_profile_struct_that_would_allocate_gigabytes_is_refused(tmp_path):
    """Found by review of the loader: `bytes(calcsize(struct))` on a typo like 999999999s."""
    path = tmp_path / "big.yaml"
    path.write_text(
        "kind: transmitter\nidentity: {vendor: v, model: m}\ntransport: {framing: line}\n"
        "points:\n  p: {query: Q, parse: {struct: '<99999999999s'}}\n")
    with time_bound(5), pytest.raises(YamlError) as e:
        load_profile(path)
    assert "at most 65536" in str(e.value)


# ------------------------------------------------------------------ signed commands
SITE = "binhlu"
NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


class Gate:
    def __init__(self, state_dir: Path):
        self.priv = Ed25519PrivateKey.generate()
        pub = base64.b64encode(self.priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
        self.store = Store(state_dir / "state.db")
        self.outbox = Outbox(self.store)
        self.gate = CommandGate(SITE, [{"key_id": "k1", "public_key": pub}], self.store, self.outbox,
                                clock=lambda: NOW.timestamp())
        self.gate.register_builtin(rebirth=lambda: {"session": 1}, status_provider=lambda: {"ok": 1})
        self.ran: list[str] = []
        for cmd in ("broadcast.start", "broadcast.stop", "schedule.put", "schedule.delete",
                    "schedule.list", "cluster.set", "alarm.ack"):
            self.gate.register(cmd, self._record)
        self.n = 0

    async def _record(self, args, ctx):
        self.ran.append(ctx.request_id)
        return {"got": ctx.command}

    def envelope(self, command: str, args: dict) -> dict:
        self.n += 1
        return sign_command(self.priv, SITE, command, args, "k1", request_id=f"r{self.n:08d}",
                            issued_at=NOW)

    def send(self, command: str, payload: bytes) -> dict:
        return asyncio.run(self.gate.handle(f"loaxa/v1/{SITE}/cmd/{command}", payload))

    def rejected(self) -> int:
        return sum(1 for e in self.outbox.pending(100000) if e["type"] == "command.rejected")


VALID_ARGS = {
    "status.get": {}, "rebirth": {},
    "broadcast.start": {"priority": "emergency", "source": {"tts": {"text": "Bão"}}, "targets": "all"},
    "broadcast.stop": {"broadcast_id": "all"},
    "cluster.set": {"cluster_id": "ip01", "volume": 50},
    "alarm.ack": {"alarm_id": "a1", "by": "tổng đài"},
    "log.query": {"from": "2026-06-01T00:00:00Z", "to": "2026-06-02T00:00:00Z"},
}


@pytest.fixture
def gate(state_dir):
    return Gate(state_dir)


@st.composite
def mutated_envelope(draw, gate: Gate):
    command = draw(st.sampled_from(sorted(VALID_ARGS)))
    env = gate.envelope(command, json.loads(json.dumps(VALID_ARGS[command])))
    original = dict(env)
    kind = draw(st.sampled_from(["field", "drop", "extra", "args", "signature", "bytes", "dupkey"]))
    if kind == "field":
        env[draw(st.sampled_from(sorted(env)))] = draw(JSONISH)
    elif kind == "drop":
        del env[draw(st.sampled_from(sorted(env)))]
    elif kind == "extra":
        env[draw(st.text(min_size=1, max_size=10))] = draw(st.integers() | st.text(max_size=10))
    elif kind == "args":
        args = env["args"]
        key = draw(st.sampled_from(sorted(args) + ["x"]))
        args[key] = draw(JSONISH)
    elif kind == "signature":
        sig = bytearray(base64.b64decode(env["signature"]))
        sig[draw(st.integers(0, 63))] ^= 1 << draw(st.integers(0, 7))
        env["signature"] = base64.b64encode(bytes(sig)).decode()
    raw = json.dumps(env, ensure_ascii=draw(st.booleans())).encode()
    if kind == "bytes":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        raw = bytes(b)
    if kind == "dupkey":  # JSON with a second "args" after the signed one
        raw = raw[:-1] + b',"args":' + json.dumps(draw(JSONISH)).encode() + b"}"
    resign = draw(st.booleans()) and kind in ("args", "field", "extra")
    if resign:  # a genuine central sending odd arguments: schema checks, never a handler crash
        env = {k: v for k, v in env.items() if k != "signature"}
        env["signature"] = base64.b64encode(gate.priv.sign(signing_bytes(env))).decode()
        raw = json.dumps(env).encode()
    return command, original, raw, resign


@fuzz(250)
@given(data=st.data())
def test_mutated_signed_commands_are_rejected_unless_unchanged(gate, data):
    command, original, raw, resigned = data.draw(mutated_envelope(gate))
    before = gate.rejected()
    with time_bound(5):
        resp = gate.send(command, raw)
    assert resp["status"] in ("ok", "error")
    if resp["status"] == "error":
        assert gate.rejected() == before + 1  # a durable command.rejected event, every time
        assert resp["error"]["code"] != "internal", resp
        return
    # accepted: what ran is exactly what was signed by the key holder
    parsed = json.loads(raw)
    if not resigned:
        assert signing_bytes(parsed) == signing_bytes(original)
    assert parsed["request_id"] in gate.ran or command in ("status.get", "rebirth", "log.query")


def test_replayed_and_reordered_envelopes(gate):
    """Key order and whitespace are not part of what is signed; a replay is still a replay."""
    env = gate.envelope("cluster.set", VALID_ARGS["cluster.set"])
    shuffled = dict(reversed(list(env.items())))
    assert gate.send("cluster.set", json.dumps(shuffled, indent=2).encode())["status"] == "ok"
    again = gate.send("cluster.set", json.dumps(env).encode())
    assert again["error"]["code"] == "replayed"


# ------------------------------------------------------------------ IP telemetry
IP_PROFILES = ["ip-json-v1", "ip-tasmota-like"]


@st.composite
def ip_message(draw, drv: IpClusterDriver):
    topic = draw(st.sampled_from(drv.subscriptions() + ["unrelated/topic"]))
    form = draw(st.sampled_from(["bytes", "json", "shaped"]))
    if form == "bytes":
        return topic, draw(st.binary(max_size=200))
    if form == "json":
        return topic, json.dumps(draw(JSONISH)).encode()
    if topic in drv.tele_topics:  # the firmware's own field paths with odd values
        obj: dict = {}
        for fm in drv.tele_topics[topic].fields.values():
            if draw(st.booleans()):
                set_path(obj, fm.path, draw(JSONISH | st.sampled_from(
                    [*(fm.enum or {}), "NaN", "2026-02-30", 1e308])))
        text = json.dumps(obj)
        for tok in ("NaN", "Infinity", "-Infinity", "1e999"):  # JSON Python accepts
            if draw(st.booleans()):
                text = text.replace("1e+308", tok, 1)
        return topic, text.encode()
    if topic == drv.ack_topic:
        cmd = drv.spec.commands[draw(st.sampled_from(sorted(drv.spec.commands)))]
        tpl = draw(st.sampled_from(list(cmd.replies.values()) or [cmd.payload]))
        values = {k: draw(JSONISH | st.sampled_from([1e999, -1, 101, "x"]))
                  for k in ("url", "volume", "id", "error")}
        return topic, render(tpl, values).replace(b"Infinity", b"1e999")
    lv = drv.spec.liveness
    return topic, draw(st.sampled_from([lv.online, lv.offline, lv.online + " ", ""])).encode()


def _check_observations(drv: IpClusterDriver, obs) -> None:
    for o in obs:
        assert o.kind in ("liveness", "telemetry", "ack", "malformed")
        assert not (o.reason or "").startswith("internal error"), o.reason
        for k, v in o.telemetry.items():
            assert k in NORMALISED_FIELDS
            if isinstance(v, float):
                assert math.isfinite(v), (k, v)  # would become invalid JSON towards central
    assert set(drv.state) <= set(NORMALISED_FIELDS) | {"online"}
    vol = drv.state.get("volume")
    assert vol is None or (isinstance(vol, int) and 0 <= vol <= 100)


@pytest.mark.parametrize("profile", IP_PROFILES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_ip_cluster_messages_never_crash_the_driver(profile, data):
    drv = IpClusterDriver("ip01", "dev-01", load_profile(profile))
    for _ in range(data.draw(st.integers(1, 5))):
        topic, payload = data.draw(ip_message(drv))
        with time_bound(2):
            _check_observations(drv, drv.handle(topic, payload))


@pytest.mark.parametrize("profile", IP_PROFILES)
def test_ip_cluster_memory_bounded_over_a_long_hostile_stream(profile):
    drv = IpClusterDriver("ip01", "dev-01", load_profile(profile))
    rng = random.Random(7)
    topics = drv.subscriptions()
    tele = list(drv.tele_topics)

    def message(i):
        t = rng.choice(topics)
        if i % 3 == 0 and tele:
            obj = {}
            for fm in drv.tele_topics[(t := rng.choice(tele))].fields.values():
                set_path(obj, fm.path, rng.choice([1, -5, 1e9, "x" * rng.randint(0, 3000), True, None]))
            return t, json.dumps(obj).encode()
        if i % 3 == 1:
            return t, json.dumps({"cmd": "play", "id": f"b{i}", "ok": True, "url": f"http://x/{i}"}).encode()
        return t, rng.randbytes(rng.randint(0, 2000))

    for i in range(300):  # warm-up: first-time allocations and logger setup
        drv.handle(*message(i))
        drv.play(f"http://m/{i}", 50, f"b{i}")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(6000):
        drv.handle(*message(i))
        if i % 10 == 0:
            drv.play(f"http://m/{i}", 50, f"b{i}")
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes retained over 6000 messages"
    assert len(drv._url_to_id) <= drv._URL_MEMORY


# ------------------------------------------------------------------ UECP and DTMF streams
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_uecp_strict_decoders_raise_only_uecp_errors(data):
    for fn in (uecp.decode_frame, uecp.decode_elements):
        try:
            fn(data)
        except uecp.UecpError:
            pass
    # the same bytes, correctly framed: the element parser is reached with any content
    with contextlib.suppress(uecp.UecpError):
        uecp.decode_frame(uecp.encode_frame(data[:255]))


class CountingLog:
    """Stands in for the module's structlog logger: counts lines instead of storing them."""

    def __init__(self):
        self.lines = 0

    def warning(self, *a, **kw):
        self.lines += 1

    info = debug = error = exception = warning


def test_uecp_long_hostile_stream_bounded_memory_and_logged_once_per_burst(monkeypatch):
    """4 MB of noise with a frame after each burst: frames come through, memory stays
    bounded, and the log gets one line per burst of garbage (not one per stray FE byte)."""
    logs = CountingLog()
    monkeypatch.setattr(uecp, "log", logs)
    rng = random.Random(3)
    good = uecp.encode_frame([uecp.Tdc(5, b"\x01\x02\xfe\xff")], sqc=1)
    d = uecp.UecpDecoder()
    d.feed(rng.randbytes(20000) + good)
    logs.lines = 0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    frames = 0
    for _ in range(800):
        frames += len(d.feed(rng.randbytes(rng.randint(0, 5000)) + good))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert frames >= 760  # a frame right after garbage is found (unless it ends mid-frame)
    assert peak < 200_000, f"{peak} bytes"
    assert len(d._buf) <= uecp.MAX_WIRE_FRAME
    assert d.stats["garbage_bytes"] > 400_000
    dropped = sum(v for k, v in d.stats.items() if k not in ("frames", "garbage_bytes"))
    assert dropped > 5 * 800  # noise holds many FE bytes, each a frame start that fails
    assert 400 < logs.lines <= 801, f"{logs.lines} log lines for 800 bursts"


def test_dtmf_long_noise_stream_bounded_memory_and_still_decodes():
    rate = 8000
    d = DtmfDecoder(rate)
    rng = np.random.default_rng(5)
    d.feed(rng.normal(0, 0.1, rate))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(300):  # 5 minutes of hiss, odd chunk sizes
        d.feed(rng.normal(0, 0.1, int(rng.integers(1, 4000))).astype(np.float32))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < 2_000_000, f"{peak} bytes"
    assert len(d._buf) < d.win
    for junk in (np.full(800, np.nan), np.full(800, np.inf), np.full(800, 1e38),
                 np.zeros((4, 2)), np.array([], dtype=np.int16)):
        assert d.feed(junk) == []
    d.feed(np.zeros(rate))
    assert d.feed(np.concatenate([synthesize("1#", rate), np.zeros(rate // 4)])) == ["1", "#"]

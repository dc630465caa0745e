"""Security: secrets never leak, the media server gives nothing away, the broker ACL isolates
sites, and the systemd unit's sandbox stays tight.

Real parts throughout: a mosquitto with TLS, passwords and the shipped ACL example, the
real `loaxa run` daemon, aiohttp over loopback, and systemd-analyze on the shipped unit.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import paho.mqtt.client as mqtt
import pytest
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from support.broker import Mosquitto, free_port
from support.site import site_file

from controller.central import CentralClient, SigningKey, public_key_b64
from controller.media_server import MediaServer

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "loaxa.service"
ACL = ROOT / "config" / "mosquitto-acl.example"
BODY = b"ID3" + bytes(range(256)) * 40


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---------------------------------------------------------------- media server
@pytest.fixture
def media_file(tmp_path):
    p = tmp_path / "prog.mp3"
    p.write_bytes(BODY)
    return p


def test_media_server_traversal_encodings_methods_and_oversized_requests(media_file, tmp_path):
    """Encoded, double-encoded and overlong traversal, other methods, huge URLs and
    headers: never a byte of any file, the same bare answer, and the server keeps serving."""
    (tmp_path / "secret.txt").write_text("TOP-SECRET")

    async def scenario():
        srv = MediaServer("127.0.0.1", 0)
        await srv.start()
        try:
            url = srv.register(media_file, ttl_s=60)
            token = url.rsplit("/", 1)[1]
            base = srv.base_url
            probes = [
                "/m/%2e%2e/%2e%2e/etc/passwd", "/m/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
                "/%2e%2e/%2e%2e/etc/passwd", "/m/..%252fsecret.txt", "/m/%c0%ae%c0%ae/secret.txt",
                "/m/..\\..\\secret.txt", f"/m/{token}%2f..%2fsecret.txt", f"/m/{token}/",
                f"/m/{token}%00", f"/m/{token}?../../secret.txt" + "", "/m/" + token.upper(),
                f"/m//{token}", f"//m/{token}/../../{tmp_path.name}/secret.txt",
                f"/m/{tmp_path}/secret.txt".replace("//", "/"),
            ]
            bodies = set()
            async with aiohttp.ClientSession() as s:
                for path in probes:
                    async with s.get(yarl.URL(base + path, encoded=True)) as r:
                        body = await r.read()
                        if path == f"/m/{token}?../../secret.txt":  # a query string is not a path
                            assert r.status == 200 and body == BODY
                            continue
                        assert r.status == 404, path
                        bodies.add(body)
                for method in ("POST", "PUT", "DELETE", "PATCH"):
                    async with s.request(method, url, data=b"x" * 4096) as r:
                        assert r.status in (405, 413), method
                        assert BODY[:64] not in await r.read()
                async with s.get(yarl.URL(base + "/m/" + "A" * 20000, encoded=True)) as r:
                    assert r.status in (400, 404, 414)
                async with s.get(url, headers={"X-Filler": "y" * 20000}) as r:
                    assert r.status in (400, 431)
                async with s.get(url) as r:  # still serving, and the file is intact
                    assert r.status == 200 and await r.read() == BODY
            assert len(bodies) == 1 and b"SECRET" not in bodies.pop()
            assert media_file.read_bytes() == BODY
        finally:
            await srv.stop()

    run(scenario())


def test_media_server_listens_only_on_the_configured_address(media_file):
    """Bound to 127.0.0.2 it is not reachable on 127.0.0.1 (nor any other address)."""
    async def scenario():
        srv = MediaServer("127.0.0.2", 0)
        await srv.start()
        try:
            url = srv.register(media_file, ttl_s=60)
            assert url.startswith(f"http://127.0.0.2:{srv.port}/m/")
            assert {a[0] for a in srv._runner.addresses} == {"127.0.0.2"}
            async with aiohttp.ClientSession() as s:
                async with s.get(url) as r:
                    assert r.status == 200
                with pytest.raises(aiohttp.ClientConnectionError):
                    await s.get(url.replace("127.0.0.2", "127.0.0.1"))
        finally:
            await srv.stop()

    run(scenario())


def test_media_server_holds_a_bounded_number_of_tokens(media_file):
    srv = MediaServer(max_entries=3)
    urls = [srv.register(media_file, ttl_s=60) for _ in range(3)]
    with pytest.raises(RuntimeError, match="3 entries"):
        srv.register(media_file, ttl_s=60)
    srv.revoke(urls[0])
    srv.register(media_file, ttl_s=60)  # room again after a revoke


# ---------------------------------------------------------------- TLS material
def _cert(subject: str, key, issuer_key, issuer_name, *, ca=False, san_ip=None):
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san_ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loaxa test CA")])
    ca = _cert("loaxa test CA", ca_key, ca_key, ca_name, ca=True)
    out: dict[str, Path] = {}
    for name, cert, key in [("ca", ca, None)] + [
            (n, _cert(n, k, ca_key, ca_name, san_ip="127.0.0.1" if n == "server" else None), k)
            for n, k in (("server", ec.generate_private_key(ec.SECP256R1())),
                         ("client", ec.generate_private_key(ec.SECP256R1())))]:
        out[f"{name}_cert"] = d / f"{name}.pem"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            out[f"{name}_key"] = d / f"{name}.key"
            out[f"{name}_key"].write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            out[f"{name}_key"].chmod(0o600)
    return out


def passwd_file(path: Path, users: dict[str, str]) -> Path:
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.write_text("")
    for user, pw in users.items():
        subprocess.run([exe, "-b", str(path), user, pw], check=True, capture_output=True)
    return path


def secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- secrets never leak
def tcp_listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if m:
                inodes.add(m.group(1))
    out = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                addr, port = f[1].split(":")
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))  # host-order words
                out.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return out


class Tap:
    """A raw subscriber that keeps every (topic, payload) it sees."""

    def __init__(self, port: int, user: str, pw: str, sub: str):
        self.got: queue.Queue = queue.Queue()
        self.all: list[tuple[str, bytes]] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tap-{secrets.token_hex(3)}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(user, pw)
        c.on_message = lambda cl, ud, m: (self.all.append((m.topic, bytes(m.payload))),
                                          self.got.put((m.topic, bytes(m.payload))))
        c.connect("127.0.0.1", port)
        c.subscribe(sub, qos=1)
        c.loop_start()
        self.c = c

    def wait_for(self, pred, timeout: float) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("expected message never came")
            try:
                t, p = self.got.get(timeout=left)
            except queue.Empty:
                continue
            if pred(t, p):
                return t, p

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_no_secret_in_logs_mqtt_status_or_state(tmp_path, audio_env):
    """The daemon talks TLS + password to central and password to the clusters broker; its
    logs (at debug), every message it publishes, `loaxa status --json`, and its state
    directory hold neither password nor the client key, and media tokens only redacted."""
    pki = make_pki(tmp_path / "pki")
    pw = {"binhlu": "gw-" + secrets.token_urlsafe(18), "binhlu-clusters": "cl-" + secrets.token_urlsafe(18),
          "central": "ce-" + secrets.token_urlsafe(18)}
    port, tls_port = free_port(), free_port()
    conf = (f"per_listener_settings false\nallow_anonymous false\n"
            f"password_file {passwd_file(tmp_path / 'passwd', pw)}\n"
            f"listener {tls_port} 127.0.0.1\ncafile {pki['ca_cert']}\n"
            f"certfile {pki['server_cert']}\nkeyfile {pki['server_key']}\nrequire_certificate true\n")
    broker = Mosquitto(tmp_path / "broker", port=port, extra_conf=conf).start()
    central_key = Ed25519PrivateKey.generate()
    site = site_file(tmp_path, base="binhlu.yaml", broker_url=f"mqtt://127.0.0.1:{port}", overrides={
        "central": {"broker": f"mqtts://127.0.0.1:{tls_port}", "client_id": "loaxa-binhlu",
                    "username": "binhlu", "password_file": str(secret_file(tmp_path / "gw.pw", pw["binhlu"])),
                    "ca_file": str(pki["ca_cert"]), "cert_file": str(pki["client_cert"]),
                    "key_file": str(pki["client_key"]),
                    "keys": [{"key_id": "k1", "public_key": public_key_b64(central_key)}]},
        "clusters_mqtt": {"broker": f"mqtt://127.0.0.1:{port}", "username": "binhlu-clusters",
                          "password_file": str(secret_file(tmp_path / "cl.pw", pw["binhlu-clusters"]))},
        "log_level": "debug", "programmes": [], "media_server": {"bind": "127.0.0.1", "port": 0},
    })
    env, _raw = audio_env
    env = {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    out, err = tmp_path / "daemon.out", tmp_path / "daemon.err"
    tap = Tap(port, "central", pw["central"], "#")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(site)],
                                env=env, cwd=tmp_path, stdout=fo, stderr=fe, start_new_session=True)
    try:
        tap.wait_for(lambda t, p: t == "loaxa/v1/binhlu/status" and b'"online"' in p, 20)
        with CentralClient(f"mqtt://127.0.0.1:{port}", "binhlu", username="central", password=pw["central"],
                           key=SigningKey(central_key, "k1")) as central:
            assert central.send("status.get", timeout=10)["status"] == "ok"
            forged = SigningKey(Ed25519PrivateKey.generate(), "k1")
            assert central.send("status.get", key=forged, timeout=10)["error"]["code"] == "bad_signature"
            r = central.send("broadcast.start", {"priority": "normal", "targets": ["ip01"],
                                                 "source": {"tts": {"text": "Thử loa"}}}, timeout=10)
            assert r["status"] == "ok", r
        # the clusters link (password auth) delivers the play command with the media URL
        _, play = tap.wait_for(lambda t, p: t == "loa/bl-ip01/cmd" and b"/m/" in p, 30)
        url = json.loads(play)["url"]
        token = url.rsplit("/", 1)[1]

        async def fetch():
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return r.status, await r.read()
        status_code, audio = run(fetch())
        assert status_code == 200 and len(audio) > 1000
        st = subprocess.run([sys.executable, "-m", "controller.cli", "status", "--json", "--config",
                             str(site)], env=env, cwd=tmp_path, capture_output=True, timeout=20)
        assert st.returncode == 0, st.stderr
        status_out = st.stdout + st.stderr
        # the only TCP listener is the media server, on the configured address
        assert {a for a, _ in tcp_listening(proc.pid)} == {"127.0.0.1"}
        assert (urlsplit(url).hostname, urlsplit(url).port) in tcp_listening(proc.pid)
        assert json.loads(st.stdout)["central"]["connected"] is True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        tap.close()
        broker.kill()

    logs = out.read_bytes() + err.read_bytes()
    assert b"ip_link.connected" in logs  # the password-protected clusters link came up
    everything = b"".join(t.encode() + b" " + p for t, p in tap.all)
    # to central: loaxa/v1/... and the MQTT 5 response topic (cluster topics carry the URL)
    uplink = b"".join(t.encode() + b" " + p for t, p in tap.all if t.startswith("loaxa"))
    assert b"loaxa-central/" in uplink and b"loaxa/v1/binhlu/health" in uplink
    state = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
    key_pem = pki["client_key"].read_text()
    key_lines = [ln for ln in key_pem.splitlines() if ln and not ln.startswith("-----")]
    key_der_b64 = "".join(key_lines)
    needles = {**{f"password of {u}": p for u, p in pw.items()},
               **{f"client key line {i}": ln[:40] for i, ln in enumerate(key_lines)},
               "client key (base64 DER)": key_der_b64[20:60]}
    for where, blob in (("daemon logs", logs), ("any MQTT message", everything),
                        ("loaxa status --json", status_out), ("state dir", state)):
        for what, needle in needles.items():
            assert needle.encode() not in blob, f"{what} found in {where}"
    for where, blob in (("daemon logs", logs), ("MQTT to central", uplink),
                        ("loaxa status --json", status_out)):
        assert token.encode() not in blob, f"full media token in {where}"
    assert (token[:4] + "…").encode() in logs  # the registration/access was logged, redacted


# ---------------------------------------------------------------- broker ACL
class Client:
    def __init__(self, port: int, user: str, pw: str):
        self.msgs: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{secrets.token_hex(3)}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, pw)
        self.c.on_message = lambda c, u, m: self.msgs.put((m.topic, bytes(m.payload)))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        connected = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: connected.put(rc.value)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert connected.get(timeout=5) == 0, f"{user} could not log in"

    def sub(self, topic: str) -> bool:
        """True when the broker granted the subscription."""
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=5)[0] < 0x80

    def pub(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self, marker: bytes, timeout: float = 5) -> list[tuple[str, bytes]]:
        """Everything up to and including `marker` (which an allowed publish sends last)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            t, p = self.msgs.get(timeout=max(0.01, deadline - time.monotonic()))
            got.append((t, p))
            if p == marker:
                return got

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_acl_example_isolates_sites_devices_and_central(tmp_path):
    users = ["binhlu", "laocai", "central", "binhlu-clusters", "bl-ip01", "bl-ip02", "bl-ip03"]
    pw = {u: secrets.token_urlsafe(12) for u in users}
    conf = (f"allow_anonymous false\npassword_file {passwd_file(tmp_path / 'passwd', pw)}\n"
            f"acl_file {ACL}\n")
    broker = Mosquitto(tmp_path / "broker", extra_conf=conf).start()
    c = {u: Client(broker.port, u, pw[u]) for u in users}
    try:
        central, gw, other = c["central"], c["binhlu"], c["laocai"]
        # central reads every site's root; a gateway publishes only under its own
        assert central.sub("loaxa/v1/#")
        gw.pub("loaxa/v1/laocai/status", b"forged-birth")
        gw.pub("loaxa/v1/laocai/cmd/broadcast.start", b"forged-cmd")
        gw.pub("loaxa/v1/binhlu/events", b"gw-ok")
        assert [p for _, p in central.received(b"gw-ok")] == [b"gw-ok"]
        for t in ("status", "health", "alarms", "clusters/ip01/state", "resp/r1"):
            gw.pub(f"loaxa/v1/binhlu/{t}", t.encode())
            assert central.received(t.encode())[-1] == (f"loaxa/v1/binhlu/{t}", t.encode())
        # a gateway reads only its own commands; central may command every site.  (mosquitto
        # grants any subscription and applies `read` to each message: so test delivery)
        for sub in ("loaxa/v1/binhlu/cmd/+", "loaxa/v1/binhlu/#", "loaxa/v1/laocai/cmd/+"):
            other.sub(sub)
        c["binhlu-clusters"].sub("loaxa/v1/#")
        assert gw.sub("loaxa/v1/binhlu/cmd/+")
        central.pub("loaxa/v1/binhlu/cmd/status.get", b"cmd-binhlu")
        central.pub("loaxa/v1/laocai/cmd/status.get", b"cmd-laocai")
        assert gw.received(b"cmd-binhlu") == [("loaxa/v1/binhlu/cmd/status.get", b"cmd-binhlu")]
        assert other.received(b"cmd-laocai") == [("loaxa/v1/laocai/cmd/status.get", b"cmd-laocai")]
        # the central account cannot fake a gateway's birth or health
        central.pub("loaxa/v1/binhlu/status", b"fake-online")
        gw.pub("loaxa/v1/binhlu/status", b"real")
        seen = [p for _, p in central.received(b"real")]
        assert b"fake-online" not in seen and seen[-1] == b"real"
        # MQTT 5 answers reach the central's response topic
        assert central.sub("loaxa-central/c1/resp")
        gw.pub("loaxa-central/c1/resp", b"answer")
        assert central.received(b"answer")[-1][1] == b"answer"
        # devices: own topics only, per firmware scheme; the site's cluster link sees them
        link = c["binhlu-clusters"]
        assert link.sub("loa/bl-ip01/tele") and link.sub("stat/bl-ip02/RESULT")
        c["bl-ip03"].pub("loa/bl-ip01/tele", b"spoofed-telemetry")
        c["bl-ip01"].pub("loaxa/v1/binhlu/status", b"device-as-gateway")
        c["bl-ip01"].pub("loa/bl-ip01/tele", b"tele-ok")
        assert link.received(b"tele-ok") == [("loa/bl-ip01/tele", b"tele-ok")]
        c["bl-ip02"].pub("stat/bl-ip02/RESULT", b"result-ok")
        assert link.received(b"result-ok") == [("stat/bl-ip02/RESULT", b"result-ok")]
        for dev, subs in (("bl-ip01", ["loa/bl-ip01/cmd", "loa/bl-ip03/cmd", "loa/#"]),
                          ("bl-ip02", ["cmnd/bl-ip02/#", "cmnd/#", "#"])):
            for sub in subs:
                c[dev].sub(sub)
        link.pub("loa/bl-ip03/cmd", b"for-ip03")
        link.pub("cmnd/bl-ip04/PLAY", b"for-ip04")
        link.pub("loa/bl-ip01/cmd", b"play-ip01")
        link.pub("cmnd/bl-ip02/PLAY", b"play-ip02")
        assert [p for _, p in c["bl-ip01"].received(b"play-ip01")] == [b"play-ip01"]
        assert [p for _, p in c["bl-ip02"].received(b"play-ip02")] == [b"play-ip02"]
        gw.pub("loaxa/v1/binhlu/events", b"last")  # central's marker: nothing forged came before
        assert [p for _, p in central.received(b"last")] == [b"last"]
        assert c["bl-ip03"].msgs.empty() and link.msgs.empty() and other.msgs.empty()
    finally:
        for cl in c.values():
            cl.close()
        broker.kill()


# ---------------------------------------------------------------- systemd unit
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


@needs_analyze
def test_unit_sandbox_exposure_is_at_most_2():
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"Overall exposure level for loaxa\.service: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert f"exposure level {m.group(1)}" in doc, "record the current score in docs/operations.md"


@needs_analyze
def test_unit_verifies(tmp_path):
    """`systemd-analyze verify` with ExecStart pointed at a binary that exists here."""
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/opt/loaxa/\.venv/bin/loaxa run ", text, re.M)
    copy = tmp_path / "loaxa.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={shutil.which('true')}", text, flags=re.M))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "loaxa.service" not in r.stderr, r.stderr
    for needed in ("AF_UNIX AF_INET AF_INET6", "char-ttyUSB rw", "char-alsa rw",
                   "MemoryDenyWriteExecute=no", "StateDirectory=loaxa", "RuntimeDirectory=loaxa"):
        assert needed in text, f"the daemon needs {needed}"


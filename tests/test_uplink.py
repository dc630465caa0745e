"""Uplink against a real mosquitto: birth/death, outage replay, hard kills, TLS, credentials."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.broker import Mosquitto

from controller.central import CentralClient, Observation
from controller.outbox import Outbox
from controller.store import Store
from controller.uplink import Uplink, UplinkSettings

ROOT = Path(__file__).resolve().parent.parent
SITE = "binhlu"
# mosquitto started as root drops to user "mosquitto", which cannot read pytest's tmp dir;
# as a non-root user the option has no effect
KEEP_USER = "user root\n"


class Watcher:
    """The central server's view: everything under the site root, in arrival order."""

    def __init__(self, url: str, **kw):
        self.seen: list[Observation] = []
        self.client = CentralClient(url, SITE, **kw).connect()
        self.client.watch(self.seen.append)

    def of(self, kind: str) -> list:
        return [o.payload for o in list(self.seen) if o.kind == kind]

    def close(self) -> None:
        self.client.close()


async def until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def make_uplink(store_path: Path, url: str, **kw) -> tuple[Uplink, Outbox, Store]:
    store = Store(store_path)
    outbox = Outbox(store, flush_interval_s=0.05)
    settings = kw.pop("settings", None) or UplinkSettings(broker=url)
    up = Uplink(SITE, settings, outbox, store, version="test", boot_id="boot-1",
                backoff_initial_s=0.05, backoff_cap_s=0.3, **kw)
    return up, outbox, store


def test_birth_then_offline_on_clean_stop_and_session_grows(broker, state_dir):
    w = Watcher(broker.url)

    async def run_once() -> int:
        up, outbox, _ = make_uplink(state_dir / "s.db", broker.url)
        up.start()
        await until(lambda: any(s["state"] == "online" and s["session"] == up.session
                                for s in w.of("status")), what="birth")
        outbox.append("gateway.stopping", {"reason": "test"})
        await up.stop()
        await until(lambda: w.of("status")[-1]["state"] == "offline", what="offline")
        assert w.of("status")[-1]["session"] == up.session
        # the last event went out before the death certificate
        assert w.of("event")[-1]["type"] == "gateway.stopping"
        return up.session

    s1 = asyncio.run(run_once())
    s2 = asyncio.run(run_once())  # a restart of the daemon: same state.db
    assert s2 > s1 >= 1
    w.close()
    late = Watcher(broker.url)  # a central server arriving later sees the retained death
    asyncio.run(until(lambda: late.of("status"), what="retained status"))
    assert late.of("status")[0] == {**late.of("status")[0], "state": "offline", "session": s2}
    late.close()


def test_outage_backlog_arrives_in_order_gapless_and_historical(broker, state_dir):
    w = Watcher(broker.url)

    async def main():
        up, outbox, _ = make_uplink(state_dir / "s.db", broker.url)
        up.start()
        await until(up.connected.is_set)
        for i in range(3):
            outbox.append("alarm.test", {"i": i})
        await until(lambda: len(w.of("event")) == 3, what="live events")
        session_before = up.session
        for i in range(200):  # a burst, cut off by the outage while it streams
            outbox.append("alarm.test", {"i": i})
        await until(lambda: len(w.of("event")) >= 23, what="part of the burst")
        broker.kill()
        await until(lambda: not up.connected.is_set(), what="disconnect")
        for i in range(300):
            outbox.append("telemetry.rssi" if i % 3 else "alarm.test", {"i": i},
                          droppable=bool(i % 3))
        await asyncio.sleep(0.1)  # let the droppable batch commit (the SD-card timer)
        # Bring the broker and the central server back without yielding to the loop, so
        # the uplink cannot deliver before the central server has subscribed again.
        broker.start()
        w2 = Watcher(broker.url)
        # what the broker acknowledged before it died is in the log; the rest is pending
        first_unacked = outbox.pending(1)[0]["seq"]
        acked = [r[0] for r in outbox.conn.execute("SELECT seq FROM event_log ORDER BY seq")]
        assert acked == list(range(1, first_unacked))
        await until(lambda: w2.of("event") and w2.of("event")[-1]["seq"] == 503, what="backlog")
        await until(lambda: outbox.depth == 0, what="outbox drained")
        assert up.session > session_before
        await up.stop()
        return w2, first_unacked

    w2, first_unacked = asyncio.run(main())
    before, after = w.of("event"), w2.of("event")
    assert [e["seq"] for e in before[:3]] == [1, 2, 3]
    assert not any(e["historical"] for e in before)  # sent while connected at creation
    seqs_after = [e["seq"] for e in after]
    # resent from the oldest unacknowledged, in order, no gap. (Events the broker had
    # acknowledged but not yet forwarded died with it: the central server sees that gap
    # and can fetch them with log.query.)
    assert seqs_after == list(range(first_unacked, 504))
    assert all(e["historical"] for e in after)
    ids = {e["seq"]: e["id"] for e in before}
    assert all(ids.get(e["seq"], e["id"]) == e["id"] for e in after)  # duplicates keep ids
    assert [o.kind for o in w2.seen if o.kind in ("gap", "duplicate", "seq_regression")] == []
    w.close()
    w2.close()


def test_state_topics_publish_on_change_coalesced_and_rebirth(broker, state_dir):
    w = Watcher(broker.url)

    async def main():
        up, _, _ = make_uplink(state_dir / "s.db", broker.url, state_min_interval_s=0.3)
        up.start()
        await until(up.connected.is_set)
        for v in range(20):
            up.publish_state("clusters/fm01/state", {"id": "fm01", "volume": v})
        up.publish_state("clusters/fm01/state", {"id": "fm01", "volume": 19})  # unchanged
        await until(lambda: w.of("cluster") and w.of("cluster")[-1]["volume"] == 19)
        await asyncio.sleep(0.5)  # would expose any extra publish
        n = len(w.of("cluster"))
        assert n <= 2  # the first, then the newest after the interval
        assert up.snapshot()["clusters"] == [{"id": "fm01", "volume": 19}]
        up.rebirth()
        await until(lambda: len(w.of("cluster")) == n + 1, what="rebirth")
        births = [s for s in w.of("status") if s["state"] == "online"]
        assert len(births) == 2 and births[0]["session"] == births[1]["session"]
        await up.stop()

    asyncio.run(main())
    w.close()


CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from controller.outbox import Outbox
    from controller.store import Store
    from controller.uplink import Uplink, UplinkSettings

    db, url, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    async def main():
        store = Store(db)
        outbox = Outbox(store, flush_interval_s=0.05)
        up = Uplink("binhlu", UplinkSettings(broker=url), outbox, store, version="child",
                    boot_id=mode, backoff_initial_s=0.05, backoff_cap_s=0.2)
        up.start()
        await up.connected.wait()
        print("session", up.session, flush=True)
        for i in range(count):
            outbox.append("alarm.test" if i % 4 else "telemetry.rssi", {{"i": i}},
                          droppable=not i % 4)
            await asyncio.sleep(0.002)
        if mode == "finish":
            outbox.flush()
            while outbox.depth:
                await asyncio.sleep(0.01)
            await up.stop()
            print("done", outbox.last_seq, flush=True)
        else:
            await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_sigkill_mid_stream_loses_nothing_and_will_fires(broker, state_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    db = state_dir / "s.db"
    w = Watcher(broker.url)

    def spawn(count: int, mode: str) -> tuple[subprocess.Popen, int]:
        p = subprocess.Popen([sys.executable, str(script), str(db), broker.url, str(count), mode],
                             stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline().split()
        assert line and line[0] == "session", line
        return p, int(line[1])

    async def main():
        p1, s1 = spawn(3000, "hang")
        await until(lambda: len(w.of("event")) >= 200, what="first events")
        os.kill(p1.pid, signal.SIGKILL)
        p1.wait()
        p1.stdout.close()
        await until(lambda: w.of("status")[-1] == {**w.of("status")[-1], "state": "offline"},
                    what="will")
        assert w.of("status")[-1]["session"] == s1  # the will names the dead session
        p2, s2 = spawn(100, "finish")
        assert s2 > s1
        out, _ = p2.communicate(timeout=30)
        last_seq = int(out.split()[-1])
        await until(lambda: w.of("status")[-1]["state"] == "offline"
                    and w.of("status")[-1]["session"] == s2, what="clean offline")
        return last_seq

    last_seq = asyncio.run(main())
    events = w.of("event")
    first_seen: dict[int, str] = {}
    for e in events:
        assert first_seen.setdefault(e["seq"], e["id"]) == e["id"]  # a duplicate keeps its id
    assert sorted(first_seen) == list(range(1, last_seq + 1))  # nothing committed was lost
    assert list(first_seen) == sorted(first_seen)  # first deliveries in seq order
    assert [o for o in w.seen if o.kind in ("gap", "seq_regression")] == []
    store = Store(db)
    assert store.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    w.close()


# ------------------------------------------------------------------ TLS and credentials
def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool, san: bool = False):
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        import ipaddress
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    data = cert.public_bytes(serialization.Encoding.PEM) if cert is not None else \
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    out = {}
    for ca_name in ("ca", "rogue"):
        k = ec.generate_private_key(ec.SECP256R1())
        c = _cert(f"{ca_name} CA", k, None, k, ca=True)
        out[ca_name] = (k, c, _write(d / f"{ca_name}.pem", cert=c))
    ca_key, ca_cert, _ = out["ca"]
    for name, san in (("server", True), ("client", False)):
        k = ec.generate_private_key(ec.SECP256R1())
        c = _cert(name, ca_key, ca_cert.subject, k, ca=False, san=san)
        out[name] = (_write(d / f"{name}.pem", cert=c), _write(d / f"{name}.key", key=k))
    return out


def test_tls_with_client_certificate_and_untrusted_server_refused(pki, tmp_path, state_dir):
    srv_cert, srv_key = pki["server"]
    b = Mosquitto(tmp_path / "tlsbroker", extra_conf=(
        f"cafile {pki['ca'][2]}\ncertfile {srv_cert}\nkeyfile {srv_key}\n"
        "require_certificate true\n" + KEEP_USER)).start()
    url = f"mqtts://127.0.0.1:{b.port}"
    cli_cert, cli_key = pki["client"]
    try:
        w = Watcher(url, ca_file=pki["ca"][2], cert_file=cli_cert, key_file=cli_key)

        async def main():
            good, outbox, _ = make_uplink(state_dir / "a.db", url, settings=UplinkSettings(
                broker=url, ca_file=pki["ca"][2], cert_file=cli_cert, key_file=cli_key))
            good.start()
            outbox.append("alarm.test", {})
            await until(lambda: w.of("event"), what="event over TLS")
            await good.stop()
            bad, _, _ = make_uplink(state_dir / "b.db", url, settings=UplinkSettings(
                broker=url, client_id="rogue-trust", ca_file=pki["rogue"][2],
                cert_file=cli_cert, key_file=cli_key))
            bad.start()
            await until(lambda: bad.last_error is not None, what="TLS failure")
            assert "CERTIFICATE_VERIFY_FAILED" in bad.last_error
            assert not bad.connected.is_set()
            await bad.stop()

        asyncio.run(main())
        assert [s["state"] for s in w.of("status")] == ["online", "offline"]
        w.close()
    finally:
        b.kill()


def test_username_password_file_and_wrong_password(tmp_path, state_dir):
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "gw", "s3cret"], check=True,
                   capture_output=True)
    b = Mosquitto(tmp_path / "authbroker",
                  extra_conf=f"allow_anonymous false\npassword_file {pw}\n" + KEEP_USER).start()
    good_file, bad_file = tmp_path / "good", tmp_path / "bad"
    good_file.write_text("s3cret\n")
    bad_file.write_text("guess\n")
    try:
        async def main():
            up, _, _ = make_uplink(state_dir / "a.db", b.url, settings=UplinkSettings(
                broker=b.url, username="gw", password_file=str(good_file)))
            up.start()
            await until(up.connected.is_set, what="authenticated connect")
            await up.stop()
            bad, _, _ = make_uplink(state_dir / "b.db", b.url, settings=UplinkSettings(
                broker=b.url, username="gw", password_file=str(bad_file)))
            bad.start()
            await until(lambda: bad.last_error is not None, what="refused")
            assert "CONNACK" in bad.last_error and "guess" not in bad.last_error
            await bad.stop()

        asyncio.run(main())
    finally:
        b.kill()

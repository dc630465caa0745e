"""IP clusters: profile-driven driver + link against simulated clusters on a real mosquitto,
fetching real audio files from a real HTTP server."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from aiohttp import web
from pydantic import ValidationError

from device_drivers.ip_cluster import IpClusterDriver, IpClusterLink, Observation
from device_drivers.ip_profile import IpMqttSpec
from device_drivers.sim.ip_cluster_sim import IpClusterSim

PROFILES = Path(__file__).resolve().parent.parent / "firmware_profiles"
FIRMWARES = ["ip-json-v1", "ip-tasmota-like"]
TOKEN = "s3cret"


def spec(name: str) -> IpMqttSpec:
    try:
        from device_drivers.profiles import load_profile
    except ImportError:  # profiles.py not there yet: validate the mqtt section directly
        return IpMqttSpec.model_validate(yaml.safe_load((PROFILES / f"{name}.yaml").read_text())["mqtt"])
    return load_profile(name).mqtt


# ---- pure driver: bytes on the wire ------------------------------------------------------

def test_json_firmware_commands_and_acks_byte_for_byte():
    d = IpClusterDriver("ip01", "dev-a", spec("ip-json-v1"))
    assert d.subscriptions() == ["loa/dev-a/lwt", "loa/dev-a/ack", "loa/dev-a/tele"]
    assert d.play("http://gw/m/a.ogg?token=t", 70, "b1") == [
        ("loa/dev-a/cmd", b'{"cmd":"play","url":"http://gw/m/a.ogg?token=t","volume":70,"id":"b1"}',
         1, False)]
    assert d.stop() == [("loa/dev-a/cmd", b'{"cmd":"stop"}', 1, False)]
    assert d.set_volume(35)[0][1] == b'{"cmd":"volume","volume":35}'
    [ack] = d.handle("loa/dev-a/ack", b'{"cmd":"play","id":"b1","ok":false,"error":"http 404"}')
    assert (ack.kind, ack.command, ack.ok, ack.broadcast_id, ack.error) == (
        "ack", "play", False, "b1", "http 404")
    with pytest.raises(ValueError, match="0-100"):
        d.set_volume(101)


def test_tasmota_firmware_commands_and_acks_byte_for_byte():
    d = IpClusterDriver("ip02", "dev-b", spec("ip-tasmota-like"))
    assert set(d.subscriptions()) == {"tele/dev-b/LWT", "stat/dev-b/RESULT",
                                      "tele/dev-b/STATE", "tele/dev-b/SENSOR"}
    # PLAY carries no volume: the driver sets the volume first
    assert d.play("http://gw/m/a.ogg?token=t", 70, "b7") == [
        ("cmnd/dev-b/VOLUME", b"70", 1, False),
        ("cmnd/dev-b/PLAY", b"http://gw/m/a.ogg?token=t", 1, False)]
    assert d.set_volume(35) == [("cmnd/dev-b/VOLUME", b"35", 1, False)]
    assert d.stop() == [("cmnd/dev-b/STOP", b"", 1, False)]
    # the result names the URL only; the driver maps it back to the broadcast id
    [ack] = d.handle("stat/dev-b/RESULT", b'{"PLAY":"OK","Url":"http://gw/m/a.ogg?token=t"}')
    assert (ack.command, ack.ok, ack.broadcast_id) == ("play", True, "b7")
    [ack] = d.handle("stat/dev-b/RESULT", b'{"VOLUME":35}')
    assert (ack.command, ack.ok) == ("volume", True)
    assert d.handle("stat/dev-b/RESULT", b'{"POWER":"ON"}') == []   # not ours: ignored
    [lv] = d.handle("tele/dev-b/LWT", b"Offline")
    assert (lv.kind, lv.online) == ("liveness", False)


@pytest.mark.parametrize("fw", FIRMWARES)
def test_profile_test_vectors_match_the_declared_templates(fw):
    from device_drivers.ip_profile import match

    raw = yaml.safe_load((PROFILES / f"{fw}.yaml").read_text())
    cmds = spec(fw).commands.values()
    assert raw["kind"] == "ip_cluster" and raw["test_vectors"]
    for v in raw["test_vectors"]:
        req, resp = v["request"].encode(), v["response"].encode()
        assert any(match(c.payload, req) is not None for c in cmds), v["name"]
        assert any(match(t, resp) is not None for c in cmds for t in c.replies.values()), v["name"]


def test_malformed_input_is_counted_never_raised():
    d = IpClusterDriver("ip02", "dev-b", spec("ip-tasmota-like"))
    bad = [("tele/dev-b/STATE", b"\xff\x00garbage"), ("tele/dev-b/SENSOR", b"[1,2]"),
           ("tele/dev-b/LWT", b"Maybe"), ("stat/dev-b/RESULT", b"{not json"),
           ("tele/dev-b/SENSOR", b'{"Other":1}')]
    for topic, payload in bad:
        obs = d.handle(topic, payload)
        assert [o.kind for o in obs] == ["malformed"], (topic, obs)
    assert d.malformed == len(bad)
    # a half-bad message keeps its good fields and still counts the bad one
    obs = d.handle("tele/dev-b/SENSOR", b'{"AMP":"OK","Line":{"Ohm":"lots"},"SPD":"OPEN"}')
    assert [o.kind for o in obs] == ["telemetry", "malformed"]
    assert obs[0].telemetry == {"amplifier_ok": True, "surge_protector_ok": False}
    assert "Line.Ohm" in obs[1].reason and d.malformed == len(bad) + 1


def test_profile_mistakes_are_rejected_with_the_field_named():
    raw = yaml.safe_load((PROFILES / "ip-json-v1.yaml").read_text())["mqtt"]
    raw["telemetry"][0]["fields"]["rssi"] = {"path": "x", "type": "int"}
    raw["commands"]["play"]["payload"]["vol"] = "{volum}"
    raw["colour"] = "red"
    with pytest.raises(ValidationError) as ei:
        IpMqttSpec.model_validate(raw)
    text = str(ei.value)
    assert "colour" in text and "unknown normalised field 'rssi'" in text
    raw = yaml.safe_load((PROFILES / "ip-json-v1.yaml").read_text())["mqtt"]
    raw["commands"]["play"]["payload"]["vol"] = "{volum}"
    with pytest.raises(ValidationError, match=r"unknown placeholder \{volum\}"):
        IpMqttSpec.model_validate(raw)


# ---- against a real broker, real HTTP, real audio decoding ---------------------------------

@pytest.fixture
def media_dir(tmp_path):
    d = tmp_path / "media"
    d.mkdir()
    t = np.arange(int(16000 * 1.5)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32")
    sf.write(d / "news.wav", tone, 16000, subtype="PCM_16")
    sf.write(d / "news.ogg", tone, 16000, format="OGG", subtype="VORBIS")
    (d / "garbage.ogg").write_bytes(b"OggS" + bytes(range(256)) * 8)
    noise = (0.1 * np.random.default_rng(7).standard_normal(48000 * 4)).astype("float32")
    sf.write(d / "live.ogg", noise, 48000, format="OGG", subtype="VORBIS")
    return d


async def start_media_server(media_dir: Path, live: dict | None = None):
    async def media(request: web.Request) -> web.StreamResponse:
        if request.query.get("token") != TOKEN:
            raise web.HTTPForbidden()
        path = media_dir / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def stream(request: web.Request) -> web.StreamResponse:
        """A live stream as the daemon's media server sends one: chunked, paced, no length."""
        data = (media_dir / request.match_info["name"]).read_bytes()
        resp = web.StreamResponse(headers={"Content-Type": "audio/ogg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 4096):
            await resp.write(data[i:i + 4096])
            await asyncio.sleep(0.05)
        await resp.write_eof()
        if live is not None:
            live["ended"] = True
        return resp

    app = web.Application()
    app.router.add_get("/media/{name}", media)
    app.router.add_get("/live/{name}", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/media"


class Rig:
    """Two clusters (one per firmware) on one link, plus ground truth and observations."""

    def __init__(self, broker_url: str, **sim_kw):
        self.truth: list[tuple] = []
        self.obs: list[Observation] = []
        self.sims, drivers = {}, []
        for i, fw in enumerate(FIRMWARES, start=1):
            cid = f"ip0{i}"
            drivers.append(IpClusterDriver(cid, f"unit-{i}", spec(fw)))
            self.sims[cid] = IpClusterSim(cid, f"unit-{i}", spec(fw), broker_url,
                                          lambda *a: self.truth.append(a),
                                          telemetry_interval=0.2,
                                          sim_expires_on=dt.date(2026, 3, 31), **sim_kw)
        self.link = IpClusterLink(broker_url, drivers, self._observe)

    async def _observe(self, o: Observation) -> None:
        self.obs.append(o)

    async def __aenter__(self):
        await self.link.start()
        assert await self.link.wait_connected()
        for s in self.sims.values():
            await s.start()
        await self.until(lambda: all(d.state["online"] for d in self.link.drivers.values())
                         and all("mains_ok" in d.state for d in self.link.drivers.values()))
        return self

    async def __aexit__(self, *exc):
        for s in self.sims.values():
            await s.stop()
        await self.link.close()

    async def until(self, cond, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.02)

    def state(self, cid: str) -> dict:
        return self.link.drivers[cid].state


@pytest.mark.parametrize("ext", ["ogg", "wav"])
def test_both_firmwares_fetch_decode_and_play_served_media(broker, media_dir, ext):
    async def main():
        runner, base = await start_media_server(media_dir)
        try:
            async with Rig(broker.url) as rig:
                url = f"{base}/news.{ext}?token={TOKEN}"
                results = await asyncio.gather(
                    rig.link.play("ip01", url, 60, "bc-1", timeout=5),
                    rig.link.play("ip02", url, 60, "bc-1", timeout=5))
                assert [(r.reached, r.reason) for r in results] == [(True, "")] * 2
                # ground truth: each unit decoded the file and started playing bc-1 at 60
                assert ("ip01", True, "bc-1", 60) in rig.truth
                assert ("ip02", True, url, 60) in rig.truth   # Tasmota-style: no id on air
                await rig.until(lambda: all(rig.state(c).get("playing_id") == "bc-1"
                                            for c in ("ip01", "ip02")))
                assert rig.state("ip02")["playing_url"] == url
                # the 1.5 s file ends: each unit reports it stopped, on both sides
                await rig.until(lambda: all(rig.state(c)["playing"] is False
                                            for c in ("ip01", "ip02")))
                assert ("ip01", False, None, 60) in rig.truth
                stopped = await rig.link.stop("ip02", timeout=3)
                assert stopped.reached
        finally:
            await runner.cleanup()
    asyncio.run(main())


@pytest.mark.parametrize("path,reason", [
    ("missing.ogg?token=" + TOKEN, "http 404"),
    ("garbage.ogg?token=" + TOKEN, "undecodable audio"),
    ("news.ogg?token=wrong", "http 403"),
])
def test_unplayable_url_is_refused_and_reported_unreached(broker, media_dir, path, reason):
    async def main():
        runner, base = await start_media_server(media_dir)
        try:
            async with Rig(broker.url) as rig:
                for cid in ("ip01", "ip02"):
                    r = await rig.link.play(cid, f"{base}/{path}", 80, f"bad-{cid}", timeout=5)
                    assert not r.reached and r.reason.startswith("refused by cluster: " + reason)
                    assert rig.sims[cid].errors[-1].startswith(reason)
                assert not any(t[1] for t in rig.truth)     # nothing ever played
        finally:
            await runner.cleanup()
    asyncio.run(main())


def test_live_stream_plays_from_first_decoded_audio_until_it_ends(broker, media_dir):
    async def main():
        live = {"ended": False}
        runner, base = await start_media_server(media_dir, live)
        url = base.replace("/media", "/live") + "/live.ogg"
        try:
            async with Rig(broker.url) as rig:
                r = await rig.link.play("ip01", url, 90, "live-1", timeout=5)
                assert r.reached and not live["ended"]     # acked while still streaming
                assert rig.truth[-1] == ("ip01", True, "live-1", 90)
                await rig.until(lambda: live["ended"] and rig.truth[-1][1] is False)
                assert rig.truth[-1] == ("ip01", False, None, 90)
        finally:
            await runner.cleanup()
    asyncio.run(main())


def test_telemetry_is_normalised_identically_for_both_firmwares(broker):
    async def main():
        async with Rig(broker.url, battery_runtime_s=60) as rig:
            for s in rig.sims.values():
                s.surge_trip()
                s.amp_fault()
                s.impedance_step(50)
                await s.power_cut(30)
            await rig.until(lambda: all(rig.state(c).get("mains_ok") is False
                                        and rig.state(c).get("line_impedance_ohm") == 12.0
                                        for c in ("ip01", "ip02")))
            volatile = {"uptime_s", "battery_v", "playing_url", "playing_id"}
            a, b = (dict(rig.state(c)) for c in ("ip01", "ip02"))
            expect = {"online": True, "playing": False, "volume": 70, "rssi_dbm": -71,
                      "amplifier_ok": False, "line_impedance_ohm": 12.0,
                      "surge_protector_ok": False, "mains_ok": False, "sim_status": "ok",
                      "sim_expires_on": dt.date(2026, 3, 31), "balance_vnd": 50000}
            for st in (a, b):
                assert {k: v for k, v in st.items() if k not in volatile} == expect
                assert 11.0 <= st["battery_v"] <= 12.8 and isinstance(st["uptime_s"], int)
            r = await rig.link.set_volume("ip02", 45, timeout=3)
            assert r.reached
            await rig.until(lambda: rig.state("ip02")["volume"] == 45)
            assert ("ip02", False, None, 45) in rig.truth
    asyncio.run(main())


def test_kill_fires_lwt_and_play_to_dead_cluster_is_unreached(broker):
    async def main():
        async with Rig(broker.url) as rig:
            await rig.sims["ip01"].kill()
            await rig.sims["ip02"].kill()
            await rig.until(lambda: rig.state("ip01")["online"] is False
                            and rig.state("ip02")["online"] is False)
            assert [o.online for o in rig.obs if o.kind == "liveness"][-2:] == [False, False]
            r = await rig.link.play("ip01", "http://127.0.0.1:9/x.ogg", 50, "b9", timeout=0.5)
            assert (r.reached, r.reason) == (
                False, "no acknowledgement within 0.5s (cluster reported offline)")
    asyncio.run(main())


def test_link_cut_power_cut_and_sim_expiry_seen_by_driver(broker):
    async def main():
        async with Rig(broker.url, battery_runtime_s=0.3) as rig:
            ip01, ip02 = rig.sims["ip01"], rig.sims["ip02"]
            await ip01.link_cut(0.5)
            await rig.until(lambda: rig.state("ip01")["online"] is False)
            await rig.until(lambda: rig.state("ip01")["online"] is True)
            # power cut longer than the battery: mains lost, then dead, then rebooted
            await ip02.power_cut(1.0)
            await rig.until(lambda: rig.state("ip02")["mains_ok"] is False)
            await rig.until(lambda: rig.state("ip02")["online"] is False)
            await rig.until(lambda: rig.state("ip02")["online"] is True
                            and rig.state("ip02")["mains_ok"] is True)
            await ip01.sim_expire(grace_s=0.3)
            await rig.until(lambda: rig.state("ip01")["sim_status"] == "expired")
            await rig.until(lambda: rig.state("ip01")["online"] is False)
    asyncio.run(main())


def test_garbage_telemetry_on_the_wire_is_counted_and_survived(broker):
    async def main():
        async with Rig(broker.url) as rig:
            sim = rig.sims["ip02"]
            sim.publish_raw("tele/unit-2/SENSOR", b"\x00\x01 not json at all")
            sim.publish_raw("tele/unit-2/STATE", json.dumps({"Wifi": {"RSSI": "great"}}).encode())
            drv = rig.link.drivers["ip02"]
            await rig.until(lambda: drv.malformed >= 2)
            assert {o.cluster_id for o in rig.obs if o.kind == "malformed"} == {"ip02"}
            sim.impedance_step(-25)          # still alive and understood afterwards
            await rig.until(lambda: rig.state("ip02").get("line_impedance_ohm") == 6.0)
    asyncio.run(main())


def test_broker_outage_is_reported_then_link_and_clusters_reconnect(broker, media_dir):
    async def main():
        runner, base = await start_media_server(media_dir)
        try:
            async with Rig(broker.url) as rig:
                broker.stop()
                await rig.until(lambda: not rig.link.connected)
                r = await rig.link.play("ip01", f"{base}/news.wav?token={TOKEN}", 50, "b1")
                assert (r.reached, r.reason) == (False, "clusters broker not connected")
                broker.start()
                assert await rig.link.wait_connected(timeout=10)
                await rig.until(lambda: all(s.connected.is_set() for s in rig.sims.values()),
                                timeout=10)
                r = await rig.link.play("ip02", f"{base}/news.wav?token={TOKEN}", 50, "b2",
                                        timeout=5)
                assert r.reached, r.reason
        finally:
            await runner.cleanup()
    asyncio.run(main())

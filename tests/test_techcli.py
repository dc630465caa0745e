"""The technician's commands against a real control socket, in Vietnamese and English."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_control import FakeRuntime, ServerThread, sock_dir  # noqa: F401  (fixture)

from controller import techcli
from controller.i18n import CATALOG, detect_lang, t

ROOT = Path(__file__).resolve().parent.parent


def loaxa_group() -> click.Group:
    g = click.Group("loaxa")
    techcli.register(g)
    return g


@pytest.fixture(autouse=True)
def _no_site_file(monkeypatch, tmp_path):
    monkeypatch.setattr(techcli, "DEFAULT_CONFIG", str(tmp_path / "no-site.yaml"))


@pytest.fixture
def daemon(sock_dir):  # noqa: F811
    s = ServerThread(sock_dir / "control.sock", FakeRuntime())
    yield s
    s.close()


ENV = {"LANG": "C.UTF-8", "LANGUAGE": None, "LC_ALL": None, "LC_MESSAGES": None,
       "LOAXA_LANG": None, "LOAXA_SOCKET": None, "LOAXA_CONFIG": None, "FORCE_COLOR": None,
       "COLUMNS": "80", "USER": "hung", "SUDO_USER": None}


def run(args, *, env=None, sock=None, lang=None):
    extra = []
    if sock is not None:
        extra += ["--socket", str(sock)]
    if lang is not None:
        extra += ["--lang", lang]
    r = CliRunner().invoke(loaxa_group(), [*args, *extra], env={**ENV, **(env or {})},
                           catch_exceptions=False)
    assert "\x1b[" not in r.output, "no colour codes when not a terminal"
    return r


def fits_80(text: str) -> bool:
    return all(len(line) <= 80 for line in text.splitlines())


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------- status / clusters / alarms
def test_status_in_both_languages(daemon):
    en = run(["status"], sock=daemon.path, lang="en")
    assert en.exit_code == 0
    out = flat(en.stdout)
    for words in ("Station Bình Lư (binhlu)", "running for 1 d 2 h", "Clock: correct",
                  "Central server: connected", "Transmitter: ON AIR, 98.5 MHz, 29.5 W out",
                  "Now playing: Bản tin sáng (normal)", "1 offline", "28 FM without return channel",
                  "Alarms: 2 active — see: loaxa alarms"):
        assert words in out
    vi = run(["status"], sock=daemon.path, lang="vi")
    out = flat(vi.stdout)
    for words in ("Trạm Bình Lư", "đã chạy 1 ngày 2 giờ", "Đồng hồ: đúng giờ",
                  "Máy chủ trung tâm: đã kết nối", "Máy phát: ĐANG PHÁT SÓNG",
                  "Đang phát: Bản tin sáng (thường)", "1 mất liên lạc", "Cảnh báo: 2 đang có"):
        assert words in out
    assert fits_80(en.stdout) and fits_80(vi.stdout)


def test_status_json_is_the_daemons_data(daemon):
    r = run(["status", "--json"], sock=daemon.path)
    data = json.loads(r.stdout)
    assert data["site"] == {"id": "binhlu", "name": "Bình Lư"}
    assert data["health"]["counts"]["clusters_total"] == 35


@pytest.mark.parametrize("lang, words", [
    ("en", ["FM, no return channel", "OFFLINE", "3 min ago", "2 h ago", "just now", "-71 good",
            "-92 fair", "-104 weak", "EXPIRED", "10 days! top up", "200 days",
            "not answering (lightning)", "SIM expired", "online, playing", "disabled", "never"]),
    ("vi", ["FM, không có kênh báo về", "MẤT LIÊN LẠC", "3 phút trước", "2 giờ trước", "vừa xong",
            "-71 tốt", "-104 yếu", "HẾT HẠN", "còn 10 ngày! cần nạp",
            "không liên lạc được (sét đánh)", "SIM đã hết hạn", "đã tắt", "chưa bao giờ"]),
])
def test_clusters_in_plain_words(daemon, lang, words):
    wide = run(["clusters"], sock=daemon.path, lang=lang, env={"COLUMNS": "200"})
    assert wide.exit_code == 0
    for w in words:
        assert w in wide.stdout, w
    narrow = run(["clusters"], sock=daemon.path, lang=lang)
    assert fits_80(narrow.stdout), narrow.stdout
    for cid in ("ip01", "ip03", "ip04", "fm07", "fm12"):
        assert cid in narrow.stdout


def test_clusters_zone_filter_and_json(daemon):
    r = run(["clusters", "--zone", "ban-x"], sock=daemon.path, lang="en")
    assert "fm07" in r.stdout and "ip01" not in r.stdout
    assert ("clusters", {"zone": "ban-x"}) in daemon.api.calls
    data = json.loads(run(["clusters", "--json"], sock=daemon.path).stdout)
    assert [c["id"] for c in data] == ["ip01", "ip03", "ip04", "fm07", "fm12"]


def test_alarms_give_cause_and_evidence(daemon):
    en = flat(run(["alarms"], sock=daemon.path, lang="en").stdout)
    for w in ("2 active alarm(s)", "[MAJOR] cluster ip03 — not answering",
              "Cause: lightning (certainty 80%)", "storm: 6 strikes within 8 km",
              "[CRITICAL] station — antenna problem", "Acknowledged by central:lan",
              "Part of one incident with other alarms: inc-4", "id a-17"):
        assert w in en, w
    vi = flat(run(["alarms"], sock=daemon.path, lang="vi").stdout)
    for w in ("[LỚN] cụm loa ip03 — không liên lạc được", "Nguyên nhân: sét đánh (độ tin cậy 80%)",
              "Căn cứ:", "[NGHIÊM TRỌNG] trạm — lỗi ăng-ten"):
        assert w in vi, w


def test_no_alarms_says_all_good(daemon):
    async def none():
        return []
    daemon.api.alarms = none
    assert "Không có cảnh báo nào" in run(["alarms"], sock=daemon.path, lang="vi").stdout


# ---------------------------------------------------------------- test-cluster
def test_test_cluster_ip_answered_and_not(daemon):
    ok = run(["test-cluster", "ip01"], sock=daemon.path, lang="en")
    assert ok.exit_code == 0
    assert "OK: ip01 answered in 413 ms." in ok.stdout
    assert "Volume 70%, signal -71 good, SIM 200 days." in ok.stdout
    bad = run(["test-cluster", "ip03"], sock=daemon.path, lang="vi")
    assert bad.exit_code == 1
    out = flat(bad.stdout)
    assert "KHÔNG ĐẠT: ip03 không trả lời." in out and "Lý do: no reply within 10 s" in out
    assert "SIM 4G" in out


def test_test_cluster_fm_says_what_was_sent_and_what_to_listen_for(daemon):
    for lang, words in (("en", ["Sent to fm07 (receiver address 107) over FM, by DTMF",
                                "switch-on code A107", "test beep (1000 Hz) for 10 s",
                                "switch-off code B107", "no return channel", "Listen at the cluster",
                                "tuned to 98.5 MHz"]),
                        ("vi", ["Đã gửi tới fm07 (địa chỉ máy thu 107)", "mã bật loa A107",
                                "mã tắt loa B107", "Hãy nghe tại cụm loa", "phải là 107"])):
        r = run(["test-cluster", "fm07"], sock=daemon.path, lang=lang)
        assert r.exit_code == 0
        for w in words:
            assert w in flat(r.stdout), w
    data = json.loads(run(["test-cluster", "fm07", "--json"], sock=daemon.path).stdout)
    assert data["wake_codes"] == ["A107"] and data["return_channel"] is False


def test_test_cluster_fm_with_return_channel_that_stays_silent(daemon):
    async def silent(cluster_id):
        return {"cluster_id": cluster_id, "kind": "fm", "address": "105", "method": "rds",
                "wake_codes": ["105"], "sleep_codes": ["105"], "tone_hz": 1000, "tone_s": 5,
                "frequency_mhz": 98.5, "return_channel": True, "answered": False,
                "reason": "no confirmation within 15 s"}
    daemon.api.test_cluster = silent
    r = run(["test-cluster", "fm05"], sock=daemon.path, lang="en")
    assert r.exit_code == 1
    out = flat(r.stdout)
    assert "by RDS data" in out and "FAILED: the codes were sent but fm05 did not report back." in out
    assert "no confirmation within 15 s" in out and "Listen at the cluster" not in out


def test_every_command_has_help():
    for args in (["status"], ["clusters"], ["alarms"], ["test-cluster"], ["play"], ["stop"],
                 ["log"], ["cluster", "note"]):
        r = run([*args, "--help"])
        assert r.exit_code == 0 and "--socket" in r.output and "--lang" in r.output, args


def test_unknown_cluster_is_an_error_in_words(daemon):
    en = run(["test-cluster", "fm99"], sock=daemon.path, lang="en")
    assert en.exit_code == 1
    assert "no cluster with that id (list them: loaxa clusters)" in en.stderr
    vi = run(["cluster", "note", "fm99", "--status", "note"], sock=daemon.path, lang="vi")
    assert vi.exit_code == 1
    assert "không có cụm loa nào mang mã này" in vi.stderr
    js = run(["test-cluster", "fm99", "--json"], sock=daemon.path)
    assert json.loads(js.stdout)["error"]["code"] == "unknown_cluster"


# ---------------------------------------------------------------- play / stop / note
def test_play_file_to_targets(daemon, tmp_path, monkeypatch):
    (tmp_path / "tin.wav").write_bytes(b"RIFF")
    monkeypatch.chdir(tmp_path)
    r = run(["play", "tin.wav", "--targets", "ban-x,ip01", "-t", "fm07"], sock=daemon.path,
            lang="en")
    assert r.exit_code == 0, r.output
    op, args = daemon.api.calls[-1]
    assert op == "play" and args["file"] == str(tmp_path / "tin.wav")
    assert args["targets"] == ["ban-x", "ip01", "fm07"] and args["priority"] == "normal"
    assert args["by"].startswith("local:")
    assert "Broadcast b-0200 started (normal) to 3 clusters." in r.stdout
    assert "To stop it: loaxa stop b-0200" in r.stdout


def test_play_tts_emergency_to_all_in_vietnamese(daemon):
    r = run(["play", "--tts", "Bão số 3 sắp đổ bộ", "--targets", "all", "-p", "emergency"],
            sock=daemon.path, lang="vi")
    assert r.exit_code == 0
    args = daemon.api.calls[-1][1]
    assert args["tts"] == "Bão số 3 sắp đổ bộ" and args["targets"] == "all"
    assert "mức KHẨN CẤP" in r.stdout and "Đã ngắt buổi phát b-0193" in r.stdout
    assert "Bỏ qua (đã tắt): fm12" in r.stdout


def test_play_refuses_bad_command_lines_before_asking(daemon, tmp_path):
    n = len(daemon.api.calls)
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    both = run(["play", str(tmp_path / "a.wav"), "--tts", "x", "-t", "all"], sock=daemon.path, lang="en")
    assert both.exit_code == 2 and "one of them, not both" in both.output
    missing = run(["play", str(tmp_path / "nope.mp3"), "-t", "all"], sock=daemon.path, lang="vi")
    assert missing.exit_code == 2 and "Không tìm thấy tệp" in missing.output
    neither = run(["play", "-t", "all"], sock=daemon.path, lang="vi")
    assert neither.exit_code == 2 and "chỉ một trong hai" in neither.output
    assert len(daemon.api.calls) == n


def test_stop(daemon):
    r = run(["stop"], sock=daemon.path, lang="en")
    assert r.exit_code == 0 and "Stopped: b-0193" in r.stdout
    bad = run(["stop", "b-9"], sock=daemon.path, lang="en")
    assert bad.exit_code == 1 and "no such broadcast is playing" in bad.stderr


def test_cluster_note(daemon):
    r = run(["cluster", "note", "fm07", "--status", "damaged", "--cause", "lightning",
             "--text", "Loa cháy, cột bị sét đánh"], sock=daemon.path, lang="vi")
    assert r.exit_code == 0
    assert "Đã lưu ghi chú cho fm07 (hư hỏng)" in r.stdout
    args = daemon.api.calls[-1][1]
    assert args == {"cluster_id": "fm07", "status": "damaged", "cause": "lightning",
                    "text": "Loa cháy, cột bị sét đánh", "by": args["by"]}
    bad = run(["cluster", "note", "fm07", "--status", "broken"], sock=daemon.path)
    assert bad.exit_code == 2


# ---------------------------------------------------------------- log
def test_broadcast_log_table_and_csv(daemon):
    r = run(["log"], sock=daemon.path, lang="en")
    assert r.exit_code == 0 and fits_80(r.stdout)
    for w in ("Bản tin sáng", "EMERGENCY", "central:ubnd-xa", "2/3", "- ip03", "finished", "FAILED"):
        assert w in r.stdout, w
    rows = list(csv.reader(io.StringIO(run(["log", "--csv"], sock=daemon.path, lang="en").stdout)))
    assert rows[0] == ["Broadcast id", "Start", "End", "Programme", "Priority", "Source",
                       "Ordered by", "Targets", "Reached", "Not reached", "Outcome"]
    assert len(rows) == 3
    first = dict(zip(rows[0], rows[1], strict=True))
    assert first["Programme"] == "Bản tin sáng" and first["Source"] == "tts"
    assert first["Targets"] == "ip01 ip03 fm07" and first["Not reached"] == "ip03: offline"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", first["Start"])
    vi = list(csv.reader(io.StringIO(run(["log", "--csv"], sock=daemon.path, lang="vi").stdout)))
    assert vi[0][3] == "Chương trình" and vi[2][4] == "KHẨN CẤP" and vi[2][10] == "LỖI"


def test_log_range_in_the_station_time_zone(daemon, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(f"site: {{id: x, timezone: Asia/Ho_Chi_Minh}}\ncontrol: {{socket: {daemon.path}}}\n")
    r = run(["log", "--config", str(site), "--from", "2026-05-03", "--to", "2026-05-03"], lang="en")
    assert r.exit_code == 0
    assert daemon.api.calls[-1] == ("broadcast_log", {"from_": "2026-05-02T17:00:00.000Z",
                                                      "to": "2026-05-03T17:00:00.000Z"})
    bad = run(["log", "--config", str(site), "--from", "3/5/2026"], lang="vi")
    assert bad.exit_code == 2 and "không hiểu thời gian" in bad.output


def test_event_log_by_type(daemon):
    r = run(["log", "--type", "alarm.", "--limit", "5"], sock=daemon.path, lang="en")
    assert r.exit_code == 0
    assert "alarm.raised" in r.stdout and "code=cluster.offline" in r.stdout
    assert daemon.api.calls[-1][1]["type_"] == "alarm." and daemon.api.calls[-1][1]["limit"] == 5
    rows = list(csv.reader(io.StringIO(
        run(["log", "--type", "alarm.", "--csv"], sock=daemon.path, lang="en").stdout)))
    assert rows[0] == ["#", "Time", "Event", "Details"] and rows[1][0] == "41"
    assert json.loads(rows[1][3])["cluster_id"] == "ip03"


# ---------------------------------------------------------------- daemon not running
@pytest.mark.parametrize("lang, words", [
    ("en", ["The loaxa daemon is not running", "sudo systemctl start loaxa",
            "journalctl -u loaxa -n 50"]),
    ("vi", ["Chương trình loaxa đang không chạy", "Khởi động:", "sudo systemctl start loaxa",
            "Xem vì sao nó dừng:", "journalctl -u loaxa -n 50"]),
])
def test_daemon_not_running(tmp_path, lang, words):
    r = run(["status"], sock=tmp_path / "nothing.sock", lang=lang)
    assert r.exit_code == 3
    for w in words:
        assert w in r.stderr, w
    assert r.stdout == ""


def test_leftover_socket_counts_as_not_running(sock_dir):  # noqa: F811
    path = sock_dir / "control.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    r = run(["clusters", "--json"], sock=path, lang="en")
    assert r.exit_code == 3 and "left over" in r.stderr and "systemctl start loaxa" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "refused"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the tool as another user")
def test_user_outside_the_group_is_told_how_to_get_access(sock_dir):  # noqa: F811
    py = "/usr/bin/python3"
    site_pkgs = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)
    if not os.access(py, os.X_OK) or site_pkgs is None:
        pytest.skip("no system python3 / venv")
    os.chmod(sock_dir, 0o755)
    s = ServerThread(sock_dir / "control.sock", FakeRuntime())  # root:root 0660
    try:
        code = ("import click; from controller.techcli import register; g = click.Group(); "
                "register(g); g()")
        r = subprocess.run([py, "-c", code, "status", "--socket", str(s.path), "--lang", "en"],
                           user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/",
                           env={"PYTHONPATH": f"{ROOT}:{site_pkgs}", "LANG": "C.UTF-8"})
    finally:
        s.close()
    assert r.returncode == 3, r.stderr
    assert "not allowed to talk to the loaxa daemon" in r.stderr
    assert "sudo usermod -aG loaxa $USER" in r.stderr


# ---------------------------------------------------------------- language and config
def test_language_and_socket_from_the_site_file(daemon, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(f"site: {{id: x, language: vi}}\ncontrol: {{socket: {daemon.path}}}\n")
    r = run(["status", "--config", str(site)])
    assert r.exit_code == 0 and "Máy chủ trung tâm" in r.stdout
    r = run(["status", "--config", str(site), "--lang", "en"])
    assert "Central server" in r.stdout
    r = run(["status"], env={"LOAXA_SOCKET": str(daemon.path), "LANG": "vi_VN.UTF-8"})
    assert r.exit_code == 0 and "Máy chủ trung tâm" in r.stdout
    missing = run(["status", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml" in missing.output


def test_detect_lang_precedence():
    assert detect_lang("en", "vi", {"LANG": "vi_VN.UTF-8"}) == "en"
    assert detect_lang(None, "en", {"LOAXA_LANG": "vi"}) == "vi"
    assert detect_lang(None, "vi", {"LANG": "en_US.UTF-8"}) == "vi"
    assert detect_lang(None, None, {"LANGUAGE": "vi:en", "LANG": "en_US.UTF-8"}) == "vi"
    assert detect_lang(None, None, {"LANG": "vi_VN.UTF-8"}) == "vi"
    assert detect_lang(None, None, {"LANG": "C.UTF-8"}) == "en"
    assert detect_lang(None, None, {}) == "en"


def test_catalog_has_both_languages_with_the_same_placeholders():
    fields = re.compile(r"{(\w+)")
    for key, entry in CATALOG.items():
        assert set(entry) == {"vi", "en"}, key
        assert sorted(fields.findall(entry["vi"])) == sorted(fields.findall(entry["en"])), key
        if entry["vi"] != entry["en"] and entry["vi"] not in ("xong",):  # real words, no marks
            assert not entry["vi"].isascii(), f"{key}: Vietnamese without diacritics?"


def test_every_alarm_code_and_cause_has_words():
    from controller.contract import ALARM_CODES, CLUSTER_CAUSES

    assert tuple(CLUSTER_CAUSES) == techcli.CAUSES
    for code in ALARM_CODES:
        assert f"code.{code}" in CATALOG and t(f"code.{code}", "vi") != code
    for cause in CLUSTER_CAUSES:
        assert t(f"cause.{cause}", "vi") != t(f"cause.{cause}", "en")

"""Vietnamese and English words for the technician's tools.

The technician is part-time with little training: messages say what is wrong and what to
do, in plain words, never a bare code. Every key has both languages with the same
placeholders (a test checks it). Unknown keys come back as the key itself, so a missing
translation shows up as odd text rather than a crash in the field.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

LANGS = ("vi", "en")

CATALOG: dict[str, dict[str, str]] = {
    # ---- daemon not reachable
    "down.missing": {
        "en": "The loaxa daemon is not running (there is no control socket {path}).",
        "vi": "Chương trình loaxa đang không chạy (không thấy tệp điều khiển {path}).",
    },
    "down.refused": {
        "en": "The loaxa daemon is not running ({path} is left over; nobody answers on it).",
        "vi": "Chương trình loaxa đang không chạy ({path} còn sót lại nhưng không ai trả lời).",
    },
    "down.closed": {
        "en": "The loaxa daemon hung up without answering (did it just stop?).",
        "vi": "Chương trình loaxa ngắt kết nối mà không trả lời (có phải nó vừa dừng?).",
    },
    "down.timeout": {
        "en": "The loaxa daemon did not answer within {s} seconds; it may be stuck.",
        "vi": "Chương trình loaxa không trả lời sau {s} giây; có thể nó đang bị treo.",
    },
    "down.denied": {
        "en": "You are not allowed to talk to the loaxa daemon ({path}).",
        "vi": "Bạn không có quyền ra lệnh cho chương trình loaxa ({path}).",
    },
    "hint.start": {
        "en": "Start it:            sudo systemctl start loaxa",
        "vi": "Khởi động:           sudo systemctl start loaxa",
    },
    "hint.restart": {
        "en": "Restart it:          sudo systemctl restart loaxa",
        "vi": "Khởi động lại:       sudo systemctl restart loaxa",
    },
    "hint.why": {
        "en": "See why it stopped:  journalctl -u loaxa -n 50",
        "vi": "Xem vì sao nó dừng:  journalctl -u loaxa -n 50",
    },
    "hint.denied": {
        "en": "Use sudo, or add yourself to the loaxa group: sudo usermod -aG loaxa $USER "
              "(then log out and in again).",
        "vi": "Hãy dùng sudo, hoặc thêm tài khoản của bạn vào nhóm loaxa: "
              "sudo usermod -aG loaxa $USER (rồi đăng xuất và đăng nhập lại).",
    },
    # ---- daemon answered with an error
    "error.refused": {"en": "The daemon refused: {what}", "vi": "Chương trình từ chối: {what}"},
    "error.detail": {"en": "Details: {message}", "vi": "Chi tiết: {message}"},
    "errcode.unknown_cluster": {
        "en": "there is no cluster with that id (list them: loaxa clusters)",
        "vi": "không có cụm loa nào mang mã này (xem danh sách: loaxa clusters)",
    },
    "errcode.unknown_broadcast": {
        "en": "no such broadcast is playing (see: loaxa status)",
        "vi": "không có buổi phát nào như vậy đang phát (xem: loaxa status)",
    },
    "errcode.file_not_found": {
        "en": "the daemon cannot read that file. Copy it into /var/lib/loaxa/media/ "
              "(the daemon cannot see home folders or /tmp)",
        "vi": "chương trình không đọc được tệp đó. Hãy chép tệp vào /var/lib/loaxa/media/ "
              "(chương trình không nhìn thấy thư mục cá nhân hay /tmp)",
    },
    "errcode.busy": {
        "en": "busy: something more urgent is on air",
        "vi": "đang bận: đang phát nội dung khẩn hơn",
    },
    "errcode.not_ready": {
        "en": "not ready yet (still starting); try again in a minute",
        "vi": "chưa sẵn sàng (đang khởi động); hãy thử lại sau một phút",
    },
    "errcode.unsupported": {
        "en": "this cluster or device cannot do that",
        "vi": "cụm loa hoặc thiết bị này không làm được việc đó",
    },
    "errcode.bad_request": {"en": "the request was not valid", "vi": "yêu cầu không hợp lệ"},
    "errcode.bad_json": {"en": "the request was garbled", "vi": "yêu cầu bị lỗi định dạng"},
    "errcode.too_large": {"en": "the request is too large", "vi": "yêu cầu quá lớn"},
    "errcode.unknown_op": {
        "en": "the daemon does not know this command (are loaxa and its tools the same version?)",
        "vi": "chương trình không biết lệnh này (loaxa và công cụ có cùng phiên bản không?)",
    },
    "errcode.internal": {
        "en": "an internal error in the daemon (see: journalctl -u loaxa -n 50)",
        "vi": "lỗi bên trong chương trình (xem: journalctl -u loaxa -n 50)",
    },
    # ---- general words
    "never": {"en": "never", "vi": "chưa bao giờ"},
    "none": {"en": "none", "vi": "không có"},
    "ago.now": {"en": "just now", "vi": "vừa xong"},
    "ago": {"en": "{dur} ago", "vi": "{dur} trước"},
    "dur.s": {"en": "{n} s", "vi": "{n} giây"},
    "dur.min": {"en": "{n} min", "vi": "{n} phút"},
    "dur.h": {"en": "{n} h {m} min", "vi": "{n} giờ {m} phút"},
    "dur.d": {"en": "{n} d {h} h", "vi": "{n} ngày {h} giờ"},
    "prio.normal": {"en": "normal", "vi": "thường"},
    "prio.priority": {"en": "priority", "vi": "ưu tiên"},
    "prio.emergency": {"en": "EMERGENCY", "vi": "KHẨN CẤP"},
    # ---- status
    "status.site": {
        "en": "Station {name} ({id}) · loaxa {version} · running for {uptime}",
        "vi": "Trạm {name} ({id}) · loaxa {version} · đã chạy {uptime}",
    },
    "status.clock.ok": {"en": "Clock: correct (synchronised)", "vi": "Đồng hồ: đúng giờ (đã đồng bộ)"},
    "status.clock.bad": {
        "en": "Clock: NOT synchronised — scheduled programmes wait until it is",
        "vi": "Đồng hồ: CHƯA đồng bộ — các chương trình theo lịch phải chờ",
    },
    "status.central.ok": {
        "en": "Central server: connected", "vi": "Máy chủ trung tâm: đã kết nối"},
    "status.central.bad": {
        "en": "Central server: NOT connected — {n} reports waiting to be sent",
        "vi": "Máy chủ trung tâm: CHƯA kết nối — {n} báo cáo đang chờ gửi",
    },
    "status.tx": {"en": "Transmitter: {state}", "vi": "Máy phát: {state}"},
    "tx.nodata": {"en": "no reading yet", "vi": "chưa có số liệu"},
    "tx.unreachable": {
        "en": "NOT answering on its cable — check the serial cable and its power",
        "vi": "KHÔNG trả lời qua cáp — kiểm tra cáp nối tiếp và nguồn điện máy phát",
    },
    "tx.onair": {"en": "ON AIR", "vi": "ĐANG PHÁT SÓNG"},
    "tx.standby": {"en": "standby (not transmitting)", "vi": "chờ (không phát sóng)"},
    "tx.freq": {"en": "{v} MHz", "vi": "{v} MHz"},
    "tx.forward": {"en": "{v} W out", "vi": "công suất {v} W"},
    "tx.reflected": {"en": "{v} W reflected", "vi": "phản xạ {v} W"},
    "tx.temp": {"en": "{v} °C", "vi": "{v} °C"},
    "status.onair": {
        "en": "Now playing: {what} ({priority}) since {since}, to {n} clusters",
        "vi": "Đang phát: {what} ({priority}) từ {since}, tới {n} cụm loa",
    },
    "status.onair.none": {"en": "Now playing: nothing", "vi": "Đang phát: không có gì"},
    "status.counts": {
        "en": "Clusters: {online} online, {offline} offline, {unmonitored} FM without return "
              "channel, {faulty} with faults — {total} in all",
        "vi": "Cụm loa: {online} hoạt động, {offline} mất liên lạc, {unmonitored} FM không có "
              "kênh báo về, {faulty} có lỗi — tổng {total}",
    },
    "status.alarms": {
        "en": "Alarms: {n} active — see: loaxa alarms",
        "vi": "Cảnh báo: {n} đang có — xem: loaxa alarms",
    },
    "status.alarms.none": {"en": "Alarms: none", "vi": "Cảnh báo: không có"},
    # ---- clusters
    "clusters.title": {"en": "Clusters ({n})", "vi": "Cụm loa ({n})"},
    "clusters.none": {"en": "No clusters match.", "vi": "Không có cụm loa nào phù hợp."},
    "col.id": {"en": "ID", "vi": "Mã"},
    "col.zone": {"en": "Village", "vi": "Thôn"},
    "col.state": {"en": "State", "vi": "Trạng thái"},
    "col.seen": {"en": "Last seen", "vi": "Liên lạc cuối"},
    "col.volume": {"en": "Vol", "vi": "Âm\nlượng"},
    "col.signal": {"en": "Signal dBm", "vi": "Sóng dBm"},
    "col.sim": {"en": "SIM", "vi": "SIM"},
    "col.problems": {"en": "Problems", "vi": "Sự cố"},
    "avail.online": {"en": "online", "vi": "hoạt động"},
    "avail.offline": {"en": "OFFLINE", "vi": "MẤT LIÊN LẠC"},
    "avail.unmonitored": {"en": "FM, no return channel", "vi": "FM, không có kênh báo về"},
    "avail.disabled": {"en": "disabled", "vi": "đã tắt"},
    "avail.playing": {"en": "{state}, playing", "vi": "{state}, đang phát"},
    "rssi.good": {"en": "good", "vi": "tốt"},
    "rssi.fair": {"en": "fair", "vi": "khá"},
    "rssi.weak": {"en": "weak", "vi": "yếu"},
    "sim.days": {"en": "{n} days", "vi": "còn {n} ngày"},
    "sim.soon": {"en": "{n} days! top up", "vi": "còn {n} ngày! cần nạp"},
    "sim.expired": {"en": "EXPIRED", "vi": "HẾT HẠN"},
    "fault.with_cause": {"en": "{fault} ({cause})", "vi": "{fault} ({cause})"},
    # ---- alarms
    "alarms.none": {"en": "No active alarms. All good.", "vi": "Không có cảnh báo nào. Mọi thứ bình thường."},
    "alarms.title": {"en": "{n} active alarm(s):", "vi": "{n} cảnh báo đang có:"},
    "alarm.where.cluster": {"en": "cluster {id}", "vi": "cụm loa {id}"},
    "alarm.where.site": {"en": "station", "vi": "trạm"},
    "alarm.cause": {"en": "Cause: {cause} (certainty {pct}%)", "vi": "Nguyên nhân: {cause} (độ tin cậy {pct}%)"},
    "alarm.evidence": {"en": "Why we think so:", "vi": "Căn cứ:"},
    "alarm.since": {"en": "Since {at} ({ago}) · id {id}", "vi": "Từ {at} ({ago}) · mã {id}"},
    "alarm.ack": {"en": "Acknowledged by {by}", "vi": "Đã được {by} xác nhận"},
    "alarm.incident": {
        "en": "Part of one incident with other alarms: {id}",
        "vi": "Cùng một sự cố với các cảnh báo khác: {id}",
    },
    "sev.critical": {"en": "CRITICAL", "vi": "NGHIÊM TRỌNG"},
    "sev.major": {"en": "MAJOR", "vi": "LỚN"},
    "sev.minor": {"en": "minor", "vi": "nhỏ"},
    "sev.warning": {"en": "warning", "vi": "lưu ý"},
    # alarm codes (central-contract.md)
    "code.cluster.offline": {"en": "not answering", "vi": "không liên lạc được"},
    "code.cluster.amplifier_fault": {"en": "amplifier fault", "vi": "hỏng bộ khuếch đại (âm-li)"},
    "code.cluster.speaker_line_fault": {"en": "speaker wire fault", "vi": "lỗi dây dẫn tới loa"},
    "code.cluster.surge_protector_tripped": {
        "en": "surge protector tripped", "vi": "bộ chống sét lan truyền đã nhảy"},
    "code.cluster.power_loss": {"en": "no mains power", "vi": "mất điện lưới"},
    "code.cluster.subscription_expiring": {"en": "SIM about to expire", "vi": "SIM sắp hết hạn"},
    "code.cluster.subscription_expired": {"en": "SIM expired", "vi": "SIM đã hết hạn"},
    "code.transmitter.unreachable": {
        "en": "transmitter not answering on its cable", "vi": "máy phát không trả lời qua cáp"},
    "code.transmitter.vswr_high": {
        "en": "antenna problem (too much power reflected)",
        "vi": "lỗi ăng-ten (công suất phản xạ quá cao)"},
    "code.transmitter.over_temperature": {"en": "transmitter too hot", "vi": "máy phát quá nóng"},
    "code.transmitter.pll_unlocked": {
        "en": "transmitter frequency not locked", "vi": "máy phát không giữ được tần số"},
    "code.transmitter.dead_air": {
        "en": "on air but silent", "vi": "đang phát sóng nhưng không có tiếng"},
    "code.gateway.clock_unsynchronised": {
        "en": "clock not synchronised (no time from the network)",
        "vi": "đồng hồ chưa đồng bộ (chưa lấy được giờ qua mạng)"},
    "code.gateway.storage_low": {"en": "storage almost full", "vi": "bộ nhớ gần đầy"},
    "code.gateway.audio_device_missing": {
        "en": "sound card missing", "vi": "không thấy card âm thanh"},
    "code.gateway.security": {
        "en": "blocked a forged or unauthorised command",
        "vi": "đã chặn một lệnh giả mạo hoặc không được phép"},
    # causes (diagnosis)
    "cause.lightning": {"en": "lightning", "vi": "sét đánh"},
    "cause.subscription_expired": {"en": "SIM expired", "vi": "SIM hết hạn"},
    "cause.power_loss": {"en": "power cut", "vi": "mất điện"},
    "cause.link_loss": {"en": "network link lost", "vi": "mất kết nối mạng"},
    "cause.hardware": {"en": "equipment fault", "vi": "hỏng thiết bị"},
    "cause.vandalism_or_unknown": {
        "en": "damage without storm or power cause (vandalism?)",
        "vi": "hư hỏng không do sét hay mất điện (có thể bị phá?)"},
    "cause.unknown": {"en": "not known yet", "vi": "chưa rõ"},
    # ---- test-cluster
    "test.waiting": {
        "en": "Testing {id}… (this can take up to {s} s)",
        "vi": "Đang kiểm tra {id}… (có thể mất tới {s} giây)",
    },
    "test.ip.ok": {"en": "OK: {id} answered in {ms} ms.", "vi": "TỐT: {id} đã trả lời sau {ms} ms."},
    "test.ip.state": {
        "en": "Volume {vol}, signal {signal}, SIM {sim}.",
        "vi": "Âm lượng {vol}, sóng {signal}, SIM {sim}.",
    },
    "test.ip.fail": {"en": "FAILED: {id} did not answer.", "vi": "KHÔNG ĐẠT: {id} không trả lời."},
    "test.reason": {"en": "Reason: {reason}", "vi": "Lý do: {reason}"},
    "test.ip.hint": {
        "en": "Check at the cluster: mains power, the 4G SIM (credit and expiry date), the "
              "antenna; then run the test again.",
        "vi": "Kiểm tra tại cụm loa: điện lưới, SIM 4G (tiền trong tài khoản và hạn dùng), "
              "ăng-ten; rồi chạy kiểm tra lại.",
    },
    "test.fm.sent": {
        "en": "Sent to {id} (receiver address {address}) over FM, by {method}:",
        "vi": "Đã gửi tới {id} (địa chỉ máy thu {address}) qua sóng FM, bằng {method}:",
    },
    "method.dtmf": {"en": "DTMF tones in the sound", "vi": "âm DTMF trong tiếng phát"},
    "method.rds": {"en": "RDS data", "vi": "dữ liệu RDS"},
    "test.fm.wake": {"en": "  1. switch-on code {codes}", "vi": "  1. mã bật loa {codes}"},
    "test.fm.tone": {
        "en": "  2. a test beep ({hz} Hz) for {s} s", "vi": "  2. tiếng bíp thử ({hz} Hz) trong {s} giây"},
    "test.fm.sleep": {"en": "  3. switch-off code {codes}", "vi": "  3. mã tắt loa {codes}"},
    "test.fm.listen": {
        "en": "This cluster has no return channel, so it cannot tell us what it heard. Listen at "
              "the cluster (or phone someone there): the loudspeaker should switch on, beep "
              "steadily for {s} s, then go quiet.",
        "vi": "Cụm loa này không có kênh báo về nên không tự báo được. Hãy nghe tại cụm loa "
              "(hoặc gọi điện cho người ở đó): loa phải bật lên, kêu bíp đều trong {s} giây, "
              "rồi tắt.",
    },
    "test.fm.nothing": {
        "en": "If nothing is heard: check mains power at the cluster, the receiver's address "
              "switch (must be {address}), the FM antenna, and that the receiver is tuned to "
              "{freq} MHz.",
        "vi": "Nếu không nghe thấy gì: kiểm tra điện lưới tại cụm loa, công tắc địa chỉ của "
              "máy thu (phải là {address}), ăng-ten FM, và máy thu đã dò đúng {freq} MHz.",
    },
    "test.fm.confirmed": {
        "en": "OK: {id} reported back that it switched on.",
        "vi": "TỐT: {id} đã báo về là loa đã bật.",
    },
    "test.fm.unconfirmed": {
        "en": "FAILED: the codes were sent but {id} did not report back.",
        "vi": "KHÔNG ĐẠT: đã gửi mã nhưng {id} không báo về.",
    },
    # ---- play / stop
    "play.started": {
        "en": "Broadcast {bid} started ({prio}) to {n} clusters.",
        "vi": "Đã bắt đầu phát {bid} (mức {prio}) tới {n} cụm loa.",
    },
    "play.queued": {
        "en": "Broadcast {bid} is waiting: something more urgent is on air.",
        "vi": "Buổi phát {bid} đang chờ: đang phát nội dung khẩn hơn.",
    },
    "play.preempted": {"en": "It interrupted broadcast {other}.", "vi": "Đã ngắt buổi phát {other}."},
    "play.skipped": {"en": "Skipped (disabled): {ids}", "vi": "Bỏ qua (đã tắt): {ids}"},
    "play.stop_hint": {"en": "To stop it: loaxa stop {bid}", "vi": "Để dừng: loaxa stop {bid}"},
    "play.need_source": {
        "en": "Give a sound file or --tts TEXT (one of them, not both).",
        "vi": "Hãy cho một tệp âm thanh hoặc --tts VĂN_BẢN (chỉ một trong hai).",
    },
    "play.no_file": {"en": "File not found: {file}", "vi": "Không tìm thấy tệp: {file}"},
    "stop.done": {"en": "Stopped: {ids}", "vi": "Đã dừng: {ids}"},
    "stop.nothing": {"en": "Nothing was playing.", "vi": "Không có gì đang phát."},
    # ---- log
    "log.title": {"en": "Broadcasts {frm} – {to}: {n}", "vi": "Các buổi phát {frm} – {to}: {n}"},
    "log.none": {
        "en": "No broadcasts between {frm} and {to}.",
        "vi": "Không có buổi phát nào từ {frm} đến {to}.",
    },
    "log.events.title": {"en": "Events {frm} – {to}: {n}", "vi": "Sự kiện {frm} – {to}: {n}"},
    "log.events.none": {
        "en": "No events between {frm} and {to}.", "vi": "Không có sự kiện nào từ {frm} đến {to}."},
    "log.bad_time": {
        "en": "cannot read the time {v!r}; write e.g. 2026-05-03 or \"2026-05-03 14:00\"",
        "vi": "không hiểu thời gian {v!r}; hãy viết ví dụ 2026-05-03 hoặc \"2026-05-03 14:00\"",
    },
    "col.start": {"en": "Start", "vi": "Bắt đầu"},
    "col.end": {"en": "End", "vi": "Kết thúc"},
    "col.broadcast": {"en": "Broadcast id", "vi": "Mã buổi phát"},
    "col.programme": {"en": "Programme", "vi": "Chương trình"},
    "col.priority": {"en": "Priority", "vi": "Mức ưu tiên"},
    "col.source": {"en": "Source", "vi": "Nguồn"},
    "col.by": {"en": "Ordered by", "vi": "Người ra lệnh"},
    "col.targets": {"en": "Targets", "vi": "Nơi phát"},
    "col.reached": {"en": "Reached", "vi": "Đã tới"},
    "col.unreached": {"en": "Not reached", "vi": "Không tới được"},
    "col.outcome": {"en": "Outcome", "vi": "Kết quả"},
    "col.time": {"en": "Time", "vi": "Thời gian"},
    "col.type": {"en": "Event", "vi": "Sự kiện"},
    "col.details": {"en": "Details", "vi": "Chi tiết"},
    "outcome.finished": {"en": "finished", "vi": "xong"},
    "outcome.preempted": {"en": "interrupted", "vi": "bị ngắt"},
    "outcome.failed": {"en": "FAILED", "vi": "LỖI"},
    "outcome.skipped": {"en": "skipped", "vi": "bị bỏ qua"},
    "outcome.stopped": {"en": "stopped", "vi": "bị dừng"},
    "outcome.playing": {"en": "playing", "vi": "đang phát"},
    # ---- cluster note
    "note.saved": {
        "en": "Note saved for {id} ({status}) and queued for the central server.",
        "vi": "Đã lưu ghi chú cho {id} ({status}) và sẽ gửi lên máy chủ trung tâm.",
    },
    "note.damaged": {"en": "damaged", "vi": "hư hỏng"},
    "note.repaired": {"en": "repaired", "vi": "đã sửa xong"},
    "note.note": {"en": "note", "vi": "ghi chú"},
}


def t(key: str, lang: str, **kw: object) -> str:
    """The message for key in lang (English if missing), formatted with kw."""
    entry = CATALOG.get(key)
    if entry is None:
        return key
    text = entry.get(lang) or entry["en"]
    return text.format(**kw) if kw else text


def word(prefix: str, value: str | None, lang: str) -> str:
    """Translate an open-ended code (alarm code, cause, outcome…); unknown ones as given."""
    if value is None:
        return "—"
    key = f"{prefix}.{value}"
    return t(key, lang) if key in CATALOG else value


def _lang_of(value: str | None) -> str | None:
    if not value:
        return None
    return "vi" if value.strip().lower().startswith("vi") else "en"


def detect_lang(explicit: str | None = None, config_lang: str | None = None,
                env: Mapping[str, str] | None = None) -> str:
    """--lang, then LOAXA_LANG, then the site file's site.language, then the locale.

    The site file beats LANG because an SSH session usually carries the laptop's English
    locale while the station's staff read Vietnamese.
    """
    if explicit in LANGS:
        return explicit
    env = os.environ if env is None else env
    if lang := _lang_of(env.get("LOAXA_LANG")):
        return lang
    if config_lang in LANGS:
        return config_lang
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        if lang := _lang_of(env.get(var)):
            return lang
    return "en"

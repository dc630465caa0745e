"""Durable outbox: gapless seq across restarts, durable vs droppable, bounded, acked into the log."""
from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from controller.outbox import Outbox
from controller.store import Store


def _other_connection_rows(path) -> list[int]:
    """What a second process (e.g. after a power cut) would find on disk."""
    c = sqlite3.connect(str(path))
    try:
        return [r[0] for r in c.execute("SELECT seq FROM outbox ORDER BY seq")]
    finally:
        c.close()


def test_seq_starts_at_one_and_is_gapless_across_restarts(state_dir):
    db = state_dir / "state.db"
    ob = Outbox(Store(db))
    first = [ob.append("alarm.test", {"n": i})["seq"] for i in range(5)]
    assert first == [1, 2, 3, 4, 5]
    ob.ack([1, 2, 3, 4, 5])  # delivered: outbox empty, seq lives on in event_log
    ob2 = Outbox(Store(db))
    assert ob2.append("alarm.test", {"n": 5})["seq"] == 6
    # even with the log pruned to nothing, kv last_seq carries the counter
    ob3 = Outbox(Store(db), log_keep=0)
    ob3.ack([6])
    assert ob3.conn.execute("SELECT COUNT(*) FROM event_log").fetchone()[0] == 0
    assert Outbox(Store(db)).append("x.y", {})["seq"] == 7


def test_durable_event_is_on_disk_before_append_returns(state_dir):
    db = state_dir / "state.db"
    ob = Outbox(Store(db))
    ev = ob.append("broadcast.started", {
        "broadcast_id": "b1", "priority": "emergency", "source": {"tts": {"text": "Bão"}},
        "targets": ["fm01"]})
    assert _other_connection_rows(db) == [ev["seq"]]
    assert ev["ts"].endswith("Z") and len(ev["id"]) == 36


def test_droppable_events_are_batched_then_flushed_and_durable_ones_flush_them(state_dir):
    db = state_dir / "state.db"
    ob = Outbox(Store(db))
    ob.append("telemetry.rssi", {"v": 1}, droppable=True)
    ob.append("telemetry.rssi", {"v": 2}, droppable=True)
    assert _other_connection_rows(db) == []  # not yet on the SD card
    assert ob.pending() == []  # never published before it is committed
    assert ob.depth == 2
    ob.append("alarm.test", {})  # keeps seq order on disk: the batch goes first
    assert _other_connection_rows(db) == [1, 2, 3]


def test_unflushed_droppable_seqs_are_reused_after_a_crash_so_no_gap(state_dir):
    db = state_dir / "state.db"
    ob = Outbox(Store(db))
    ob.append("alarm.test", {})
    ob.append("telemetry.rssi", {}, droppable=True)  # lost in the "crash" below
    ob2 = Outbox(Store(db))
    assert ob2.append("alarm.test", {})["seq"] == 2
    assert [e["seq"] for e in ob2.pending()] == [1, 2]


def test_flush_timer_commits_droppable_on_a_running_loop(state_dir):
    db = state_dir / "state.db"

    async def main():
        ob = Outbox(Store(db), flush_interval_s=0.05)
        committed = asyncio.Event()
        ob.add_listener(committed.set)
        ob.append("telemetry.rssi", {}, droppable=True)
        await asyncio.wait_for(committed.wait(), 2)
        return ob

    asyncio.run(main())
    assert _other_connection_rows(db) == [1]


def test_full_outbox_drops_only_droppable_oldest_first_and_reports(state_dir):
    ob = Outbox(Store(state_dir / "s.db"), max_rows=10, batch_max=1)
    for _ in range(4):
        ob.append("alarm.test", {})  # seq 1-4 durable
    for _ in range(10):
        ob.append("telemetry.rssi", {}, droppable=True)  # seq 5-14
    # 14 rows (+1 durable drop report) > 10: the oldest droppable ones went, durable stayed
    rows = ob.pending(100)
    seqs = [e["seq"] for e in rows]
    assert len(rows) == 10 and seqs[:4] == [1, 2, 3, 4]
    n = ob.dropped_total
    assert n == 5
    assert not set(range(5, 5 + n)) & set(seqs)  # oldest first
    assert set(range(5 + n, 15)) <= set(seqs)
    report = [e for e in rows if e["type"] == "gateway.outbox_dropped"]
    assert len(report) == 1 and report[0]["first_seq"] == 5  # one report per interval
    ob.close()  # at shutdown the rest of the dropped range is reported too
    reports = [e for e in ob.pending(100) if e["type"] == "gateway.outbox_dropped"]
    assert len(reports) == 2 and reports[1]["total"] == ob.dropped_total
    assert reports[1]["last_seq"] == 4 + n


def test_never_drops_durable_events_even_beyond_the_bound(state_dir):
    ob = Outbox(Store(state_dir / "s.db"), max_rows=3)
    for _ in range(6):
        ob.append("alarm.test", {})
    assert [e["seq"] for e in ob.pending(100)] == [1, 2, 3, 4, 5, 6]
    assert ob.dropped_total == 0


def test_ack_moves_to_bounded_event_log_and_query(state_dir):
    ob = Outbox(Store(state_dir / "s.db"), log_keep=3)
    for i in range(5):
        ob.append("alarm.test" if i % 2 else "config.loaded",
                  {"hash": "a" * 64} if i % 2 == 0 else {"n": i})
    assert ob.depth == 5
    assert ob.ack([1, 2, 3]) == 3 and ob.depth == 2
    assert ob.ack([1]) == 0  # a duplicate PUBACK is harmless
    ob.ack([4, 5])
    logged = [r[0] for r in ob.conn.execute("SELECT seq FROM event_log ORDER BY seq")]
    assert logged == [3, 4, 5]
    events, truncated = ob.query_log("2000-01-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z",
                                     "config.", limit=1)
    assert [e["seq"] for e in events] == [3] and truncated
    assert json.loads(ob.conn.execute("SELECT payload FROM event_log WHERE seq=5")
                      .fetchone()[0])["type"] == "config.loaded"


def test_invalid_bodies_are_refused_without_using_a_seq(state_dir):
    ob = Outbox(Store(state_dir / "s.db"))
    with pytest.raises(ValueError):
        ob.append("alarm.raised", {"code": "cluster.offline"})  # missing fields
    with pytest.raises(ValueError):
        ob.append("x.y", {"seq": 5})
    assert ob.append("x.y", {})["seq"] == 1


def test_memory_stays_bounded_while_the_disk_refuses_writes(state_dir):
    """Disk full / read-only for a long time: buffered telemetry is shed past the bound,
    durable events are kept in memory for when the disk comes back."""
    path = state_dir / "s.db"
    Store(path).close()
    ro = Store.__new__(Store)
    ro.path = path
    ro.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    ob = Outbox(ro, max_rows=10, batch_max=10_000)
    for _ in range(30):
        ob.append("telemetry.rssi", {}, droppable=True)  # buffered (no loop: no timer flush)
    with pytest.raises(sqlite3.OperationalError):
        ob.append("alarm.test", {})  # a durable append flushes, and the disk refuses
    assert len(ob._buffer) == 10
    assert ob.dropped_total == 21  # 31 rows, 10 kept: the durable one and the 9 newest
    assert [r[2] for r in ob._buffer][-1] == "alarm.test"

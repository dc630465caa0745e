"""Durable, bounded, gapless event outbox for the central uplink.

`seq` is the contract's per-site counter: the central server detects loss by a gap, so a
seq is only ever published after its row is committed. Durable events (alarms, broadcast
records, anything not droppable) commit before `append` returns. Droppable
(telemetry-class) events are batched in memory and committed every `flush_interval_s`
to spare the SD card; if the process dies first they were never published, and their
seqs are simply reused after the restart, so no gap appears. When the outbox is full,
only droppable rows are discarded (oldest first) and a durable `gateway.outbox_dropped`
event names the range, so the central server can tell a deliberate drop from a loss.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from controller.contract import compact, rfc3339, validate_event_body

log = structlog.get_logger(__name__)

_ENVELOPE_KEYS = {"id", "seq", "ts", "type", "historical"}


class Outbox:
    """Owned by the event loop thread (sqlite connection of the shared Store)."""

    def __init__(
        self,
        store: Any,
        *,
        max_rows: int = 50000,
        flush_interval_s: float = 0.5,
        batch_max: int = 500,
        log_keep: int = 20000,
        drop_report_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.conn: sqlite3.Connection = store.conn
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self.batch_max = batch_max
        self.log_keep = log_keep
        self.drop_report_interval_s = drop_report_interval_s
        self._clock = clock
        c = self.conn
        last = max(
            c.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0],
            c.execute("SELECT COALESCE(MAX(seq), 0) FROM event_log").fetchone()[0],
            int(store.kv_get("last_seq", 0)),
        )
        self._next_seq = last + 1
        self._db_depth = c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._buffer: list[tuple[int, str, str, str, int, str]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._listeners: list[Callable[[], None]] = []
        self.dropped_total = 0
        self._unreported: list[int] | None = None  # [first_seq, last_seq, count]
        self._last_drop_report = -1e18
        self._reporting = False

    # ------------------------------------------------------------ writing
    @property
    def last_seq(self) -> int:
        """Highest seq assigned so far (committed or buffered)."""
        return self._next_seq - 1

    @property
    def depth(self) -> int:
        return self._db_depth + len(self._buffer)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """`fn()` runs after every commit that added rows (the uplink wakes its pump)."""
        self._listeners.append(fn)

    def append(self, type_: str, body: dict | None = None, *, droppable: bool = False) -> dict:
        """Assign the next seq and queue the event; durable ones are on disk on return."""
        body = validate_event_body(type_, dict(body or {}))
        clash = _ENVELOPE_KEYS & body.keys()
        if clash:
            raise ValueError(f"event body may not set {sorted(clash)}")
        seq = self._next_seq
        event = {"id": str(uuid.uuid4()), "seq": seq, "ts": rfc3339(), "type": type_, **body}
        row = (seq, event["id"], type_, event["ts"], int(droppable), compact(event).decode())
        self._next_seq += 1
        self._buffer.append(row)
        if not droppable or len(self._buffer) >= self.batch_max:
            self.flush()
        else:
            self._schedule_flush()
        return event

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next durable append or an explicit flush() commits
        self._flush_handle = loop.call_later(self.flush_interval_s, self.flush)

    def flush(self) -> None:
        """Commit buffered rows in one transaction, evicting droppable rows if full."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buffer:
            return
        rows, c = self._buffer, self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                "INSERT INTO outbox(seq, id, type, ts, droppable, payload) VALUES (?,?,?,?,?,?)",
                rows,
            )
            depth = self._db_depth + len(rows)
            evicted: list[int] = []
            if depth > self.max_rows and not self._reporting:  # a report never causes a drop
                evicted = [r[0] for r in c.execute(
                    "SELECT seq FROM outbox WHERE droppable=1 ORDER BY seq LIMIT ?",
                    (depth - self.max_rows,),
                )]
                c.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in evicted])
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
                c.execute("ROLLBACK")
            self._trim_buffer()
            raise  # rows stay buffered; their seqs stay reserved for the retry
        self._buffer = []
        self._db_depth = depth - len(evicted)
        if evicted:
            self._note_drops(evicted)
        for fn in list(self._listeners):
            fn()
        self._maybe_report_drops()

    def _trim_buffer(self) -> None:
        """While the disk refuses writes, rows wait in memory; past max_rows the oldest
        droppable ones are shed (as a full outbox does), never durable ones."""
        excess = len(self._buffer) - self.max_rows
        if excess <= 0:
            return
        shed = {r[0] for r in self._buffer if r[4]}
        shed = set(sorted(shed)[:excess])
        if shed:
            self._buffer = [r for r in self._buffer if r[0] not in shed]
            self._note_drops(sorted(shed))

    def _note_drops(self, seqs: list[int]) -> None:
        self.dropped_total += len(seqs)
        if self._unreported is None:
            self._unreported = [seqs[0], seqs[-1], 0]
        u = self._unreported
        u[0], u[1], u[2] = min(u[0], seqs[0]), max(u[1], seqs[-1]), u[2] + len(seqs)
        log.warning("outbox_full_dropped", dropped=len(seqs), total=self.dropped_total,
                    depth=self._db_depth)

    def _maybe_report_drops(self, force: bool = False) -> None:
        if self._unreported is None:
            return
        now = self._clock()
        if not force and now - self._last_drop_report < self.drop_report_interval_s:
            return
        first, last, count = self._unreported
        self._unreported = None
        self._last_drop_report = now
        self._reporting = True
        try:
            self.append("gateway.outbox_dropped", {
                "dropped": count, "first_seq": first, "last_seq": last,
                "total": self.dropped_total,
            })
        finally:
            self._reporting = False

    def close(self) -> None:
        self.flush()
        self._maybe_report_drops(force=True)

    # ------------------------------------------------------------ reading / acking
    def pending_raw(self, limit: int = 100, after_seq: int = 0) -> list[tuple[int, str]]:
        """Committed, unacknowledged (seq, payload JSON) in seq order."""
        return self.conn.execute(
            "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[dict]:
        return [json.loads(p) for _, p in self.pending_raw(limit, after_seq)]

    def ack(self, seqs: int | Iterable[int]) -> int:
        """Remove delivered events (one transaction) and keep them in the bounded event_log."""
        items = [(seqs,)] if isinstance(seqs, int) else [(s,) for s in seqs]
        if not items:
            return 0
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                "INSERT OR REPLACE INTO event_log(seq, type, ts, payload) "
                "SELECT seq, type, ts, payload FROM outbox WHERE seq=?", items)
            before = c.total_changes
            c.executemany("DELETE FROM outbox WHERE seq=?", items)
            removed = c.total_changes - before
            top = c.execute("SELECT COALESCE(MAX(seq), 0) FROM event_log").fetchone()[0]
            c.execute("DELETE FROM event_log WHERE seq <= ?", (top - self.log_keep,))
            self.store.kv_set("last_seq", max(top, int(self.store.kv_get("last_seq", 0))))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
                c.execute("ROLLBACK")
            raise
        self._db_depth -= removed
        return removed

    def query_log(self, from_ts: str, to_ts: str, type_: str | None = None,
                  limit: int = 200) -> tuple[list[dict], bool]:
        """Events with from_ts <= ts <= to_ts from the log and the outbox, by seq (bounded)."""
        self.flush()
        where, args = "ts >= ? AND ts <= ?", [from_ts, to_ts]
        if type_:
            if type_.endswith("."):
                where += " AND substr(type, 1, ?) = ?"
                args += [len(type_), type_]
            else:
                where += " AND type = ?"
                args.append(type_)
        sql = (f"SELECT seq, payload FROM event_log WHERE {where} UNION "
               f"SELECT seq, payload FROM outbox WHERE {where} ORDER BY seq LIMIT ?")
        rows = self.conn.execute(sql, [*args, *args, limit + 1]).fetchall()
        return [json.loads(p) for _, p in rows[:limit]], len(rows) > limit

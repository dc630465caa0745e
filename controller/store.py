"""The one SQLite file in the state directory.

WAL with synchronous=FULL: the outbox, broadcast log, alarms, central schedules and
the replay cache must survive a power cut. Telemetry never lands here (SD card).
Schema changes are numbered migrations applied in one transaction each.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE kv (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        -- durable uplink outbox: seq is the contract's gapless per-site sequence
        CREATE TABLE outbox (
            seq      INTEGER PRIMARY KEY,
            id       TEXT NOT NULL UNIQUE,
            type     TEXT NOT NULL,
            ts       TEXT NOT NULL,
            droppable INTEGER NOT NULL DEFAULT 0,
            payload  TEXT NOT NULL
        );
        -- local event log kept after delivery, for log.query / loaxa log (bounded)
        CREATE TABLE event_log (
            seq      INTEGER PRIMARY KEY,
            type     TEXT NOT NULL,
            ts       TEXT NOT NULL,
            payload  TEXT NOT NULL
        );
        CREATE INDEX event_log_ts ON event_log(ts);
        CREATE TABLE broadcast_log (
            broadcast_id TEXT PRIMARY KEY,
            programme_id TEXT,
            title        TEXT,
            priority     TEXT NOT NULL,
            source       TEXT NOT NULL,
            ordered_by   TEXT NOT NULL,
            targets      TEXT NOT NULL,
            reached      TEXT NOT NULL DEFAULT '[]',
            unreached    TEXT NOT NULL DEFAULT '[]',
            started_at   TEXT,
            ended_at     TEXT,
            outcome      TEXT
        );
        CREATE INDEX broadcast_log_started ON broadcast_log(started_at);
        CREATE TABLE alarms (
            alarm_id   TEXT PRIMARY KEY,
            code       TEXT NOT NULL,
            cluster_id TEXT,
            active     INTEGER NOT NULL,
            raised_at  TEXT NOT NULL,
            cleared_at TEXT,
            payload    TEXT NOT NULL
        );
        CREATE INDEX alarms_active ON alarms(active, code, cluster_id);
        CREATE TABLE central_schedule (
            programme_id TEXT PRIMARY KEY,
            payload      TEXT NOT NULL,
            updated_at   TEXT NOT NULL
        );
        CREATE TABLE replay_cache (
            request_id TEXT PRIMARY KEY,
            seen_at    REAL NOT NULL
        );
        CREATE TABLE maintenance_notes (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            cluster_id TEXT NOT NULL,
            status     TEXT NOT NULL,
            cause      TEXT,
            text       TEXT,
            by         TEXT,
            ts         TEXT NOT NULL
        );
        """,
    ),
]


class StoreError(Exception):
    """The state database cannot be opened or written (disk full, read-only, corrupt)."""


class Store:
    """Thin owner of the sqlite3 connection; used only from the event loop thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=5.0)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from e

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        current = self.schema_version
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _statements(sql):
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {version}")
                self.conn.execute("COMMIT")
            except Exception:
                self.conn.execute("ROLLBACK")
                raise

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"

    # --- small key/value store for counters (session, boot ids, ...) ---
    def kv_get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def kv_set(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT INTO kv(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, json.dumps(value)),
        )

    def kv_incr(self, key: str) -> int:
        """Atomically increment a counter and return the new value (e.g. MQTT session)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            n = int(self.kv_get(key, 0)) + 1
            self.kv_set(key, n)
            self.conn.execute("COMMIT")
        except Exception:
            self.conn.execute("ROLLBACK")
            raise
        return n

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass


def _statements(sql: str) -> list[str]:
    out, buf = [], []
    for line in sql.splitlines():
        stripped = line.strip()
        if stripped.startswith("--") or not stripped:
            continue
        buf.append(line)
        if stripped.endswith(";"):
            out.append("\n".join(buf))
            buf = []
    if buf:
        out.append("\n".join(buf))
    return out

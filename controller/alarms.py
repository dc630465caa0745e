"""Alarm lifecycle: one active alarm per (code, cluster), persisted, debounced, quiet.

The central operator dispatches repair crews from these alarms, so the rules favour
few, stable messages: an alarm is raised once and then *refined* in place (same
alarm_id); `alarm.raised` is emitted again only when the diagnosis materially changes
(cause, severity or incident), never for evidence wording alone. Active alarms live in
the store's `alarms` table and are loaded at start, so a restart neither forgets nor
re-raises them. Level-triggered callers use `condition_on`/`condition_off`, which apply
per-code hysteresis (`raise_after_s`, `clear_after_s`) so a flapping input does not
produce a flapping alarm. Bodies of emitted events are exactly the contract's alarm
object (controller.contract.Alarm).
"""
from __future__ import annotations

import json
import re
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from controller.contract import CLUSTER_CAUSES, rfc3339

log = structlog.get_logger(__name__)

SEVERITIES = ("critical", "major", "minor", "warning")
MAX_EVIDENCE = 12
MAX_EVIDENCE_CHARS = 200
CONFIRMED_KEY = "alarms.confirmed"  # kv: {alarm_id: technician} (not part of the wire object)
_CODE_RE = re.compile(r"^[a-z]+\.[a-z_]+$")

Emit = Callable[[str, dict], Any]


class Hysteresis(BaseModel):
    """How long a condition must hold before its alarm is raised, and how long it must
    be gone before the alarm is cleared."""

    model_config = ConfigDict(extra="forbid")
    raise_after_s: float = Field(0.0, ge=0)
    clear_after_s: float = Field(0.0, ge=0)


class UnknownAlarm(KeyError):
    """`ack` of an alarm id this gateway never raised (or pruned long ago)."""


@dataclass
class _Pending:
    since: float
    details: dict


def _ts(t: float) -> str:
    return rfc3339(datetime.fromtimestamp(t, UTC))


def _clip(evidence: list[str]) -> list[str]:
    items = [str(e)[:MAX_EVIDENCE_CHARS] for e in evidence]
    if len(items) > MAX_EVIDENCE:
        items = items[: MAX_EVIDENCE - 1] + items[-1:]
    return items


class AlarmManager:
    """Owns active alarms; used only from the event loop thread."""

    def __init__(self, store, emit: Emit, clock: Callable[[], float], *,
                 hysteresis: Mapping[str, Hysteresis] | None = None,
                 default_hysteresis: Hysteresis | None = None,
                 on_change: Callable[[list[dict]], Any] | None = None,
                 keep_cleared: int = 500) -> None:
        self.store = store
        self.emit = emit
        self.clock = clock
        self.hysteresis: dict[str, Hysteresis] = dict(hysteresis or {})
        self.default_hysteresis = default_hysteresis or Hysteresis()
        self.on_change = on_change
        self.keep_cleared = keep_cleared
        self._active: dict[tuple[str, str | None], dict] = {}
        self._pending_on: dict[tuple[str, str | None], _Pending] = {}
        self._pending_off: dict[tuple[str, str | None], _Pending] = {}
        self._confirmed: dict[str, str] = dict(store.kv_get(CONFIRMED_KEY, {}) or {})
        self._load()

    # ------------------------------------------------------------------ queries
    def active(self) -> list[dict]:
        return sorted((self._copy(a) for a in self._active.values()),
                      key=lambda a: (a["raised_at"], a["alarm_id"]))

    def get(self, code: str, cluster_id: str | None = None) -> dict | None:
        a = self._active.get((code, cluster_id))
        return None if a is None else self._copy(a)

    def for_cluster(self, cluster_id: str) -> list[dict]:
        return [a for a in self.active() if a.get("cluster_id") == cluster_id]

    def is_confirmed(self, code: str, cluster_id: str | None) -> bool:
        a = self._active.get((code, cluster_id))
        return a is not None and a["alarm_id"] in self._confirmed

    # ------------------------------------------------------------------ immediate
    def raise_(self, code: str, cluster_id: str | None, severity: str, cause: str,
               confidence: float, evidence: list[str], incident_id: str | None = None, *,
               confirmed_by: str | None = None, remind: bool = False) -> dict:
        """Raise, or refine the active alarm for (code, cluster_id).

        A refinement emits `alarm.raised` (same alarm_id) only if cause, severity or
        incident changed — or, with ``remind``, if the evidence changed (daily
        reminders). An alarm confirmed by a technician keeps its cause and evidence
        until a call that is itself confirmed. A set incident id is never removed.
        """
        self._validate(code, cluster_id, severity, cause, confidence, evidence)
        key = (code, cluster_id)
        self._pending_on.pop(key, None)
        self._pending_off.pop(key, None)
        cur = self._active.get(key)
        if cur is None:
            a = {"alarm_id": str(uuid.uuid4()), "code": code, "severity": severity,
                 "cluster_id": cluster_id, "cause": cause,
                 "confidence": round(float(confidence), 2), "evidence": _clip(evidence),
                 "raised_at": _ts(self.clock()), "incident_id": incident_id}
            a = {k: v for k, v in a.items() if v is not None}
            self._persist(a, insert=True, confirmed_by=confirmed_by)
            self._active[key] = a
            log.info("alarm raised", code=code, cluster=cluster_id, cause=cause)
            self.emit("alarm.raised", self._copy(a))
            self._changed()
            return self._copy(a)
        if cur["alarm_id"] in self._confirmed and confirmed_by is None:
            return self._copy(cur)
        new = dict(cur, severity=severity, cause=cause, confidence=round(float(confidence), 2),
                   evidence=_clip(evidence))
        if incident_id or cur.get("incident_id"):
            new["incident_id"] = incident_id or cur["incident_id"]
        if new == cur and not (confirmed_by and cur["alarm_id"] not in self._confirmed):
            return self._copy(cur)
        material = any(new.get(k) != cur.get(k) for k in ("cause", "severity", "incident_id"))
        if remind and new["evidence"] != cur["evidence"]:
            material = True
        self._persist(new, insert=False, confirmed_by=confirmed_by)
        self._active[key] = new
        if material:
            log.info("alarm refined", code=code, cluster=cluster_id, cause=cause)
            self.emit("alarm.raised", self._copy(new))
        self._changed()
        return self._copy(new)

    def clear(self, code: str, cluster_id: str | None = None, note: str | None = None, *,
              cause: str | None = None) -> dict | None:
        """Clear the active alarm (if any); ``note`` is appended to its evidence and
        ``cause`` may give the final diagnosis (e.g. a healed outage is `link_loss`)."""
        key = (code, cluster_id)
        self._pending_on.pop(key, None)
        self._pending_off.pop(key, None)
        cur = self._active.get(key)
        if cur is None:
            return None
        new = dict(cur, cleared_at=_ts(self.clock()))
        if note:
            new["evidence"] = _clip([*cur["evidence"], note])
        if cause:
            self._validate(code, cluster_id, cur["severity"], cause, 0.0, [])
            new["cause"] = cause
        self._persist(new, insert=False, active=False)
        del self._active[key]
        log.info("alarm cleared", code=code, cluster=cluster_id, cause=new["cause"])
        self.emit("alarm.cleared", self._copy(new))
        self._changed()
        return self._copy(new)

    def ack(self, alarm_id: str, by: str) -> dict:
        """Record who acknowledged; idempotent for the same person. Cleared alarms can
        still be acknowledged (the operator may be late)."""
        if not isinstance(by, str) or not by.strip():
            raise ValueError("ack needs the name of who acknowledges (by)")
        key = next((k for k, a in self._active.items() if a["alarm_id"] == alarm_id), None)
        if key is not None:
            cur, active = self._active[key], True
        else:
            row = self.store.conn.execute(
                "SELECT payload FROM alarms WHERE alarm_id=?", (alarm_id,)).fetchone()
            if row is None:
                raise UnknownAlarm(alarm_id)
            cur, active = json.loads(row[0]), False
        if cur.get("acknowledged_by") == by:
            return self._copy(cur)
        new = dict(cur, acknowledged_by=by)
        self._persist(new, insert=False, active=active)
        if active:
            self._active[key] = new
        self.emit("alarm.acknowledged", self._copy(new))
        if active:
            self._changed()
        return self._copy(new)

    # ------------------------------------------------------------------ debounced
    def condition_on(self, code: str, cluster_id: str | None, *, severity: str, cause: str,
                     confidence: float, evidence: list[str], incident_id: str | None = None,
                     remind: bool = False) -> dict | None:
        """The condition behind ``code`` holds now (level-triggered: call it again with
        every reading). Raises once it has held ``raise_after_s``; refines an active alarm
        at once and cancels a pending clear."""
        key = (code, cluster_id)
        self._pending_off.pop(key, None)
        details = dict(severity=severity, cause=cause, confidence=confidence,
                       evidence=list(evidence), incident_id=incident_id)
        if key in self._active:
            return self.raise_(code, cluster_id, **details, remind=remind)
        self._validate(code, cluster_id, severity, cause, confidence, evidence)
        now = self.clock()
        p = self._pending_on.get(key)
        if p is None:
            p = self._pending_on[key] = _Pending(now, details)
        else:
            p.details = details
        if now - p.since >= self._hyst(code).raise_after_s:
            return self.raise_(code, cluster_id, **details)
        return None

    def condition_off(self, code: str, cluster_id: str | None, *, note: str | None = None,
                      cause: str | None = None) -> dict | None:
        """The condition no longer holds. Clears once it has stayed off ``clear_after_s``
        (the latest note/cause win). Technician-confirmed alarms ignore this."""
        key = (code, cluster_id)
        self._pending_on.pop(key, None)
        cur = self._active.get(key)
        if cur is None or cur["alarm_id"] in self._confirmed:
            self._pending_off.pop(key, None)
            return None
        now = self.clock()
        p = self._pending_off.get(key)
        if p is None:
            p = self._pending_off[key] = _Pending(now, {"note": note, "cause": cause})
        else:
            p.details = {"note": note, "cause": cause}
        if now - p.since >= self._hyst(code).clear_after_s:
            return self.clear(code, cluster_id, **p.details)
        return None

    def pending(self, code: str, cluster_id: str | None = None) -> str | None:
        """'raise' or 'clear' when a debounced change is waiting, else None."""
        key = (code, cluster_id)
        return "raise" if key in self._pending_on else "clear" if key in self._pending_off else None

    def tick(self) -> None:
        """Promote debounced changes whose time has come (call on every clock tick)."""
        now = self.clock()
        for (code, cid), p in list(self._pending_on.items()):
            if now - p.since >= self._hyst(code).raise_after_s:
                self.raise_(code, cid, **p.details)
        for (code, cid), p in list(self._pending_off.items()):
            if now - p.since >= self._hyst(code).clear_after_s:
                self.clear(code, cid, **p.details)

    def shift_timers(self, delta_s: float) -> None:
        """The wall clock stepped by ``delta_s``: keep pending timers' elapsed time."""
        for p in (*self._pending_on.values(), *self._pending_off.values()):
            p.since += delta_s

    # ------------------------------------------------------------------ internals
    def _hyst(self, code: str) -> Hysteresis:
        return self.hysteresis.get(code, self.default_hysteresis)

    @staticmethod
    def _copy(a: dict) -> dict:
        return {**a, "evidence": list(a.get("evidence", []))}

    @staticmethod
    def _validate(code, cluster_id, severity, cause, confidence, evidence) -> None:
        if not isinstance(code, str) or not _CODE_RE.match(code):
            raise ValueError(f"alarm code {code!r}: expected 'area.name' in lower case")
        if cluster_id is not None and (not isinstance(cluster_id, str) or not cluster_id):
            raise ValueError(f"cluster_id must be a non-empty string or None (got {cluster_id!r})")
        if severity not in SEVERITIES:
            raise ValueError(f"severity {severity!r}: allowed {', '.join(SEVERITIES)}")
        if cluster_id is not None and cause not in CLUSTER_CAUSES:
            raise ValueError(f"cause {cause!r}: allowed {', '.join(CLUSTER_CAUSES)}")
        if not isinstance(cause, str) or not cause:
            raise ValueError("cause must be a non-empty string")
        if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
                or not 0 <= confidence <= 1:
            raise ValueError(f"confidence must be 0..1 (got {confidence!r})")
        if isinstance(evidence, str) or not all(isinstance(e, str) for e in evidence):
            raise ValueError("evidence must be a list of strings")

    def _persist(self, a: dict, *, insert: bool, active: bool = True,
                 confirmed_by: str | None = None) -> None:
        """One transaction per change; memory is updated only after it commits."""
        conn = self.store.conn
        confirmed = dict(self._confirmed)
        if confirmed_by:
            confirmed[a["alarm_id"]] = confirmed_by
        if not active:
            confirmed.pop(a["alarm_id"], None)
        payload = json.dumps(a, separators=(",", ":"), ensure_ascii=False)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if insert:
                conn.execute(
                    "INSERT INTO alarms(alarm_id, code, cluster_id, active, raised_at, "
                    "cleared_at, payload) VALUES(?,?,?,?,?,?,?)",
                    (a["alarm_id"], a["code"], a.get("cluster_id"), int(active),
                     a["raised_at"], a.get("cleared_at"), payload))
            else:
                conn.execute("UPDATE alarms SET active=?, cleared_at=?, payload=? "
                             "WHERE alarm_id=?",
                             (int(active), a.get("cleared_at"), payload, a["alarm_id"]))
            if not active:
                conn.execute(
                    "DELETE FROM alarms WHERE active=0 AND alarm_id NOT IN (SELECT alarm_id "
                    "FROM alarms WHERE active=0 ORDER BY cleared_at DESC LIMIT ?)",
                    (self.keep_cleared,))
            if confirmed != self._confirmed:
                self.store.kv_set(CONFIRMED_KEY, confirmed)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            # disk full / read-only: the alarm still lives in memory and on the retained
            # alarms topic; losing the alarm because the disk failed would hide the failure
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("alarm not stored", code=a.get("code"), error=str(e))
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._confirmed = confirmed

    def _load(self) -> None:
        rows = self.store.conn.execute(
            "SELECT alarm_id, payload FROM alarms WHERE active=1 ORDER BY raised_at, rowid"
        ).fetchall()
        for alarm_id, payload in rows:
            try:
                a = json.loads(payload)
                key = (a["code"], a.get("cluster_id"))
            except (ValueError, KeyError, TypeError):
                log.error("unreadable alarm row skipped", alarm_id=alarm_id)
                continue
            old = self._active.get(key)
            if old is not None:  # should not happen; keep the newest, retire the other
                log.warning("duplicate active alarm retired", code=key[0], cluster=key[1],
                            alarm_id=old["alarm_id"])
                self._persist(dict(old, cleared_at=_ts(self.clock())), insert=False,
                              active=False)
            self._active[key] = a
        stale = {k: v for k, v in self._confirmed.items()
                 if k in {a["alarm_id"] for a in self._active.values()}}
        if stale != self._confirmed:
            self.store.kv_set(CONFIRMED_KEY, stale)
            self._confirmed = stale

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(self.active())
        except Exception:
            log.exception("alarm on_change hook failed")

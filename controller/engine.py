"""Broadcast arbitration: one programme per cluster, emergency first.

The FM carrier is one audio channel shared by every FM cluster, so any broadcast
with FM targets needs the "air"; each IP cluster is its own resource. A request
that collides with running broadcasts of lower priority preempts them at once
(the emergency must be on air within a second); otherwise it waits in a queue up
to its own patience, then is skipped. A cut `priority` programme may be rerun or
resumed afterwards, per its programme setting.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from controller.config import PRIORITY_RANK

log = structlog.get_logger("loaxa.engine")

AIR = "@air"


@dataclasses.dataclass
class Request:
    priority: str
    source: Any                      # controller.config.Source
    targets: list[str]               # resolved, enabled cluster ids
    ordered_by: str                  # "schedule", "central:<request_id>", "local:<user>"
    programme_id: str | None = None
    title: str = ""
    volume: int | None = None
    max_duration_s: float = 1800.0
    resume: str = "none"             # none | resume | rerun
    patience_s: float = 0.0          # how long it may wait for busy clusters
    skipped: list[str] = dataclasses.field(default_factory=list)  # disabled targets
    scheduled_at: dt.datetime | None = None
    offset_s: float = 0.0            # resume point


@dataclasses.dataclass
class Broadcast:
    id: str
    req: Request
    resources: frozenset[str]
    state: str = "queued"            # queued | on_air | ended
    outcome: str | None = None       # finished | preempted | stopped | failed | skipped
    reason: str | None = None
    preempted_by: str | None = None
    played_s: float = 0.0
    task: asyncio.Task | None = None
    done: asyncio.Future | None = None
    seq: int = 0
    # filled by the broadcast runner
    reached: list[str] = dataclasses.field(default_factory=list)
    unreached: list[dict] = dataclasses.field(default_factory=list)
    started_at: str | None = None
    ended_at: str | None = None
    ip_stream: Any = None
    fm_release_msgs: list | None = None

    @property
    def rank(self) -> int:
        return PRIORITY_RANK[self.req.priority]


class Busy(Exception):
    def __init__(self, blockers: list[Broadcast]):
        self.blockers = blockers
        super().__init__("busy: " + ", ".join(f"{b.id} ({b.req.priority})" for b in blockers))


Runner = Callable[[Broadcast], Awaitable[None]]


class Engine:
    """Owns who is on air. `runner(broadcast)` does the work and is cancelled on preempt/stop."""

    def __init__(self, runner: Runner, *, fm_clusters: set[str], on_skip: Callable[[Broadcast], None],
                 on_preempted: Callable[[Broadcast, Broadcast], None] | None = None) -> None:
        self.runner = runner
        self.fm_clusters = fm_clusters
        self.on_skip = on_skip
        self.on_preempted = on_preempted
        self.active: dict[str, Broadcast] = {}
        self.queue: list[Broadcast] = []
        self._counter = itertools.count(1)
        self._wake = asyncio.Event()

    def resources_for(self, targets: list[str]) -> frozenset[str]:
        res = {t for t in targets if t not in self.fm_clusters}
        if any(t in self.fm_clusters for t in targets):
            res.add(AIR)
        return frozenset(res)

    def blockers(self, b: Broadcast) -> list[Broadcast]:
        return [a for a in self.active.values() if a.resources & b.resources]

    def submit(self, req: Request) -> Broadcast:
        """Start now (preempting lower priorities), queue, or raise Busy if it may not wait."""
        b = Broadcast(id=_new_id(), req=req, resources=self.resources_for(req.targets),
                      seq=next(self._counter))
        b.done = asyncio.get_running_loop().create_future()
        blockers = self.blockers(b)
        if not blockers:
            self._start(b)
        elif all(x.rank < b.rank for x in blockers):
            for x in blockers:
                self._preempt(x, by=b)
            self._start(b)
        elif req.patience_s > 0:
            self.queue.append(b)
            asyncio.get_running_loop().call_later(req.patience_s, self._expire, b)
        else:
            raise Busy(blockers)
        return b

    def stop(self, broadcast_id: str | None = None) -> list[str]:
        """Stop one broadcast (or all, with None); queued ones are dropped too."""
        stopped = []
        for b in list(self.active.values()):
            if broadcast_id in (None, b.id):
                b.outcome, b.reason = "stopped", "stop requested"
                b.task.cancel()
                stopped.append(b.id)
        for b in list(self.queue):
            if broadcast_id in (None, b.id):
                self.queue.remove(b)
                b.outcome, b.reason, b.state = "skipped", "stopped before it started", "ended"
                self.on_skip(b)
                _resolve(b)
                stopped.append(b.id)
        return stopped

    def _start(self, b: Broadcast) -> None:
        b.state = "on_air"
        self.active[b.id] = b
        b.task = asyncio.get_running_loop().create_task(self._wrap(b), name=f"broadcast-{b.id}")
        # a task cancelled before its first step never runs its body: finish from here
        b.task.add_done_callback(lambda _t, b=b: self._finish(b))

    def _preempt(self, victim: Broadcast, *, by: Broadcast) -> None:
        log.info("preempting", victim=victim.id, by=by.id, priority=by.req.priority)
        victim.outcome, victim.reason, victim.preempted_by = "preempted", f"preempted by {by.req.priority} broadcast {by.id}", by.id
        # free its resources now: the preemptor must not wait for the victim's clean-up
        self.active.pop(victim.id, None)
        victim.task.cancel()
        if self.on_preempted:
            self.on_preempted(victim, by)
        if victim.req.resume in ("rerun", "resume") and victim.req.priority != "normal":
            again = dataclasses.replace(
                victim.req, patience_s=max(victim.req.max_duration_s, 3600.0),
                offset_s=(victim.req.offset_s + victim.played_s) if victim.req.resume == "resume" else 0.0,
            )
            nb = Broadcast(id=_new_id(), req=again, resources=victim.resources, seq=next(self._counter))
            nb.done = asyncio.get_running_loop().create_future()
            self.queue.append(nb)
            asyncio.get_running_loop().call_later(again.patience_s, self._expire, nb)

    async def _wrap(self, b: Broadcast) -> None:
        try:
            await self.runner(b)
            if b.outcome is None:
                b.outcome = "finished"
        except asyncio.CancelledError:
            if b.outcome is None:
                b.outcome, b.reason = "stopped", "cancelled"
        except Exception as e:
            log.exception("broadcast failed", broadcast=b.id)
            b.outcome, b.reason = "failed", f"{type(e).__name__}: {e}"

    def _finish(self, b: Broadcast) -> None:
        if b.outcome is None:
            b.outcome, b.reason = "stopped", "cancelled"
        b.state = "ended"
        if self.active.get(b.id) is b:
            del self.active[b.id]
        _resolve(b)
        self._dispatch_queue()

    def _dispatch_queue(self) -> None:
        for b in sorted(self.queue, key=lambda x: (-x.rank, x.seq)):
            if b not in self.queue:
                continue
            blockers = self.blockers(b)
            if not blockers:
                self.queue.remove(b)
                self._start(b)

    def _expire(self, b: Broadcast) -> None:
        if b in self.queue:
            self.queue.remove(b)
            b.state, b.outcome = "ended", "skipped"
            b.reason = "clusters busy with " + ", ".join(
                f"{x.req.programme_id or x.id} ({x.req.priority})" for x in self.blockers(b)) if self.blockers(b) else "waited too long"
            self.on_skip(b)
            _resolve(b)

    async def shutdown(self) -> None:
        self.stop(None)
        tasks = [b.task for b in self.active.values() if b.task]
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)


def _resolve(b: Broadcast) -> None:
    if b.done and not b.done.done():
        b.done.set_result(b.outcome)


def _new_id() -> str:
    return "b-" + uuid.uuid4().hex[:12]

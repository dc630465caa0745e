"""Arbitration rules: one programme per cluster, higher priority preempts, queue and resume."""
from __future__ import annotations

import asyncio

import pytest

from controller.config import Source, TtsSource
from controller.engine import Busy, Engine, Request

FM = {"fm01", "fm02", "fm03"}
SRC = Source(tts=TtsSource(text="x"))


class Harness:
    """A runner that 'plays' for a given time and records what happened, in order."""

    def __init__(self):
        self.log: list[tuple[str, str]] = []
        self.skipped: list[str] = []
        self.engine = Engine(self.run, fm_clusters=FM, on_skip=lambda b: self.skipped.append(b.req.title))

    async def run(self, b):
        self.log.append(("start", b.req.title))
        try:
            step = 0.01
            while b.played_s < b.req.max_duration_s - b.req.offset_s:
                await asyncio.sleep(step)
                b.played_s += step
        finally:
            self.log.append(("end", b.req.title))

    def req(self, title, priority="normal", targets=("fm01",), dur=0.3, **kw):
        return Request(priority=priority, source=SRC, targets=list(targets), ordered_by="test",
                       title=title, max_duration_s=dur, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_emergency_preempts_normal_on_shared_air():
    async def go():
        h = Harness()
        a = h.engine.submit(h.req("news", targets=["fm01"], dur=5))
        await asyncio.sleep(0.05)
        e = h.engine.submit(h.req("storm", "emergency", targets=["fm02", "ip01"], dur=0.1))
        assert await a.done == "preempted" and a.preempted_by == e.id
        assert await e.done == "finished"
        return h
    h = run(go())
    assert h.log[:3] == [("start", "news"), ("start", "storm"), ("end", "news")] or \
        h.log[:3] == [("start", "news"), ("end", "news"), ("start", "storm")]


def test_equal_priority_is_busy_or_queued():
    async def go():
        h = Harness()
        a = h.engine.submit(h.req("a", dur=0.2))
        with pytest.raises(Busy):
            h.engine.submit(h.req("b"))
        c = h.engine.submit(h.req("c", patience_s=2.0, dur=0.05))
        assert await a.done == "finished"
        assert await c.done == "finished"
        d_blocker = h.engine.submit(h.req("long", dur=5))
        d = h.engine.submit(h.req("late", patience_s=0.1))
        assert await d.done == "skipped" and "busy" in d.reason
        h.engine.stop(d_blocker.id)
        assert await d_blocker.done == "stopped"
        return h
    h = run(go())
    assert h.skipped == ["late"]


def test_disjoint_ip_clusters_play_together():
    async def go():
        h = Harness()
        a = h.engine.submit(h.req("a", targets=["ip01"], dur=0.1))
        b = h.engine.submit(h.req("b", targets=["ip02"], dur=0.1))
        assert {a.state, b.state} == {"on_air"}
        await asyncio.gather(a.done, b.done)
    run(go())


def test_cut_priority_programme_reruns_or_resumes_after_emergency():
    async def go():
        h = Harness()
        first = h.engine.submit(h.req("notice", "priority", dur=0.4, resume="resume"))
        await asyncio.sleep(0.15)
        e = h.engine.submit(h.req("storm", "emergency", dur=0.1))
        await e.done
        assert await first.done == "preempted"
        await asyncio.sleep(0.02)
        (again,) = [b for b in h.engine.active.values()]
        assert again.req.title == "notice" and 0.1 <= again.req.offset_s <= 0.25
        assert await again.done == "finished"
        n = h.engine.submit(h.req("music", "normal", dur=1, resume="rerun"))
        await asyncio.sleep(0.05)
        h.engine.submit(h.req("storm2", "emergency", dur=0.05))
        await n.done
        await asyncio.sleep(0.1)
        assert not h.engine.active and not h.engine.queue  # normal programmes are not resumed
        return h
    h = run(go())
    starts = [t for ev, t in h.log if ev == "start"]
    assert starts == ["notice", "storm", "notice", "music", "storm2"]


def test_stop_all():
    async def go():
        h = Harness()
        a = h.engine.submit(h.req("a", targets=["ip01"], dur=5))
        b = h.engine.submit(h.req("b", targets=["fm01"], dur=5))
        assert sorted(h.engine.stop(None)) == sorted([a.id, b.id])
        assert await a.done == "stopped" and await b.done == "stopped"
    run(go())

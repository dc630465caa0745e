"""Scheduled programmes fire early by their lead so the programme starts on its second."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

from controller.config import Programme
from controller.scheduler import EarlyTrigger, ProgrammeScheduler

TZ = ZoneInfo("Asia/Ho_Chi_Minh")


def test_early_trigger_fires_lead_seconds_before_each_run():
    inner = CronTrigger.from_crontab("30 5 * * *", timezone=TZ)
    early = EarlyTrigger(inner, 3.5)
    now = dt.datetime(2026, 11, 27, 5, 0, tzinfo=TZ)
    first = early.get_next_fire_time(None, now)
    assert first == dt.datetime(2026, 11, 27, 5, 29, 56, 500000, tzinfo=TZ)
    second = early.get_next_fire_time(first, first + dt.timedelta(seconds=1))
    assert second == first + dt.timedelta(days=1)
    # inside the lead window the run still counts: 05:29:58 fires for 05:30 today
    late = early.get_next_fire_time(None, dt.datetime(2026, 11, 27, 5, 29, 58, tzinfo=TZ))
    assert late == first


class _Cfg:
    class site:
        timezone = "Asia/Ho_Chi_Minh"
    programmes: list = []


def test_scheduled_time_is_the_programme_time_not_the_fire_time(monkeypatch):
    p = Programme.model_validate({"id": "news", "title": "t", "source": {"tts": {"text": "x"}},
                                  "schedule": {"cron": "0 17 * * *"}, "misfire_grace_s": 60})
    s = ProgrammeScheduler.__new__(ProgrammeScheduler)
    s.tz, s.lead = TZ, (lambda _p: 4.0)
    for fired_at in (dt.datetime(2026, 11, 27, 16, 59, 56, tzinfo=TZ),   # on time (early by the lead)
                     dt.datetime(2026, 11, 27, 17, 0, 40, tzinfo=TZ)):  # late, within the grace
        monkeypatch.setattr("controller.scheduler.dt.datetime", _Frozen(fired_at))
        assert s._scheduled_time(p) == dt.datetime(2026, 11, 27, 17, 0, tzinfo=TZ)


def _Frozen(at):
    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return at.astimezone(tz) if tz else at
    return Frozen

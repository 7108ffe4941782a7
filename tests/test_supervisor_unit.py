"""Unit tests of the supervisor's pure decisions: restart backoff and the engine hang check."""

from __future__ import annotations

from inferencecenter.daemon.supervisor import MAX_BACKOFF_S, ActorProcess, EngineHealth


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    actor = ActorProcess("engine")
    delays = []
    for crashes in range(1, 10):
        actor.crashes_in_a_row = crashes
        delays.append(actor.backoff())
    assert 0.5 <= delays[0] <= 0.625
    assert 1.0 <= delays[1] <= 1.25 and 2.0 <= delays[2] <= 2.5
    assert all(d <= MAX_BACKOFF_S * 1.25 for d in delays)
    assert delays[-1] >= MAX_BACKOFF_S


def test_engine_with_work_and_no_progress_is_hung() -> None:
    health = EngineHealth(heard_at=0.0, progress_at=0.0)
    health.beat(steps=10, pending=2, now=1.0)
    health.beat(steps=10, pending=2, now=20.0)
    assert not health.hung(now=20.0, limit_s=30.0)
    health.beat(steps=10, pending=2, now=40.0)
    assert health.hung(now=40.0, limit_s=30.0)


def test_idle_engine_without_steps_is_not_hung() -> None:
    health = EngineHealth(heard_at=0.0, progress_at=0.0)
    for now in range(1, 100):
        health.beat(steps=5, pending=0, now=float(now))
    assert not health.hung(now=100.0, limit_s=30.0)


def test_silent_engine_is_hung() -> None:
    health = EngineHealth(heard_at=0.0, progress_at=0.0)
    health.beat(steps=1, pending=0, now=1.0)
    assert health.hung(now=40.0, limit_s=30.0)

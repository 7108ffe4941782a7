"""Several models within limits, against one real daemon: `--max-loaded-models 1` swaps models
on demand (the least recently used idle one makes room; with none idle, `unavailable`), and
`--keep-alive` unloads a model nobody uses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from inferencecenter.clients.metrics import MetricsSubscriber
from inferencecenter.daemon.testing import (
    TEST_CLIENTS,
    Daemon,
    RawClient,
    authenticated,
    new_session,
    run_infer,
    start_daemon,
    stop_daemon,
)

from .test_models import GREEDY, LONG, engines, models, models_flags, start_infer

KEEP_ALIVE_S = 8.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("limits")
    flags = models_flags(tmp, "a", "b")
    limits = ["--max-loaded-models", "1", "--keep-alive", str(KEEP_ALIVE_S)]
    running = start_daemon(tmp, *flags, *limits)
    yield running
    assert stop_daemon(running.process) == 0, running.log()


@pytest.fixture
def alice(daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(daemon.endpoint, "alice", TEST_CLIENTS[0].api_key) as client:
        yield client


def model_events(events: MetricsSubscriber, until: tuple[str, str]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    while until not in seen:
        _topic, event = events.receive()
        seen.append((event["kind"], event["model"]))
    return seen


def test_one_model_at_a_time_swaps_on_demand(daemon: Daemon, alice: RawClient) -> None:
    listed = models(alice)
    assert listed["a"]["state"] == "loaded" and listed["b"]["state"] == "available"
    assert set(engines(daemon)) == {"a"}
    with MetricsSubscriber(daemon.metrics_endpoint, ("event.model",), timeout=60) as events:
        on_b = new_session(alice, model="b")  # a is idle: it makes room
        seen = model_events(events, ("loaded", "b"))
    assert seen == [("loading", "b"), ("unloaded", "a"), ("loaded", "b")]
    listed = models(alice)
    assert listed["a"]["state"] == "available" and listed["b"]["state"] == "loaded"
    assert set(engines(daemon)) == {"b"}
    # b generating is not idle: a cannot be loaded now.
    start_infer(alice, on_b, "long", prompt="Tell me a story", params=LONG)
    assert alice.recv_for("long")["op"] == "token"
    refused: dict[str, Any] = alice.request({"op": "create_session", "model": "a"})
    assert refused["op"] == "error" and refused["code"] == "unavailable", refused
    assert "--max-loaded-models 1" in refused["message"]
    _, end = alice.stream("long")
    assert end["finish_reason"] == "length"
    # Idle again: a session of a unloads b; the session of b goes on when b comes back.
    on_a = new_session(alice, model="a")
    assert set(engines(daemon)) == {"a"}
    run_infer(alice, on_a, prompt="Hi", params=GREEDY)
    _, again = run_infer(alice, on_b, prompt=" The end.", params=GREEDY)
    assert again["finish_reason"] == "length" and again["stats"]["cached_tokens"] == 0
    assert models(alice)["b"]["state"] == "loaded"


def test_keep_alive_unloads_an_idle_model(daemon: Daemon, alice: RawClient) -> None:
    loaded = [name for name, model in models(alice).items() if model["state"] == "loaded"]
    assert len(loaded) == 1
    started = time.monotonic()
    with MetricsSubscriber(daemon.metrics_endpoint, ("event.model",), timeout=60) as events:
        _topic, event = events.receive()
    assert event["kind"] == "unloaded" and event["model"] == loaded[0]
    assert event["reason"] == "keep_alive"
    assert time.monotonic() - started < KEEP_ALIVE_S + 3.0
    assert models(alice)[loaded[0]]["state"] == "available"
    assert engines(daemon) == {}

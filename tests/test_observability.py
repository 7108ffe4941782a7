"""Observability: session events on the PUB socket, the Prometheus exporter, request logs,
alert hysteresis."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import zmq

from inferencecenter.actors.monitor import ALERT_REPEAT_S, Alert
from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    free_port,
    new_session,
    run_infer,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import wire


def subscribe(endpoint: str, topic: bytes) -> zmq.Socket[bytes]:
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def wait_subscribed(sub: zmq.Socket[bytes]) -> None:
    """A SUB sees nothing until its subscription reached the PUB: wait for one metrics tick."""
    sub.setsockopt(zmq.SUBSCRIBE, b"metrics")
    while True:
        assert sub.poll(5000), "no metrics within 5 s"
        if sub.recv_multipart()[0] == b"metrics":
            return


def test_session_events_are_published(daemon: Daemon, authed: RawClient) -> None:
    sub = subscribe(daemon.metrics_endpoint, b"event.session")
    try:
        wait_subscribed(sub)
        session_id = new_session(authed)
        authed.request({"op": "close_session", "session_id": session_id})
        kinds = []
        while len(kinds) < 2:
            assert sub.poll(5000), f"events so far: {kinds}"
            topic, body = sub.recv_multipart()
            if topic != b"event.session":
                continue
            event = wire.unpack(body)
            if event["session_id"] == session_id:
                assert "client_id" not in event and isinstance(event["model"], str)
                kinds.append(event["kind"])
        assert kinds == ["created", "closed"]
    finally:
        sub.close()


def test_metrics_carry_daemon_memory_and_kv_usage(daemon: Daemon) -> None:
    sub = subscribe(daemon.metrics_endpoint, b"metrics")
    try:
        assert sub.poll(5000)
        metrics = wire.unpack(sub.recv_multipart()[1])
        assert metrics["daemon"]["rss_mb"] > 100  # the model alone is ~250 MB
        inference = metrics["inference"]
        assert inference["kv_cells_total"] == 4 * 1024
        assert 0 <= inference["kv_cells_used"] <= inference["kv_cells_total"]
        assert isinstance(metrics["gpus"], list)
    finally:
        sub.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of a series over its labels (every model's), or of those with `labels`."""
    pattern = rf"^{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$"
    found = [
        float(value)
        for label_text, value in re.findall(pattern, text, re.MULTILINE)
        if all(f'{key}="{want}"' in label_text for key, want in labels.items())
    ]
    assert found, f"{name} not exported"
    return sum(found)


def test_prometheus_exporter_moves_with_traffic(tmp_path: Path) -> None:
    port = free_port()
    daemon = start_daemon(tmp_path, "--prometheus-port", str(port))
    client = RawClient(daemon.endpoint)
    try:
        before = scrape(port)
        for family in ("counter", "gauge", "histogram"):
            assert re.search(rf"^# TYPE inferencecenter_\w+ {family}$", before, re.MULTILINE)
        tokens_before = sample(before, "inferencecenter_generated_tokens_total")
        client.auth(daemon.client_id, daemon.api_key)
        assert (
            client.request({"op": "auth", "client_id": "alice", "api_key": "wrong-key-123"})["op"]
            == "auth_failed"
        )
        client.auth(daemon.client_id, daemon.api_key)
        run_infer(
            client,
            new_session(client),
            prompt="Count to ten:",
            params={"max_tokens": 16, "ignore_eos": True},
        )
        # The engine reports to the monitor on its own path: wait for it, with a deadline.
        deadline = time.monotonic() + 10
        after = scrape(port)
        while sample(after, "inferencecenter_generated_tokens_total") < tokens_before + 16:
            assert time.monotonic() < deadline, "the exporter never counted the tokens"
            after = scrape(port)
        assert sample(after, "inferencecenter_generated_tokens_total") == tokens_before + 16
        assert sample(after, "inferencecenter_auth_failures_total") >= 1
        assert sample(after, "inferencecenter_requests_total", finish_reason="length") >= 1
        assert sample(after, "inferencecenter_time_to_first_token_seconds_count") >= 1
        assert sample(after, "inferencecenter_request_duration_seconds_count") >= 1
        assert "inferencecenter_active_generations" in after
        assert daemon.api_key not in after
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0


def test_one_log_line_per_request_end_without_keys(daemon: Daemon, authed: RawClient) -> None:
    session_id = new_session(authed)
    run_infer(authed, session_id, prompt="Log me", params={"max_tokens": 3})
    lines = [
        line for line in daemon.log().splitlines() if session_id in line and "request end" in line
    ]
    assert len(lines) == 1
    for field in ("client_id=alice", "prompt_tokens=", "tokens=3", "ttft_ms=", "finish_reason="):
        assert field in lines[0]
    assert daemon.api_key not in daemon.log()


def test_unit_alert_hysteresis() -> None:
    """Pure logic: raised once, not repeated while it holds, cleared once, quiet after."""
    alert = Alert("gpu0.temperature")
    assert alert.update(True, False, now=0.0) == "raised"
    assert alert.update(True, False, now=1.0) is None
    assert alert.update(False, False, now=2.0) is None  # inside the hysteresis band
    assert alert.update(False, True, now=3.0) == "cleared"
    assert alert.update(True, False, now=4.0) is None  # too soon to raise again
    assert alert.update(True, False, now=ALERT_REPEAT_S + 1) == "raised"

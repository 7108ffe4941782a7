"""The original InferenceCenter WebSocket protocol at /ws (a `websockets` client running its whole
flow), and the seed systems' routes: /stats, /status, /metrics, /load_model."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    authenticated,
    free_port,
    new_session,
    run_infer,
    start_daemon,
    stop_daemon,
)


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ws")
    prometheus = free_port()
    daemon = start_daemon(
        tmp, "--batch-padding", "off", "--prometheus-port", str(prometheus), http=True
    )
    daemon.extra["prometheus_port"] = prometheus
    yield daemon
    code = stop_daemon(daemon.process)
    assert code == 0, daemon.log()


@pytest.fixture
def raw(http_daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(http_daemon.endpoint, http_daemon.client_id, http_daemon.api_key) as client:
        yield client


@pytest.fixture
def ws(http_daemon: Daemon) -> Iterator[ClientConnection]:
    with connect(f"ws://127.0.0.1:{http_daemon.http_port}/ws") as conn:
        yield conn


def send(conn: ClientConnection, body: dict[str, Any]) -> None:
    conn.send(json.dumps(body))


def receive(conn: ClientConnection, timeout: float = 30.0) -> dict[str, Any]:
    message = json.loads(conn.recv(timeout=timeout))
    assert isinstance(message, dict) and "op" in message, message
    return message


def request(conn: ClientConnection, body: dict[str, Any]) -> dict[str, Any]:
    send(conn, body)
    return receive(conn)


def login(conn: ClientConnection, daemon: Daemon) -> None:
    reply = request(conn, {"op": "auth", "client_id": "alice", "api_key": daemon.api_key})
    assert reply == {"op": "auth_success", "client_id": "alice", "max_sessions": 6}


def generation(conn: ClientConnection, session_id: str) -> tuple[str, dict[str, Any]]:
    """Tokens until the end of the session's running infer: the text and the end."""
    text = []
    while True:
        message = receive(conn)
        assert message["session_id"] == session_id, message
        if message["op"] == "end":
            return "".join(text), message
        assert message["op"] == "token" and set(message) == {"op", "session_id", "content"}
        text.append(message["content"])


def active_generations(raw: RawClient) -> int:
    return int(raw.request({"op": "stats"})["inference"]["active_generations"])


# ---- the WebSocket protocol ---------------------------------------------------------------


def test_ws_auth_session_infer_and_close(
    http_daemon: Daemon, ws: ClientConnection, raw: RawClient
) -> None:
    for op in ("create_session", "ping", "subscribe_metrics"):  # nothing before auth
        refused = request(ws, {"op": op})
        assert refused["op"] == "error" and refused["code"] == "unauthenticated", refused
    wrong = request(ws, {"op": "auth", "client_id": "alice", "api_key": "wrong-key-000"})
    assert wrong["op"] == "auth_failed" and wrong["reason"]
    login(ws, http_daemon)
    created = request(ws, {"op": "create_session"})
    assert created["op"] == "session_created" and created["session_id"].startswith("s-")
    session_id = created["session_id"]
    params = {"temp": 0, "max_tokens": 8}
    send(ws, {"op": "infer", "session_id": session_id, "prompt": "The sky is", "params": params})
    text, end = generation(ws, session_id)
    assert end["finish_reason"] == "length"
    assert {"ttft_ms", "total_ms", "tokens", "tps"} <= set(end["stats"])
    assert end["stats"]["tokens"] == 8
    expected, _ = run_infer(raw, new_session(raw), prompt="The sky is", params=params)
    assert text == expected
    closed = request(ws, {"op": "close_session", "session_id": session_id})
    assert closed == {"op": "session_closed", "session_id": session_id}
    gone = request(ws, {"op": "infer", "session_id": session_id, "prompt": "x"})
    assert gone["op"] == "error" and gone["code"] == "not_found"


def test_ws_abort_ends_the_generation(http_daemon: Daemon, ws: ClientConnection) -> None:
    login(ws, http_daemon)
    session_id = request(ws, {"op": "create_session"})["session_id"]
    params = {"max_tokens": 900}
    send(ws, {"op": "infer", "session_id": session_id, "prompt": "Once", "params": params})
    assert receive(ws)["op"] == "token"
    send(ws, {"op": "abort", "session_id": session_id})
    _, end = generation(ws, session_id)
    assert end["finish_reason"] == "aborted" and end["stats"]["tokens"] < 900
    request(ws, {"op": "close_session", "session_id": session_id})


def test_ws_metrics_once_a_second_until_unsubscribed(
    http_daemon: Daemon, ws: ClientConnection
) -> None:
    login(ws, http_daemon)
    subscribed = request(ws, {"op": "subscribe_metrics"})
    assert subscribed["op"] == "metrics_subscribed" and subscribed["message"]
    first, second = receive(ws, 5.0), receive(ws, 5.0)
    for metrics in (first, second):
        assert metrics["op"] == "metrics" and set(metrics) == {
            "op",
            "timestamp",
            "gpu",
            "inference",
        }
        assert set(metrics["inference"]) == {
            "active_generations",
            "total_sessions",
            "last_tps",
            "last_ttft_ms",
            "total_tokens_generated",
        }
        assert metrics["gpu"] is None or {"temp", "vram_total_mb"} <= set(metrics["gpu"])
    assert 0.5 < second["timestamp"] - first["timestamp"] < 1.5
    unsubscribed = request(ws, {"op": "unsubscribe_metrics"})
    assert unsubscribed["op"] == "metrics_unsubscribed"
    with pytest.raises(TimeoutError):
        receive(ws, 2.5)  # no more metrics


def test_ws_bad_frames_get_errors_and_the_connection_goes_on(
    http_daemon: Daemon, ws: ClientConnection
) -> None:
    login(ws, http_daemon)
    for frame, code in (
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        (json.dumps({"op": "no_such_op"}), "bad_request"),
        (json.dumps({"op": "infer", "session_id": "s-x", "prompt": 5}), "bad_request"),
        (json.dumps({"op": "create_session", "pad": "x" * (1 << 20)}), "too_large"),
    ):
        ws.send(frame)
        error = receive(ws)
        assert error["op"] == "error" and error["code"] == code, (frame[:40], error)
    ws.send(b"\x00binary")
    assert receive(ws)["code"] == "bad_request"
    created = request(ws, {"op": "create_session"})
    assert created["op"] == "session_created"
    request(ws, {"op": "close_session", "session_id": created["session_id"]})


def test_ws_client_gone_aborts_its_generation(http_daemon: Daemon, raw: RawClient) -> None:
    with connect(f"ws://127.0.0.1:{http_daemon.http_port}/ws") as conn:
        login(conn, http_daemon)
        session_id = request(conn, {"op": "create_session"})["session_id"]
        send(conn, {"op": "infer", "session_id": session_id, "prompt": "Once"})
        assert receive(conn)["op"] == "token"
    start = time.monotonic()
    while active_generations(raw) and time.monotonic() - start < 0.5:
        time.sleep(0.01)
    assert active_generations(raw) == 0, "not aborted within 0.5 s"


# ---- /stats, /status, /metrics, /load_model -------------------------------------------------


def get(daemon: Daemon, path: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key or daemon.api_key}"}
    req = urllib.request.Request(f"{daemon.http_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(daemon: Daemon, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{daemon.http_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {daemon.api_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_stats_and_status(http_daemon: Daemon, raw: RawClient) -> None:
    new_session(raw)
    status, body = get(http_daemon, "/stats")
    stats = json.loads(body)
    assert status == 200 and stats["sessions"] == 1
    inference = stats["inference"]
    assert {"active_generations", "total_tokens_generated", "tokens_per_second"} <= set(inference)
    assert list(stats["models"]) == ["gemma-3-270m-q4_k_m"]
    requests = inference["total_requests"]
    run_infer(raw, new_session(raw), prompt="Hello", params={"temp": 0, "max_tokens": 2})
    stats = json.loads(get(http_daemon, "/stats")[1])
    assert stats["inference"]["total_requests"] == requests + 1
    assert stats["models"]["gemma-3-270m-q4_k_m"]["total_requests"] == requests + 1
    status, body = get(http_daemon, "/status")
    listed = json.loads(body)
    assert status == 200 and set(listed) == {"default", "models"}  # list_models' answer
    assert listed["default"] == "gemma-3-270m-q4_k_m"
    (model,) = listed["models"]
    assert model["state"] == "loaded" and model["parallel"] == 4 and model["ctx_size"] == 1024
    assert get(http_daemon, "/stats", key="wrong-key-000")[0] == 401


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (inferencecenter_\w+)", text, re.MULTILINE))


def test_metrics_are_the_prometheus_exporters_series(http_daemon: Daemon) -> None:
    status, body = get(http_daemon, "/metrics")
    assert status == 200
    port = http_daemon.extra["prometheus_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        exporter = response.read().decode()
    names = metric_names(body.decode())
    assert "inferencecenter_generated_tokens_total" in names
    assert names == metric_names(exporter)


def test_load_model_is_for_admins(http_daemon: Daemon) -> None:
    status, body = post(http_daemon, "/load_model", {"model_name": "gemma-3-270m-q4_k_m"})
    assert status == 403 and body["error"]["code"] == "forbidden"

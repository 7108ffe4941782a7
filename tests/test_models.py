"""Several models at once, against one real daemon serving the default model under two names,
`a` (the default) and `b`: two engine processes. Sessions on both stream together; unloading
or killing one engine leaves the other's stream alone; a session of an unloaded model goes on
with its context once it is loaded again; only an admin loads, unloads and reaches every
session; a hot swap drains, switches and keeps the sessions; HTTP, the CLI, the client library
and the metrics see the models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from inferencecenter.actors.config import default_model_path
from inferencecenter.clients import Client, Forbidden
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
from inferencecenter.protocol import clientsfile
from inferencecenter.protocol.clientsfile import ClientEntry

ADMIN = ClientEntry(
    "root", "root-key-0123456789-abcdefghijklmnop", 8, "normal", "tests", role="admin"
)
GREEDY = {"temp": 0, "max_tokens": 8, "ignore_eos": True}
LONG = {"temp": 0, "max_tokens": 80, "ignore_eos": True}
PROMPTS = ["The capital of France is", " and the capital of Italy is"]
DEADLINE_S = 60.0


def models_flags(tmp: Path, *names: str) -> list[str]:
    """`--model NAME=PATH` for each name (the default model's file each time), our clients
    file (the test clients and an admin), and no padding measurement at each engine's start."""
    clients = tmp / "models-clients.json"
    clientsfile.save(clients, [*TEST_CLIENTS, ADMIN])
    flags = ["--clients", str(clients), "--batch-padding", "off", "--parallel", "2"]
    for name in names:
        flags += ["--model", f"{name}={default_model_path()}"]
    return flags


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("models")
    running = start_daemon(tmp, *models_flags(tmp, "a", "b"), http=True)
    yield running
    assert stop_daemon(running.process) == 0, running.log()


def connect(daemon: Daemon, entry: ClientEntry) -> RawClient:
    client = RawClient(daemon.endpoint)
    client.auth(entry.client_id, entry.api_key)
    return client


@pytest.fixture
def admin(daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(daemon.endpoint, ADMIN.client_id, ADMIN.api_key) as client:
        yield client


@pytest.fixture
def alice(daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(daemon.endpoint, "alice", TEST_CLIENTS[0].api_key) as client:
        yield client


def models(client: RawClient) -> dict[str, dict[str, Any]]:
    listed = client.request({"op": "list_models"})
    assert listed["op"] == "model_list", listed
    return {m["model"]: m for m in listed["models"]}


def engines(daemon: Daemon) -> dict[str, psutil.Process]:
    """Each model's engine process, by the name `ps` shows (`inferencecenter-engine-NAME`)."""
    found = {}
    for child in psutil.Process(daemon.process.pid).children():
        for part in child.cmdline():
            if part.startswith("inferencecenter-engine-"):
                found[part.removeprefix("inferencecenter-engine-")] = child
    return found


def start_infer(client: RawClient, session_id: str, request_id: str, **fields: Any) -> None:
    client.send({"op": "infer", "id": request_id, "session_id": session_id, **fields})


def timed_stream(client: RawClient, request_id: str) -> tuple[list[float], dict[str, Any]]:
    """When each further token of one infer arrived (its first was taken), and its end."""
    times: list[float] = []
    while True:
        reply = client.recv_for(request_id)
        if reply["op"] == "token":
            assert reply["seq"] == len(times) + 1
            times.append(time.monotonic())
        else:
            return times, reply


def reference(
    client: RawClient, model: str, turns: list[tuple[str, dict[str, Any]]] | None = None
) -> list[str]:
    """What a new session of `model` answers to each turn (PROMPTS by default) at temp 0."""
    session_id = new_session(client, model=model)
    turns = turns or [(prompt, GREEDY) for prompt in PROMPTS]
    texts = [run_infer(client, session_id, prompt=p, params=params)[0] for p, params in turns]
    client.request({"op": "close_session", "session_id": session_id})
    return texts


# ---- two engines ------------------------------------------------------------------------------


def test_each_model_has_its_own_engine_process(daemon: Daemon, alice: RawClient) -> None:
    listed = alice.request({"op": "list_models"})
    assert listed["default"] == "a"
    found = {m["model"]: m for m in listed["models"]}
    assert set(found) == {"a", "b"}
    for model in found.values():
        assert model["state"] == "loaded" and model["parallel"] == 2 and model["ctx_size"] == 1024
        assert set(model) == {"model", "state", "parallel", "ctx_size", "sessions", "memory_mb"}
    running = engines(daemon)
    assert set(running) == {"a", "b"} and running["a"].pid != running["b"].pid
    end = time.monotonic() + DEADLINE_S
    while any(m["memory_mb"] is None for m in models(alice).values()):  # sampled once a second
        assert time.monotonic() < end
        time.sleep(0.1)
    assert all(m["memory_mb"] > 100 for m in models(alice).values())
    created = alice.request({"op": "create_session", "model": "b"})
    assert created["model"] == "b" and created["ctx_size"] == 1024
    assert alice.request({"op": "create_session", "model": "c"})["code"] == "not_found"
    assert alice.auth("alice", TEST_CLIENTS[0].api_key)["server"]["models"] == ["a", "b"]


def test_sessions_on_both_models_stream_at_once(alice: RawClient) -> None:
    on_a, on_b = new_session(alice, model="a"), new_session(alice, model="b")
    start_infer(alice, on_a, "ga", prompt="Once upon a time", params={**LONG, "max_tokens": 40})
    start_infer(alice, on_b, "gb", prompt="Far away", params={**LONG, "max_tokens": 40})
    order: list[tuple[str, str]] = []
    ends: dict[str, dict[str, Any]] = {}
    while len(ends) < 2:
        reply = alice.recv()
        order.append((reply["id"], reply["op"]))
        if reply["op"] != "token":
            ends[reply["id"]] = reply
    assert all(e["op"] == "end" and e["finish_reason"] == "length" for e in ends.values())
    first_b = order.index(("gb", "token"))
    first_a = order.index(("ga", "token"))
    assert first_b < order.index(("ga", "end")) and first_a < order.index(("gb", "end"))


def test_unloading_one_model_leaves_the_others_stream_and_its_sessions(
    daemon: Daemon, admin: RawClient, alice: RawClient
) -> None:
    expected = reference(alice, "a")
    kept = new_session(alice, model="b")
    assert run_infer(alice, kept, prompt=PROMPTS[0], params=GREEDY)[0] == expected[0]
    streaming = new_session(alice, model="a")
    with MetricsSubscriber(daemon.metrics_endpoint, ("event.model",), timeout=30) as events:
        start_infer(alice, streaming, "long", prompt="Tell me a story", params=LONG)
        assert alice.recv_for("long")["op"] == "token"
        started = time.monotonic()
        unloaded = admin.request({"op": "unload_model", "model": "b"})
        unload_s = time.monotonic() - started
        assert unloaded["op"] == "model_unloaded" and unloaded["model"] == "b", unloaded
        times, end = timed_stream(alice, "long")
        # Uninterrupted: every token, in order, to its normal end.
        assert end["op"] == "end" and end["finish_reason"] == "length", end
        assert len(times) == LONG["max_tokens"] - 1 == end["stats"]["tokens"] - 1
        assert unload_s < 10.0
        assert "b" not in engines(daemon)
        listed = models(alice)
        assert listed["b"]["state"] == "available" and listed["b"]["sessions"] >= 1
        assert listed["b"]["memory_mb"] is None
        # The session of b goes on with its context: b is loaded on demand by the infer.
        text, second = run_infer(alice, kept, prompt=PROMPTS[1], params=GREEDY)
        assert text == expected[1]
        assert second["stats"]["cached_tokens"] == 0  # its context was rebuilt from history
        assert second["stats"]["prompt_tokens"] > len(PROMPTS[1].split())
        kinds = []
        while ("loaded", "b") not in kinds:
            _topic, event = events.receive()
            kinds.append((event["kind"], event["model"]))
        assert kinds[:3] == [("unloaded", "b"), ("loading", "b"), ("loaded", "b")]
    assert models(alice)["b"]["state"] == "loaded"


def test_killing_one_engine_leaves_the_others_stream(daemon: Daemon, alice: RawClient) -> None:
    on_b = new_session(alice, model="b")
    run_infer(alice, on_b, prompt="Hello", params=GREEDY)
    streaming = new_session(alice, model="a")
    start_infer(alice, streaming, "long", prompt="Tell me a story", params=LONG)
    assert alice.recv_for("long")["op"] == "token"
    victim = engines(daemon)["b"]
    times: list[float] = []
    kinds: dict[str, float] = {}  # b's model events, when they came
    with MetricsSubscriber(daemon.metrics_endpoint, ("event.model",), timeout=60) as events:
        poller = zmq.Poller()
        poller.register(alice.sock, zmq.POLLIN)
        poller.register(events._sock, zmq.POLLIN)
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        end: dict[str, Any] = {}
        while not end or "loaded" not in kinds:
            ready = dict(poller.poll(int(DEADLINE_S * 1000)))
            assert ready, "nothing within the deadline"
            if events._sock in ready:
                kinds.setdefault(events.receive()[1]["kind"], time.monotonic())
            if alice.sock in ready and not end:
                reply = alice.recv_for("long")
                if reply["op"] == "token":
                    assert reply["seq"] == len(times) + 1
                    times.append(time.monotonic())
                else:
                    end = reply
    assert end["op"] == "end" and end["finish_reason"] == "length", end
    assert len(times) == LONG["max_tokens"] - 1
    # a kept streaming while b was down and while it loaded again.
    assert kinds["failed"] < kinds["loaded"]
    assert any(killed < t < kinds["loaded"] for t in times), (kinds, killed, times[-1])
    # b comes back with its sessions (the next infer waits for it).
    _, after = run_infer(alice, on_b, prompt=" again", params=GREEDY)
    assert after["finish_reason"] == "length"
    assert engines(daemon)["b"].pid != victim.pid


# ---- admin ------------------------------------------------------------------------------------


def test_only_an_admin_loads_unloads_and_sees_every_session(
    admin: RawClient, alice: RawClient
) -> None:
    for body in (
        {"op": "load_model", "model": "b"},
        {"op": "unload_model", "model": "b"},
        {"op": "list_sessions", "all": True},
    ):
        reply = alice.request(body)
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
    assert models(alice)["b"]["state"] == "loaded"
    mine = new_session(alice, model="b")
    listed = admin.request({"op": "list_sessions", "all": True})["sessions"]
    row = next(s for s in listed if s["session_id"] == mine)
    assert row["client_id"] == "alice" and row["model"] == "b" and row["state"] == "idle"
    start_infer(alice, mine, "g", prompt="Count:", params=LONG)
    assert alice.recv_for("g")["op"] == "token"
    assert admin.request({"op": "abort", "session_id": mine})["op"] == "aborted"
    _, end = alice.stream("g")
    assert end["finish_reason"] == "aborted"
    infer = admin.request({"op": "infer", "session_id": mine, "prompt": "x"})
    assert infer["code"] == "forbidden"  # an admin stops or closes, it does not talk in it
    assert admin.request({"op": "close_session", "session_id": mine})["op"] == "session_closed"
    assert all(s["session_id"] != mine for s in alice.request({"op": "list_sessions"})["sessions"])


def test_load_model_answers(admin: RawClient, tmp_path: Path) -> None:
    again = admin.request({"op": "load_model", "model": "a"})
    assert again["op"] == "model_loaded" and again["model"] == "a" and again["seconds"] < 1.0
    unknown = admin.request({"op": "load_model", "model": "nope"})
    assert unknown["code"] == "not_found"
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK not a model")
    refused = admin.request({"op": "load_model", "model": "x", "path": str(bogus)})
    assert refused["code"] == "bad_request" and "GGUF" in refused["message"]
    assert admin.request({"op": "unload_model", "model": "x"})["code"] == "not_found"
    assert admin.request({"op": "load_model", "model": "no way"})["code"] == "bad_request"


def test_hot_swap_drains_then_serves_the_same_sessions(
    daemon: Daemon, admin: RawClient, alice: RawClient, tmp_path: Path
) -> None:
    draining = {**LONG, "max_tokens": 40}
    turns = [(PROMPTS[0], GREEDY), (" and", draining), (PROMPTS[1], GREEDY)]
    expected = reference(alice, "a", turns)
    session_id = new_session(alice, model="b")
    assert run_infer(alice, session_id, prompt=PROMPTS[0], params=GREEDY)[0] == expected[0]
    old = engines(daemon)["b"]
    other_file = tmp_path / "same-weights.gguf"
    other_file.symlink_to(default_model_path())  # another path: a new file for `b`
    start_infer(alice, session_id, "running", prompt=" and", params=draining)
    assert alice.recv_for("running")["op"] == "token"
    admin.send({"op": "load_model", "id": "swap", "model": "b", "path": str(other_file)})
    _, end = alice.stream("running")
    assert end["finish_reason"] == "length"  # drained, not aborted
    swapped = admin.recv_for("swap", timeout_ms=int(DEADLINE_S * 1000))
    assert swapped["op"] == "model_loaded" and swapped["model"] == "b", swapped
    assert engines(daemon)["b"].pid != old.pid and not old.is_running()
    # The session goes on in the new engine with everything it held, the drained turn too.
    assert run_infer(alice, session_id, prompt=PROMPTS[1], params=GREEDY)[0] == expected[2]


# ---- HTTP, CLI, client library, metrics -------------------------------------------------------


def http_get(daemon: Daemon, path: str) -> Any:
    request = urllib.request.Request(
        f"{daemon.http_url}{path}", headers={"Authorization": f"Bearer {daemon.api_key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_http_shows_and_routes_the_models(daemon: Daemon) -> None:
    status = http_get(daemon, "/status")
    assert status["default"] == "a" and {m["model"] for m in status["models"]} == {"a", "b"}
    assert [m["id"] for m in http_get(daemon, "/v1/models")["data"]] == ["a", "b"]
    body = json.dumps({"model": "b", "prompt": "Hello", "max_tokens": 3}).encode()
    request = urllib.request.Request(
        f"{daemon.http_url}/v1/completions",
        data=body,
        headers={"Authorization": f"Bearer {daemon.api_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        completion = json.loads(response.read())
    assert completion["model"] == "b" and completion["usage"]["completion_tokens"] == 3
    assert "b" in http_get(daemon, "/stats")["models"]


def cli(daemon: Daemon, entry: ClientEntry, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "INFERENCECENTER_CLIENT_ID": entry.client_id,
        "INFERENCECENTER_API_KEY": entry.api_key,
    }
    return subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", *argv, "--endpoint", daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_lists_loads_and_unloads(daemon: Daemon, alice: RawClient) -> None:
    listed = cli(daemon, TEST_CLIENTS[0], "models")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "STATE"]
    assert lines[1].split()[:3] == ["a", "*", "loaded"] and lines[2].split()[:2] == ["b", "loaded"]
    refused = cli(daemon, TEST_CLIENTS[0], "unload", "b")
    assert refused.returncode == 1 and "forbidden" in refused.stderr
    unloaded = cli(daemon, ADMIN, "unload", "b")
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == "b unloaded", unloaded.stderr
    assert models(alice)["b"]["state"] == "available"
    loaded = cli(daemon, ADMIN, "load", "b")
    assert loaded.returncode == 0 and loaded.stdout.startswith("b loaded in "), loaded.stderr
    inferred = cli(daemon, TEST_CLIENTS[0], "infer", "--model", "b", "--max-tokens", "3", "Hi")
    assert inferred.returncode == 0 and inferred.stdout.strip(), inferred.stderr


def test_client_library_model_ops(daemon: Daemon) -> None:
    with Client(daemon.endpoint, ADMIN.client_id, ADMIN.api_key) as client:
        listed = client.list_models()
        assert listed["default"] == "a" and [m["model"] for m in listed["models"]] == ["a", "b"]
        assert client.load_model("b")["model"] == "b"
        session = client.create_session(model="b")
        assert session.model == "b"
        assert any(s["client_id"] == "root" for s in client.list_sessions(all_clients=True))
        session.close()
    with Client(daemon.endpoint, "bob", TEST_CLIENTS[1].api_key) as client:
        with pytest.raises(Forbidden):
            client.unload_model("b")


def test_metrics_show_each_model(daemon: Daemon) -> None:
    with MetricsSubscriber(daemon.metrics_endpoint, timeout=10) as metrics:
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            _topic, body = metrics.receive()
            per_model = body["inference"].get("models", {})
            if {per_model.get(m, {}).get("state") for m in ("a", "b")} == {"loaded"}:
                break
        else:
            raise AssertionError("no metrics with both models loaded")
    for figures in per_model.values():
        assert {"sessions", "active_generations", "tokens_per_second", "memory_mb"} <= set(figures)
    request = urllib.request.Request(
        f"{daemon.http_url}/metrics", headers={"Authorization": f"Bearer {daemon.api_key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    assert 'inferencecenter_model_loaded{model="a"} 1.0' in text
    assert 'inferencecenter_generated_tokens_total{model="b"}' in text

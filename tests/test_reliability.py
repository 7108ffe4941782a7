"""Faults: an actor killed mid-generation, a whole-daemon restart with --state-dir."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from inferencecenter.clients import Client
from inferencecenter.clients.client import ConnectionLost
from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    actor_process,
    new_session,
    run_infer,
    start_daemon,
    stop_daemon,
)

GREEDY = {"temp": 0, "max_tokens": 12, "ignore_eos": True}


def wait_until_serving(client: RawClient, session_id: str, deadline_s: float) -> dict:
    """Retry a tiny infer until the restarted engine answers (bounded by the deadline)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        _, reply = run_infer(client, session_id, prompt="", params={"max_tokens": 1})
        if reply.get("finish_reason") != "error":
            return reply
    raise AssertionError("the daemon did not serve again in time")


def test_engine_killed_mid_generation_ends_streams_and_sessions_go_on(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    client = RawClient(daemon.endpoint)
    try:
        client.auth(daemon.client_id, daemon.api_key)
        session_id = new_session(client)
        _, first = run_infer(client, session_id, prompt="The river flows", params=GREEDY)
        held = first["stats"]["prompt_tokens"] + first["stats"]["tokens"]
        client.send(
            {
                "op": "infer",
                "id": "doomed",
                "session_id": session_id,
                "prompt": " on",
                "params": {"max_tokens": 1000, "ignore_eos": True},
            }
        )
        assert client.recv_for("doomed")["op"] == "token"
        engine = actor_process(daemon, "engine")
        killed = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        _, end = client.stream("doomed")
        assert time.monotonic() - killed < 2.0
        assert end["op"] == "end" and end["finish_reason"] == "error"
        assert "engine" in end["message"]
        restarted = time.monotonic()
        wait_until_serving(client, session_id, 30.0)
        assert time.monotonic() - restarted < 30.0
        assert actor_process(daemon, "engine").pid != engine.pid
        # The conversation survived: its tokens are evaluated again, nothing was lost.
        listed = client.request({"op": "list_sessions"})["sessions"]
        assert next(s["tokens"] for s in listed if s["session_id"] == session_id) >= held
        _, after = run_infer(client, session_id, prompt=" and on", params=GREEDY)
        assert after["finish_reason"] == "length"
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0


def test_gateway_killed_client_library_reconnects(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        with Client(daemon.endpoint, daemon.client_id, daemon.api_key, timeout=30) as client:
            session = client.create_session()
            text = "".join(session.infer(prompt="Hello", temp=0, max_tokens=8))
            assert text
            actor_process(daemon, "gateway").send_signal(signal.SIGKILL)
            generation = session.infer(prompt=" again", temp=0, max_tokens=8)
            assert "".join(generation) and generation.finish_reason == "length"
            assert generation.stats["cached_tokens"] > 0  # the engine kept the context
            # A stream cut off in the middle cannot be resumed: it ends at once with an
            # exception of its own, and the client goes on with a new connection.
            streaming = session.infer(prompt=" Count:", max_tokens=200, ignore_eos=True)
            assert next(streaming) is not None
            killed = time.monotonic()
            actor_process(daemon, "gateway").send_signal(signal.SIGKILL)
            with pytest.raises(ConnectionLost, match="dropped"):
                streaming.wait()
            assert time.monotonic() - killed < 5.0 and streaming.finish_reason == "error"
            assert session.session_id in {s["session_id"] for s in client.list_sessions()}
    finally:
        assert stop_daemon(daemon.process) == 0


def test_sessions_survive_a_restart_with_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_daemon(tmp_path, "--state-dir", str(state))
    client = RawClient(daemon.endpoint)
    try:
        client.auth(daemon.client_id, daemon.api_key)
        session_id = new_session(client, system_prompt="You are terse.")
        _, first = run_infer(client, session_id, prompt="Remember the word teapot.", params=GREEDY)
        held = first["stats"]["prompt_tokens"] + first["stats"]["tokens"]
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0
    daemon = start_daemon(tmp_path, "--state-dir", str(state))
    client = RawClient(daemon.endpoint)
    try:
        client.auth(daemon.client_id, daemon.api_key)
        listed = client.request({"op": "list_sessions"})["sessions"]
        assert [s["session_id"] for s in listed] == [session_id]
        assert listed[0]["tokens"] == held
        _, end = run_infer(client, session_id, prompt=" The word was", params=GREEDY)
        assert end["finish_reason"] == "length"
        assert end["stats"]["prompt_tokens"] >= held  # rebuilt from the saved history
        other = RawClient(daemon.endpoint)
        other.auth(daemon.other_client_id, daemon.other_api_key)
        assert other.request({"op": "abort", "session_id": session_id})["code"] == "forbidden"
        other.close()
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0


VANISHING_CLIENT = """
import sys, zmq
from inferencecenter.protocol import wire
endpoint, client_id, key = sys.argv[1:4]
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(endpoint)
def request(body):
    sock.send_multipart(wire.client_frames(body))
    return wire.unpack(sock.recv_multipart()[1])
request({"op": "auth", "client_id": client_id, "api_key": key})
session_id = request({"op": "create_session"})["session_id"]
sock.send_multipart(wire.client_frames({"op": "infer", "session_id": session_id, "prompt": "Go",
                                        "params": {"max_tokens": 1000, "ignore_eos": True}}))
sock.recv_multipart()
print(session_id, flush=True)
sock.recv_multipart()  # blocks until killed
"""


def test_vanished_client_has_its_generation_aborted_and_keeps_its_session(daemon: Daemon) -> None:
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, daemon.endpoint, daemon.client_id, daemon.api_key],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    session_id = process.stdout.readline().strip()
    assert session_id.startswith("s-")
    process.kill()
    process.wait()
    watcher = RawClient(daemon.endpoint)
    try:
        watcher.auth(daemon.client_id, daemon.api_key)
        deadline = time.monotonic() + 10.0  # --client-timeout; a killed process is seen at once
        state = "generating"
        while state != "idle" and time.monotonic() < deadline:
            sessions = watcher.request({"op": "list_sessions"})["sessions"]
            state = {s["session_id"]: s["state"] for s in sessions}[session_id]
        assert state == "idle"
        watcher.request({"op": "close_session", "session_id": session_id})
    finally:
        watcher.close()


def test_idle_sessions_expire(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--session-idle-timeout", "2")
    client = RawClient(daemon.endpoint)
    try:
        client.auth(daemon.client_id, daemon.api_key)
        session_id = new_session(client)
        run_infer(client, session_id, prompt="Hi", params={"max_tokens": 2})
        deadline = time.monotonic() + 15.0
        listed = [session_id]
        while listed and time.monotonic() < deadline:
            listed = [s["session_id"] for s in client.request({"op": "list_sessions"})["sessions"]]
        assert listed == []
        assert client.request({"op": "abort", "session_id": session_id})["code"] == "not_found"
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0


def test_hung_engine_is_killed_and_restarted(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--engine-hang-s", "3")
    client = RawClient(daemon.endpoint)
    try:
        client.auth(daemon.client_id, daemon.api_key)
        session_id = new_session(client)
        client.send(
            {
                "op": "infer",
                "id": "stuck",
                "session_id": session_id,
                "prompt": "Go",
                "params": {"max_tokens": 1000, "ignore_eos": True},
            }
        )
        assert client.recv_for("stuck")["op"] == "token"
        engine = actor_process(daemon, "engine")
        engine.send_signal(signal.SIGSTOP)  # a hang: alive, but no step, no heartbeat
        _, end = client.stream("stuck")
        assert end["finish_reason"] == "error"
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
        wait_until_serving(client, session_id, 30.0)
        assert "engine hung" in daemon.log()
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0

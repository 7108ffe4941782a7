"""Fixtures: the real daemon with the real default model, on free ports, own clients file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from inferencecenter.daemon.bench import free_ports
from inferencecenter.protocol import wire

START_DEADLINE_S = 180.0
REPLY_DEADLINE_MS = 30_000


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class Daemon:
    """A running `inferencecenter serve` process and what a client needs to reach it."""

    process: subprocess.Popen[bytes]
    endpoint: str
    metrics_endpoint: str
    clients_path: Path
    client_id: str
    api_key: str
    other_client_id: str
    other_api_key: str
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_clients(path: Path) -> dict[str, str]:
    keys = {
        "alice": "alice-key-0123456789",
        "bob": "bob-key-0123456789",
        "carol": "carol-key-0123456789",
    }
    data = {
        "clients": [
            {
                "client_id": "alice",
                "api_key": keys["alice"],
                "max_sessions": 6,
                "priority": "high",
                "description": "tests",
            },
            {
                "client_id": "bob",
                "api_key": keys["bob"],
                "max_sessions": 6,
                "priority": "normal",
                "description": "tests",
            },
            {
                "client_id": "carol",
                "api_key": keys["carol"],
                "max_sessions": 2,
                "priority": "low",
                "description": "limits",
            },
        ]
    }
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return keys


def serve_command(port: int, metrics_port: int, clients: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "inferencecenter.daemon",
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--clients",
        str(clients),
        "--parallel",
        "4",
        "--ctx-size",
        "1024",
        *extra,
    ]


def wait_for_pong(endpoint: str, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    """Block until the daemon answers ping (it answers only once every actor is ready)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(wire.client_frames({"op": "ping", "id": 0}))
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited with {process.returncode} before it served")
            if sock.poll(500):
                frames = sock.recv_multipart()
                assert wire.unpack(frames[1])["op"] == "pong"
                return
        raise TimeoutError("daemon did not answer ping in time")
    finally:
        sock.close()


def start_daemon(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    clients = tmp / "clients.json"
    keys = write_clients(clients)
    port, metrics_port = free_ports(2)
    log_path = tmp / "daemon.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        serve_command(port, metrics_port, clients, *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        wait_for_pong(endpoint, process, START_DEADLINE_S)
    except BaseException:
        stop_daemon(process)
        raise RuntimeError(
            "daemon did not start:\n" + log_path.read_text(errors="replace")
        ) from None
    return Daemon(
        process,
        endpoint,
        f"tcp://127.0.0.1:{metrics_port}",
        clients,
        "alice",
        keys["alice"],
        "bob",
        keys["bob"],
        log_path,
        {"carol_key": keys["carol"]},
    )


def stop_daemon(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("daemon")
    running = start_daemon(tmp)
    yield running
    code = stop_daemon(running.process)
    assert code == 0, running.log()


class RawClient:
    """A bare DEALER speaking frames by hand, as a client written from PROTOCOL.md would."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.backlog: list[dict[str, Any]] = []  # replies read while waiting for another id
        self.next_id = 0

    def send(self, body: dict[str, Any]) -> None:
        self.sock.send_multipart(wire.client_frames(body))

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_ms: int = REPLY_DEADLINE_MS) -> dict[str, Any]:
        if not self.sock.poll(timeout_ms):
            raise TimeoutError("no reply within the deadline")
        frames = self.sock.recv_multipart()
        assert len(frames) == 2 and frames[0] == wire.TAG, frames
        return wire.unpack(frames[1], 1 << 30)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply; replies to other requests wait in the backlog.
        A request without `id` gets one, so streams running meanwhile cannot be mistaken for it."""
        if "id" not in body:
            self.next_id += 1
            body = {**body, "id": f"req-{self.next_id}"}
        request_id = body["id"]
        self.send(body)
        if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
            return self.recv()
        if isinstance(request_id, str) and len(request_id.encode()) > 64:
            return self.recv()
        return self.recv_for(request_id)

    def auth(self, client_id: str, api_key: str) -> dict[str, Any]:
        reply = self.request({"op": "auth", "client_id": client_id, "api_key": api_key})
        assert reply["op"] == "auth_success", reply
        return reply

    def recv_for(self, request_id: Any) -> dict[str, Any]:
        """The next reply carrying `request_id`; others wait in the backlog for their turn."""
        for index, reply in enumerate(self.backlog):
            if reply.get("id") == request_id:
                return self.backlog.pop(index)
        while True:
            reply = self.recv()
            if reply.get("id") == request_id:
                return reply
            self.backlog.append(reply)

    def stream(self, request_id: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Collect `token` replies of one infer until its `end`."""
        tokens: list[dict[str, Any]] = []
        while True:
            reply = self.recv_for(request_id)
            if reply["op"] == "token":
                tokens.append(reply)
            elif reply["op"] in ("end", "error"):
                return tokens, reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(daemon.endpoint)
    yield client
    client.close()


@pytest.fixture
def authed(daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(daemon.endpoint)
    client.auth(daemon.client_id, daemon.api_key)
    yield client
    close_all_sessions(client)
    client.close()


def close_all_sessions(client: RawClient) -> None:
    """Leave no session behind: per-client quotas are shared by every test."""
    client.sock.setsockopt(zmq.LINGER, 0)
    listed = client.request({"op": "list_sessions", "id": "cleanup"})
    while listed.get("id") != "cleanup":
        listed = client.recv()
    for session in listed.get("sessions", []):
        client.send({"op": "close_session", "id": "closing", "session_id": session["session_id"]})
        reply = client.recv()
        while reply.get("id") != "closing":
            reply = client.recv()

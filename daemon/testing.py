"""Shipped test support (like trio.testing): start a real daemon, speak its wire protocol raw."""

from __future__ import annotations

import json
import os
import signal
import socket as net
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from ..protocol import clientsfile, curve, wire
from ..protocol.clientsfile import ClientEntry

START_DEADLINE_S = 180.0
REPLY_DEADLINE_MS = 30_000
ACTORS = ("gateway", "auth", "sessions", "engine", "monitor")
HTTP_ACTOR = "http"  # runs only in daemons started with http=True

# The clients every test daemon knows: alice (high priority), bob (normal), carol (low, only two
# sessions). The daemon listens on 127.0.0.1 only, so fixed keys are enough.
TEST_CLIENTS = (
    ClientEntry("alice", "alice-key-0123456789-abcdefghijklmnop", 6, "high", "tests"),
    ClientEntry("bob", "bob-key-0123456789-abcdefghijklmnopqr", 6, "normal", "tests"),
    ClientEntry("carol", "carol-key-0123456789-abcdefghijklmnop", 2, "low", "limits"),
)


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all held bound while picked, so none comes twice)."""
    probes = [net.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]


def write_clients(path: Path) -> dict[str, str]:
    """A clients file holding TEST_CLIENTS; their keys by client_id."""
    clientsfile.save(path, list(TEST_CLIENTS))
    return {entry.client_id: entry.api_key for entry in TEST_CLIENTS}


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
    http_port: int = 0  # 0: the HTTP actor is off
    http_scheme: str = "http"  # "https" with --tls-cert
    server_key: bytes = b""  # with --curve: the daemon's public key (Z85)

    def client_keys(self) -> curve.ClientCurve | None:
        """Keys for a raw socket of a test (a fresh client keypair), None without --curve."""
        return curve.client_curve(self.server_key) if self.server_key else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def http_url(self) -> str:
        """`http://127.0.0.1:PORT` of the HTTP actor (start_daemon(..., http=True))."""
        if not self.http_port:
            raise RuntimeError("this daemon serves no HTTP (start it with http=True)")
        return f"{self.http_scheme}://127.0.0.1:{self.http_port}"


def serve_command(port: int, metrics_port: int, clients: Path, *extra: str) -> list[str]:
    """`inferencecenter serve` with 4 slots of 1,024 tokens; `extra` flags come last and so
    override these (argparse keeps the last value)."""
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


def wait_for_pong(
    endpoint: str,
    process: subprocess.Popen[bytes],
    deadline_s: float,
    keys: curve.ClientCurve | None = None,
) -> None:
    """Block until the daemon answers ping (it answers only once every actor is ready)."""
    client = RawClient(endpoint, keys)
    try:
        client.send({"op": "ping", "id": 0})
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited with {process.returncode} before it served")
            try:
                reply = client.recv(500)
            except TimeoutError:
                continue
            assert reply["op"] == "pong", reply
            return
        raise TimeoutError("daemon did not answer ping in time")
    finally:
        client.close()


def start_daemon(
    tmp: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    deadline_s: float = START_DEADLINE_S,
    http: bool = False,
) -> Daemon:
    """`inferencecenter serve` (serve_command) in `tmp`, with its clients file and log there;
    returns once it answers ping (and, with `http`, once GET /health says ok). The HTTP actor
    runs only with `http`, on a free port (`Daemon.http_port`), so daemons never fight over
    8080. A daemon that does not start is stopped and its log raised."""
    clients = tmp / "clients.json"
    keys = write_clients(clients)
    port, metrics_port, http_port = free_ports(3)
    http_port = http_port if http else 0
    scheme = "https" if "--tls-cert" in extra else "http"
    server_key = b""
    if "--curve" in extra and "--server-cert" not in extra:
        # The daemon's default certificate, made here so that the test knows its key first.
        curve.create_server_cert(tmp / curve.SERVER_SECRET_FILE)
        server_key, _ = curve.load_server_cert(tmp / curve.SERVER_SECRET_FILE)
    log_path = tmp / "daemon.log"
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            serve_command(port, metrics_port, clients, "--http-port", str(http_port), *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        wait_for_pong(
            endpoint, process, deadline_s, curve.client_curve(server_key) if server_key else None
        )
        if http_port:
            wait_for_health(f"{scheme}://127.0.0.1:{http_port}", process, deadline_s)
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
        http_port,
        scheme,
        server_key,
    )


def health(url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET /health: the status and the JSON body (status 0: nothing answers). Over HTTPS the
    certificate is not checked: this only asks whether the daemon serves yet."""
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def wait_for_health(url: str, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    """Block until GET /health answers 200 (the supervisor told the HTTP actor all is ready)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode} before it served")
        if health(url)[0] == 200:
            return
        time.sleep(0.05)  # polling: the supervisor's message leaves no other trace to wait on
    raise TimeoutError("GET /health did not say ok in time")


def stop_daemon(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def running_actors(daemon: Daemon) -> dict[str, psutil.Process]:
    """The supervisor ("daemon") and those of its actors running now, by name."""
    supervisor = psutil.Process(daemon.process.pid)
    found = {"daemon": supervisor}
    for child in supervisor.children():
        command = " ".join(child.cmdline())
        for name in (*ACTORS, HTTP_ACTOR):
            if f"inferencecenter-{name}" in command:
                found[name] = child
    return found


def actor_processes(daemon: Daemon) -> dict[str, psutil.Process]:
    """The supervisor ("daemon") and its actors (with HTTP, if on), by name; all must run."""
    found = running_actors(daemon)
    missing = set(ACTORS) - set(found)
    if daemon.http_port and HTTP_ACTOR not in found:
        missing.add(HTTP_ACTOR)
    if missing:
        raise RuntimeError(f"actors not running: {sorted(missing)}")
    return found


def actor_process(daemon: Daemon, name: str) -> psutil.Process:
    """One actor's process (`name` as in ACTORS)."""
    found = running_actors(daemon)
    if name not in found:
        raise RuntimeError(f"no {name} process")
    return found[name]


class RawClient:
    """A bare DEALER speaking frames by hand, as a client written from PROTOCOL.md would."""

    def __init__(self, endpoint: str, keys: curve.ClientCurve | None = None) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.sock)
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
        if len(frames) != 2 or frames[0] != wire.TAG:
            raise AssertionError(f"malformed reply frames: {frames!r:.200}")
        return wire.unpack(frames[1], 1 << 30)

    def waiting(self) -> list[dict[str, Any]]:
        """Every reply already here, without blocking: the backlog, then what the socket holds
        (for many streams polled together)."""
        replies, self.backlog = self.backlog, []
        while int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            replies.append(self.recv(0))
        return replies

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

    def recv_for(self, request_id: Any, timeout_ms: int = REPLY_DEADLINE_MS) -> dict[str, Any]:
        """The next reply carrying `request_id`; others wait in the backlog for their turn."""
        for index, reply in enumerate(self.backlog):
            if reply.get("id") == request_id:
                return self.backlog.pop(index)
        while True:
            reply = self.recv(timeout_ms)
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


@contextmanager
def authenticated(endpoint: str, client_id: str, api_key: str) -> Iterator[RawClient]:
    """A connection authenticated as `client_id` that leaves no session behind when it ends."""
    client = RawClient(endpoint)
    client.auth(client_id, api_key)
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


def new_session(client: RawClient, **fields: Any) -> str:
    reply = client.request({"op": "create_session", "id": "c", **fields})
    assert reply["op"] == "session_created", reply
    return str(reply["session_id"])


def run_infer(
    client: RawClient, session_id: str, request_id: Any = "i", **fields: Any
) -> tuple[str, dict[str, Any]]:
    """One infer to its end: the text streamed (seq checked to run 0, 1, 2, ...) and the end."""
    client.send({"op": "infer", "id": request_id, "session_id": session_id, **fields})
    tokens, end = client.stream(request_id)
    assert end["op"] == "end", end
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    return "".join(t["content"] for t in tokens), end


def reference_reply(client: RawClient, prompts: list[str], params: dict[str, Any]) -> str:
    """The last reply of a new session given `prompts` in turn, alone: what a session with the
    same conversation must answer at `temp: 0`. The session is closed after."""
    session_id = new_session(client)
    text = ""
    for prompt in prompts:
        text, _ = run_infer(client, session_id, prompt=prompt, params=params)
    client.request({"op": "close_session", "session_id": session_id})
    return text

"""Starting and stopping the daemon: readiness, bad settings, first start, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from inferencecenter.actors.config import default_model_path
from inferencecenter.daemon.testing import (
    RawClient,
    free_port,
    free_ports,
    start_daemon,
    stop_daemon,
    wait_for_health,
    wait_for_pong,
)
from inferencecenter.protocol.clientsfile import key_sha256

from .doc_examples import doc_example, run_example


def run_serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "serve", "--http-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_missing_model_exits_at_once_with_one_clear_line(tmp_path: Path) -> None:
    result = run_serve(
        "--model", str(tmp_path / "nope.gguf"), "--clients", str(tmp_path / "c.json")
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.gguf" in lines[0] and "does not exist" in lines[0]


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    result = run_serve("--model", str(bogus))
    assert result.returncode != 0 and "not a GGUF file" in result.stderr


def test_bad_clients_file_is_refused(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clients.write_text('{"clients": [{"client_id": "x"}]}')
    clients.chmod(0o600)
    result = run_serve("--clients", str(clients))
    assert result.returncode != 0 and "api_key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_flag_values_are_refused(tmp_path: Path) -> None:
    for args in (["--parallel", "0"], ["--port", "70000"], ["--ctx-size", "3"]):
        result = run_serve(*args)
        assert result.returncode != 0, args
        assert result.stderr.strip().splitlines()[-1].startswith("inferencecenter:")


def test_busy_port_fails_with_a_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        clients = tmp_path / "c.json"
        clients.write_text(json.dumps({"clients": [{"client_id": "a", "api_key": "a" * 32}]}))
        clients.chmod(0o600)
        result = run_serve(
            "--port", str(port), "--metrics-port", str(free_port()), "--clients", str(clients)
        )
    assert result.returncode == 1
    assert (
        "Address already in use" in result.stderr.strip().splitlines()[-1]
        or "in use" in result.stderr
    )


def test_first_start_writes_only_the_hash_and_the_key_for_this_user(tmp_path: Path) -> None:
    """The clients file gets `local`'s hash, the user's credentials file (0600) its key, which
    the CLI and the README's Python examples (the client library, the `openai` package) find
    there; the log names both files, never the key."""
    home = tmp_path / "home"
    config_home = home / ".config"  # where a user without XDG_CONFIG_HOME has it
    port, metrics_port, http_port = free_ports(3)
    log_path = tmp_path / "log"
    names = ("INFERENCECENTER_CLIENT_ID", "INFERENCECENTER_API_KEY", "INFERENCECENTER_CLIENTS")
    env = {k: v for k, v in os.environ.items() if k not in names and "CREDENTIALS" not in k}
    env.pop("XDG_CONFIG_HOME", None)
    env["HOME"] = str(home)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inferencecenter.daemon",
                "serve",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--http-port",
                str(http_port),
                "--model",
                default_model_path(),  # the package's file, found under the real home
                "--parallel",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        wait_for_pong(endpoint, process, 120)
        path = config_home / "inferencecenter" / "clients.json"
        stored = config_home / "inferencecenter" / "credentials.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        (entry,) = json.loads(path.read_text())["clients"]
        assert entry["client_id"] == "local" and "api_key" not in entry
        (local,) = json.loads(stored.read_text())["credentials"]
        key = local["api_key"]
        assert local["client_id"] == "local" and key_sha256(key) == entry["api_key_sha256"]
        client = RawClient(endpoint)
        try:
            client.auth("local", key)
        finally:
            client.close()
        done = subprocess.run(
            [sys.executable, "-m", "inferencecenter.daemon", "sessions", "--endpoint", endpoint],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr  # the CLI took the key from credentials.json
        library = doc_example("README.md", "## Python client").replace(":5555", f":{port}")
        printed = run_example(library, env=env)
        assert "length {'prompt_tokens'" in printed and key not in printed
        wait_for_health(f"http://127.0.0.1:{http_port}", process, 60)
        openai = doc_example("README.md", "With the `openai` package:")
        printed = run_example(openai.replace(":8080", f":{http_port}"), env=env)
        assert "completion_tokens=" in printed and key not in printed
    finally:
        assert stop_daemon(process) == 0
    log_text = log_path.read_text()
    assert str(path) in log_text and str(stored) in log_text and key not in log_text


def test_actors_are_processes_named_in_ps_and_sigterm_ends_streams(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        children = psutil.Process(daemon.process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        for actor in ("gateway", "auth", "sessions", "engine", "monitor"):
            assert any(f"inferencecenter-{actor}" in command for command in commands), commands
        client = RawClient(daemon.endpoint)
        client.auth(daemon.client_id, daemon.api_key)
        session_id = client.request({"op": "create_session"})["session_id"]
        client.send(
            {
                "op": "infer",
                "id": "g",
                "session_id": session_id,
                "prompt": "Tell me everything",
                "params": {"max_tokens": 1000, "ignore_eos": True},
            }
        )
        assert client.recv()["op"] == "token"
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        _, end = client.stream("g")
        assert end["op"] == "end" and end["finish_reason"] == "aborted"
        assert daemon.process.wait(10) == 0
        assert time.monotonic() - started < 10
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        client.close()
    finally:
        stop_daemon(daemon.process)

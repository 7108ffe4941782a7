"""Attacks on the real daemon, each repeated against the defence that answers it (figures in
docs/security.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferencecenter.daemon.testing import (
    TEST_CLIENTS,
    Daemon,
    RawClient,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import clientsfile


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("security"))
    yield running
    assert stop_daemon(running.process) == 0, running.log()


def serve_refuses(*args: str) -> str:
    """`serve` with these flags must stop before anything starts: its one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "serve", "--http-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- keys at rest ------------------------------------------------------------------------------


def test_a_stolen_clients_file_holds_no_key_once_migrated(daemon: Daemon) -> None:
    """The seed format is served (and warned about, by client_id); after `keys migrate` the file
    holds hashes only and every client still authenticates, without a restart."""
    text = daemon.clients_path.read_text()
    assert daemon.api_key in text
    assert clientsfile.migrate(daemon.clients_path) == [e.client_id for e in TEST_CLIENTS]
    text = daemon.clients_path.read_text()
    for entry in TEST_CLIENTS:
        assert entry.api_key not in text
        client = RawClient(daemon.endpoint)
        try:
            assert client.auth(entry.client_id, entry.api_key)["client_id"] == entry.client_id
        finally:
            client.close()
    log = daemon.log()
    warnings = [line for line in log.splitlines() if "stored in clear" in line]
    assert len(warnings) == 1 and "clients=alice,bob,carol" in warnings[0]
    assert all(entry.api_key not in log for entry in TEST_CLIENTS)


def test_short_hand_written_keys_are_refused_at_start(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"clients": [{"client_id": "a", "api_key": "hunter22hunter22"}]}))
    clients.chmod(0o600)
    line = serve_refuses("--clients", str(clients))
    assert "fewer than 32" in line and "hunter22" not in line


def test_a_clients_file_readable_by_others_is_refused_at_start(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clientsfile.save(clients, list(TEST_CLIENTS))
    clients.chmod(0o644)
    line = serve_refuses("--clients", str(clients))
    assert "mode 644" in line and "chmod 600" in line

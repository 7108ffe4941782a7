"""The local CLI's key lives in this user's credentials file (mode 0600), not in the daemon's
clients file (a real daemon's first start: tests/test_lifecycle.py): a broken credentials file
stops the first start; the lookup reads the credentials file (the environment still wins);
`keygen` keeps only the hash and `--save` stores the key; `keys migrate` is a CLI command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from inferencecenter.clients import credentials
from inferencecenter.clients.credentials import CredentialsError
from inferencecenter.daemon.testing import (
    free_ports,
)
from inferencecenter.protocol import clientsfile, credentialsfile

CLI_DEADLINE_S = 120.0
KEY = "ic-" + "k" * 40
OTHER = "ic-" + "o" * 40
ENV_NAMES = (
    credentials.ENV_CLIENT_ID,
    credentials.ENV_API_KEY,
    credentials.ENV_CLIENTS,
    credentials.ENV_CREDENTIALS,
)


def clean_env(config_home: Path) -> dict[str, str]:
    """This machine's environment with its config home in a temporary folder, no credentials."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env["XDG_CONFIG_HOME"] = str(config_home)
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", *args],
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE_S,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_a_broken_credentials_file_stops_the_first_start_before_any_write(tmp_path: Path) -> None:
    config = tmp_path / "config"
    stored = config / "inferencecenter" / "credentials.json"
    stored.parent.mkdir(parents=True)
    stored.write_text("{")
    stored.chmod(0o600)
    port, metrics_port = free_ports(2)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "inferencecenter.daemon", "serve"),
            *("--port", str(port), "--metrics-port", str(metrics_port), "--http-port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE_S,
        env=clean_env(config),
    )
    assert done.returncode == 2 and "not valid JSON" in done.stderr, done.stderr
    assert not (config / "inferencecenter" / "clients.json").exists()


def test_the_credentials_file_comes_before_the_default_clients_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    clients, stored = clientsfile.default_path(), credentialsfile.default_path()
    clientsfile.save(clients, [clientsfile.ClientEntry("local", OTHER)])  # the seed format
    assert credentials.resolve() == ("local", OTHER)  # no credentials file yet: the old way
    credentialsfile.store(stored, "local", KEY)
    assert credentials.resolve() == ("local", KEY)
    credentialsfile.store(stored, "ops", OTHER)
    assert credentials.resolve("ops") == ("ops", OTHER)
    monkeypatch.setenv(credentials.ENV_CLIENT_ID, "env-id")
    monkeypatch.setenv(credentials.ENV_API_KEY, "env-key")
    assert credentials.resolve() == ("env-id", "env-key")  # the environment still wins
    monkeypatch.delenv(credentials.ENV_CLIENT_ID)
    monkeypatch.delenv(credentials.ENV_API_KEY)
    clientsfile.migrate(clients)  # hashes only: the clients file gives no key any more
    stored.unlink()
    with pytest.raises(CredentialsError, match="keygen NAME --save"):
        credentials.resolve()


def test_keygen_keeps_the_hash_and_save_stores_the_key(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "config")
    clients, stored = tmp_path / "clients.json", tmp_path / "credentials.json"
    done = cli(
        "keygen", "ivy", "--clients", str(clients), "--save", "--credentials", str(stored), env=env
    )
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    key = printed["api_key"]
    assert done.stdout.count(key) == 1 and key not in done.stderr
    assert key not in clients.read_text()
    (entry,) = clientsfile.load(clients)
    assert entry.api_key_sha256 == clientsfile.key_sha256(key)
    assert credentialsfile.find(stored, "ivy") == ("ivy", key)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    # A broken credentials file: refused before the clients file changes.
    stored.write_text("[")
    before = clients.read_text()
    again = cli(
        "keygen", "jay", "--clients", str(clients), "--save", "--credentials", str(stored), env=env
    )
    assert again.returncode != 0 and "not valid JSON" in again.stderr
    assert clients.read_text() == before


def test_keys_migrate_is_a_cli_command(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "config")
    clients, stored = tmp_path / "clients.json", tmp_path / "credentials.json"
    clientsfile.save(clients, [clientsfile.ClientEntry("local", KEY)])
    done = cli("keys", "migrate", "--clients", str(clients), "--credentials", str(stored), env=env)
    assert done.returncode == 0, done.stderr
    assert KEY not in clients.read_text()
    assert credentialsfile.find(stored) == ("local", KEY)

"""The security defences' pure logic, without a daemon: keys at rest as hashes, the credentials
file, the keys migrate command."""

from __future__ import annotations

import argparse
import json
import logging
import stat
from pathlib import Path

import pytest

from inferencecenter.actors.auth import ClientRegistry
from inferencecenter.clients.keys import add_keys_command
from inferencecenter.protocol import clientsfile, credentialsfile
from inferencecenter.protocol.clientsfile import ClientEntry, ClientsFileError

KEY = "k" * 40
OTHER = "o" * 40


def write(path: Path, clients: list[dict[str, object]], mode: int = 0o600) -> Path:
    path.write_text(json.dumps({"clients": clients}))
    path.chmod(mode)
    return path


# ---- keys at rest ------------------------------------------------------------------------------


def test_a_hashed_entry_authenticates_and_holds_no_key(tmp_path: Path) -> None:
    digest = clientsfile.key_sha256(KEY)
    path = write(tmp_path / "c.json", [{"client_id": "a", "api_key_sha256": digest.upper()}])
    (entry,) = clientsfile.load(path)
    assert entry.api_key == "" and entry.api_key_sha256 == digest
    registry = ClientRegistry(path)
    assert registry.authenticate("a", KEY) == entry
    assert registry.authenticate("a", OTHER) is None
    assert registry.authenticate("b", KEY) is None
    assert registry.authenticate_key(KEY) == entry


def test_the_seed_format_is_read_and_warned_about_once_by_client_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "c.json", [{"client_id": "a", "api_key": KEY}])
    with caplog.at_level(logging.WARNING):
        registry = ClientRegistry(path)
        assert registry.authenticate("a", KEY) is not None
        write(path, [{"client_id": "a", "api_key": KEY}, {"client_id": "b", "api_key": OTHER}])
        registry._mtime_ns = -1  # as if the file changed (same mtime within a tick)
        registry.reload_if_changed()
    warnings = [r for r in caplog.records if "in clear" in r.getMessage()]
    assert [r.fields["clients"] for r in warnings] == ["a", "b"]  # type: ignore[attr-defined]
    assert KEY not in caplog.text and OTHER not in caplog.text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"client_id": "a", "api_key": "x" * 31}, "api_key is 31 characters, fewer than 32"),
        ({"client_id": "a"}, "needs api_key_sha256 (or api_key)"),
        ({"client_id": "a", "api_key_sha256": "ab" * 31}, "must be 64 hex digits"),
        ({"client_id": "a", "api_key": KEY, "api_key_sha256": "ab" * 32}, "both"),
    ],
)
def test_bad_keys_are_refused_in_one_line(
    tmp_path: Path, raw: dict[str, object], expected: str
) -> None:
    path = write(tmp_path / "c.json", [raw])
    with pytest.raises(
        ClientsFileError, match=expected.replace("(", r"\(").replace(")", r"\)")
    ) as info:
        clientsfile.load(path)
    assert "\n" not in str(info.value) and "x" * 31 not in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_clients_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "c.json", [{"client_id": "a", "api_key": KEY}], mode)
    with pytest.raises(ClientsFileError, match=f"mode {mode:o}.*chmod 600"):
        clientsfile.load(path)


def test_migrate_rewrites_keys_as_hashes_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    clientsfile.save(
        path, [ClientEntry("a", KEY, 3, "high", "d", "admin"), ClientEntry("b", OTHER)]
    )
    assert KEY in path.read_text()
    before = clientsfile.load(path)
    assert clientsfile.migrate(path) == ["a", "b"]
    text = path.read_text()
    assert KEY not in text and OTHER not in text and '"api_key"' not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    after = clientsfile.load(path)
    assert [clientsfile.hashed(e) for e in before] == after
    assert clientsfile.migrate(path) == []  # nothing left in clear
    assert ClientRegistry(path).authenticate("a", KEY) == after[0]


def test_add_client_and_create_default_can_store_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    local = clientsfile.create_default(path, hash_only=True)
    added = clientsfile.add_client(path, "b", hash_only=True, role="admin")
    assert len(local.api_key) >= clientsfile.MIN_KEY_CHARS and added.api_key
    text = path.read_text()
    assert local.api_key not in text and added.api_key not in text
    registry = ClientRegistry(path)
    assert registry.authenticate("local", local.api_key) is not None
    found = registry.authenticate("b", added.api_key)
    assert found is not None and found.role == "admin"


# ---- the local credentials file ----------------------------------------------------------------


def test_credentials_file_stores_finds_and_stays_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "credentials.json"
    assert credentialsfile.load(path) == [] and credentialsfile.find(path) is None
    credentialsfile.store(path, "ops", OTHER)
    credentialsfile.store(path, "local", "old")
    credentialsfile.store(path, "local", KEY)  # replaces
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert credentialsfile.find(path) == ("local", KEY)  # local wins over the first
    assert credentialsfile.find(path, "ops") == ("ops", OTHER)
    assert credentialsfile.find(path, "nobody") is None
    assert KEY not in repr(credentialsfile.find(path))
    path.chmod(0o644)
    with pytest.raises(credentialsfile.CredentialsFileError, match="chmod 600"):
        credentialsfile.load(path)


def test_a_malformed_credentials_file_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    for text, expected in (
        ("{", "not valid JSON"),
        ('{"credentials": {}}', "must hold"),
        ('{"credentials": [{"client_id": "a"}]}', r"credentials\[0\]"),
    ):
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(credentialsfile.CredentialsFileError, match=expected):
            credentialsfile.load(path)


# ---- keys migrate ------------------------------------------------------------------------------


def run_keys(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_keys_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", *argv])
    code: int = args.func(args)
    return code


def test_keys_migrate_keeps_the_local_key_for_this_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clients, credentials = tmp_path / "c.json", tmp_path / "credentials.json"
    clientsfile.save(clients, [ClientEntry("local", KEY), ClientEntry("bob", OTHER)])
    assert run_keys("migrate", "--clients", str(clients), "--credentials", str(credentials)) == 0
    out = capsys.readouterr().out
    assert "2 key(s)" in out and KEY not in out and OTHER not in out
    assert KEY not in clients.read_text() and OTHER not in clients.read_text()
    assert credentialsfile.find(credentials) == ("local", KEY)
    assert credentialsfile.find(credentials, "bob") is None  # bob's key is bob's to keep
    assert run_keys("migrate", "--clients", str(clients), "--credentials", str(credentials)) == 0
    assert "already holds only hashes" in capsys.readouterr().out


def test_keys_migrate_refuses_a_bad_file_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clients = write(tmp_path / "c.json", [{"client_id": "local", "api_key": KEY}], 0o644)
    assert run_keys("migrate", "--clients", str(clients)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "chmod 600" in err

"""The security defences' pure logic, without a daemon: keys at rest as hashes, the credentials
file, the keys migrate command."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from inferencecenter.actors.auth import (
    BASE_DELAY_S,
    FORGET_S,
    FREE_FAILURES,
    MAX_DELAY_S,
    MAX_WAIT_S,
    SUMMARY_KINDS,
    SUMMARY_TOP,
    SUMMARY_WINDOW_S,
    Backoff,
    ClientRegistry,
    FailureLog,
)
from inferencecenter.actors.logs import EventFormatter
from inferencecenter.clients.keys import add_keys_command
from inferencecenter.protocol import clientsfile, credentialsfile, wire
from inferencecenter.protocol.clientsfile import ClientEntry, ClientsFileError
from inferencecenter.protocol.errors import BadRequest, TooLarge

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
        registry.reload(force=True)  # as on SIGHUP (the mtime may not have moved)
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


# ---- auth failures: backoff and the failure log ------------------------------------------------


def attack(backoff: Backoff, log: FailureLog, tries: int, now: float = 0.0) -> float:
    """A client sending wrong keys one after another, each as soon as the last is answered:
    the time its `tries` guesses take."""
    for _ in range(tries):
        turn, at = backoff.reserve(["id:alice"], now)
        assert turn
        now = at
        backoff.done(["id:alice"], False, now)
        log.failed(now, "alice", "", False, "wrong key")
        log.flush(now)
    return now


def test_ten_thousand_wrong_keys_take_over_100_s_and_write_under_20_lines() -> None:
    lines: list[tuple[str, dict[str, object]]] = []
    log = FailureLog(lambda event, fields: lines.append((event, fields)))
    elapsed = attack(Backoff(), log, 10_000)
    log.flush(elapsed + SUMMARY_WINDOW_S)  # the last window's summary
    assert elapsed >= 100
    assert elapsed == pytest.approx((10_000 - 9) * MAX_DELAY_S, rel=0.01)  # 20 guesses a second
    assert len(lines) <= 20
    assert lines[0] == ("auth failed", {"client_id": "alice", "reason": "wrong key"})
    assert sum(int(f["failures"]) for _, f in lines[1:]) == 10_000 - 1  # type: ignore[call-overload]
    assert all(f["client_ids"] == f"alice:{f['failures']}" for _, f in lines[1:])


def test_the_first_failures_are_free_then_the_delay_doubles_to_its_cap() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(FREE_FAILURES)] == [0.0] * FREE_FAILURES
    assert [backoff.delay(FREE_FAILURES + n) for n in range(6)] == [
        BASE_DELAY_S,
        2 * BASE_DELAY_S,
        4 * BASE_DELAY_S,
        8 * BASE_DELAY_S,
        MAX_DELAY_S,
        MAX_DELAY_S,
    ]


def test_a_burst_from_many_connections_is_spaced_and_the_rest_refused_unchecked() -> None:
    backoff = Backoff()
    turns = [backoff.reserve(["id:alice"], 0.0) for _ in range(1000)]
    checked = [at for turn, at in turns if turn]
    refused = [after for turn, after in turns if not turn]
    # Waiting attempts count as failures in advance: the burst is spaced like failures are.
    assert checked[: FREE_FAILURES + 1] == [0.0] * (FREE_FAILURES + 1)
    assert max(checked) <= MAX_WAIT_S
    assert len(checked) <= FREE_FAILURES + MAX_WAIT_S / MAX_DELAY_S + 5
    assert len(refused) == 1000 - len(checked) and min(refused) > 0


def test_the_owner_gets_in_after_an_attack_and_resets_the_count() -> None:
    backoff = Backoff()
    log = FailureLog(lambda event, fields: None)
    now = attack(backoff, log, 50)
    turn, at = backoff.reserve(["id:alice"], now)
    assert turn and at - now <= MAX_DELAY_S
    backoff.done(["id:alice"], True, at)
    assert "id:alice" not in backoff.tracks  # a success forgets the failures
    assert backoff.reserve(["id:alice"], at) == (True, at)


def test_an_address_is_slowed_whatever_client_ids_it_tries() -> None:
    backoff = Backoff()
    now = 0.0
    for n in range(40):
        keys = [f"id:user{n}", "addr:10.0.0.9"]
        turn, now = backoff.reserve(keys, now)
        assert turn
        backoff.done(keys, False, now)
    assert now >= (40 - 9) * MAX_DELAY_S
    assert backoff.reserve(["id:user0", "addr:10.0.0.8"], now) == (True, now)


def test_failures_are_forgotten_and_the_table_stays_bounded() -> None:
    backoff = Backoff(max_tracked=100)
    for n in range(1000):
        backoff.reserve([f"id:x{n}"], 0.0)
        backoff.done([f"id:x{n}"], False, 0.0)
    assert len(backoff.tracks) == 100
    attack(backoff, FailureLog(lambda event, fields: None), 20, 1.0)
    assert backoff.tracks["id:alice"].failures == 20
    backoff.reserve(["id:bob"], 1.0 + FORGET_S + 1)
    assert "id:alice" not in backoff.tracks and len(backoff.tracks) == 1


def test_the_failure_log_writes_the_first_at_once_then_one_summary_per_window() -> None:
    lines: list[tuple[str, dict[str, object]]] = []
    log = FailureLog(lambda event, fields: lines.append((event, fields)), window_s=60)
    log.failed(0.0, "eve", "10.0.0.9", False, "wrong key")
    assert lines == [
        ("auth failed", {"client_id": "eve", "address": "10.0.0.9", "reason": "wrong key"})
    ]
    for n in range(2000):
        log.failed(1.0 + n * 0.01, f"id{n % 1500}", "10.0.0.9", n % 2 == 0, "wrong key")
    log.flush(59.0)
    assert len(lines) == 1
    log.flush(60.0)
    event, fields = lines[1]
    assert event == "auth failures" and fields["failures"] == 2000
    assert fields["refused_unchecked"] == 1000 and fields["addresses"] == "10.0.0.9:2000"
    assert str(fields["client_ids"]).endswith(f",+{SUMMARY_KINDS + 1 - SUMMARY_TOP} more")
    log.flush(200.0)  # a window without failures: quiet again
    log.failed(201.0, "eve", "", False, "wrong key")
    assert len(lines) == 3 and lines[2][0] == "auth failed"


# ---- text logs and bodies ----------------------------------------------------------------------


def format_line(**fields: object) -> str:
    record = logging.LogRecord("auth", logging.WARNING, __file__, 1, "auth failed", None, None)
    record.fields = fields
    return EventFormatter("text").format(record)


@pytest.mark.parametrize(
    "evil",
    [
        "\x1b[2J\x1b[31mroot",  # ANSI: clear the screen, red
        "x\x9b2J",  # the 8-bit CSI
        "a\x7fb\x08c",  # DEL, backspace
        "ok\nlevel=info event=forged",  # a forged line
        "ok\rforged",
        "file\u202etxt.exe",  # right-to-left override
        "a\u2028b\u0085c",  # line and next-line separators
        "\U000e0001tag",  # a non-printable beyond the BMP
    ],
)
def test_text_logs_escape_every_control_character(evil: str) -> None:
    line = format_line(client_id=evil, n=1)
    assert line.isprintable() and "\\" in line
    value = line.split("client_id=", 1)[1].rsplit(" n=1", 1)[0]
    assert json.loads(value) == evil  # escaped, not lost


def test_plain_values_stay_bare_and_others_are_quoted() -> None:
    line = format_line(a="alice", b="two words", c='q"uote', d="back\\slash", e="é", f="")
    assert line.endswith('a=alice b="two words" c="q\\"uote" d="back\\\\slash" e=é f=""')


def test_a_body_of_many_maps_is_refused_early_and_cheaply(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []  # every map and array msgpack built before the refusal
    counter = wire._counter

    def spying_counter(limit: int) -> Callable[[object], object]:
        count = counter(limit)

        def hook(value: object) -> object:
            built.append(value)
            return count(value)

        return hook

    monkeypatch.setattr(wire, "_counter", spying_counter)
    bomb = msgpack.packb({"op": "ping", "x": [[{}] * 8000] * 120})  # 960,122 containers
    with pytest.raises(BadRequest, match="more than 8192 maps and arrays"):
        wire.unpack(bomb, 1 << 20)
    assert len(built) == 8193  # stopped at the first container past the limit, not at the end
    monkeypatch.undo()
    with pytest.raises(BadRequest, match="exceeds max_array_len"):
        wire.unpack(msgpack.packb({"op": "x", "a": [0] * 10_000}), 1 << 20)
    with pytest.raises(BadRequest, match="exceeds max_map_len"):
        wire.unpack(msgpack.packb({"op": "x", "m": {str(n): n for n in range(300)}}), 1 << 20)
    with pytest.raises(BadRequest, match="exceeds max_str_len"):
        wire.unpack(msgpack.packb({"op": "x", "s": "x" * 3000}), 1 << 20, wire.BEFORE_AUTH)
    chat = [{"role": "user", "content": "hi"}] * 1000
    assert len(wire.unpack(msgpack.packb({"op": "infer", "messages": chat}))["messages"]) == 1000


def test_before_auth_a_body_is_one_small_flat_map() -> None:
    auth = {"op": "auth", "id": 1, "client_id": "c" * 256, "api_key": "k" * 1024}
    frames = wire.client_frames(auth)
    assert wire.parse_client_frames(frames, 1 << 20, wire.BEFORE_AUTH) == auth
    with pytest.raises(TooLarge, match="limit is 4096"):
        wire.unpack(wire.pack({"op": "ping", "pad": "x" * 5000}), 1 << 20, wire.BEFORE_AUTH)
    with pytest.raises(BadRequest, match="more than 4 maps and arrays"):
        wire.unpack(wire.pack({"op": "ping", "x": [[], [], [], []]}), 1 << 20, wire.BEFORE_AUTH)


# ---- the systemd unit --------------------------------------------------------------------------

UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "inferencecenter.service"


def test_the_systemd_unit_bounds_and_confines_the_daemon(tmp_path: Path) -> None:
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line[:40]
    )
    assert int(settings["LimitNOFILE"]) >= 65536
    assert settings["MemoryMax"].endswith("G") and int(settings["TasksMax"]) >= 256
    assert settings["SystemCallFilter"] == "@system-service"
    assert settings["ProtectProc"] == "invisible" and settings["UMask"] == "0077"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"  # the supervisor: reload clients
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / UNIT.name  # verify wants the ExecStart program to exist
    program = str(Path(sys.executable).with_name("inferencecenter"))
    unit.write_text(
        UNIT.read_text().replace("/opt/inferencecenter/.venv/bin/inferencecenter", program)
    )
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_keys_migrate_runs_as_a_module(tmp_path: Path) -> None:
    clients = tmp_path / "c.json"
    clientsfile.save(clients, [ClientEntry("bob", OTHER)])
    command = [sys.executable, "-m", "inferencecenter.clients.keys", "migrate"]
    result = subprocess.run(
        [*command, "--clients", str(clients), "--credentials", str(tmp_path / "k.json")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "1 key(s)" in result.stdout, result.stderr
    assert OTHER not in clients.read_text()

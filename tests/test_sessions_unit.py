"""Unit tests of the sessions actor's state without sockets: the journal under --state-dir
(append, replay, reset, remove, compaction, a torn tail, the old one-file-per-session format)
and the expiry decision, against a fake engine link."""

from __future__ import annotations

import json
import stat
import time
from array import array
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from inferencecenter.actors.config import Config
from inferencecenter.actors.sessions import (
    SessionJournal,
    SessionRecord,
    SessionsActor,
    SessionTable,
)
from inferencecenter.protocol.errors import InternalError, NotFound


def token_bytes(*ids: int) -> bytes:
    return array("i", ids).tobytes()


def open_table(state: Path, compact_min_bytes: int = 1 << 20) -> SessionTable:
    return SessionTable(SessionJournal(state, compact_min_bytes))


def reopen(table: SessionTable, state: Path, compact_min_bytes: int = 1 << 20) -> SessionTable:
    """The table a restarted daemon gets from the same state dir."""
    assert table.journal is not None
    table.journal.close()
    return open_table(state, compact_min_bytes)


def described(table: SessionTable) -> dict[str, tuple[Any, ...]]:
    """Everything a session keeps across a restart (not its use time, which starts anew)."""
    return {
        s.session_id: (
            s.client_id,
            s.model,
            s.created,
            s.system_prompt,
            bytes(s.tokens),
            s.chat,
        )
        for s in table.sessions.values()
    }


def journal_size(state: Path) -> int:
    return (state / "sessions.journal").stat().st_size


def test_appends_are_replayed_in_order_after_a_restart(tmp_path: Path) -> None:
    table = open_table(tmp_path)
    first = table.create("alice", 4, "gemma", "Be terse.")
    second = table.create("bob", 4, "gemma", None)
    table.append(first.session_id, token_bytes(1, 2, 3), [], False)
    table.append(
        second.session_id,
        token_bytes(9),
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        False,
    )
    table.append(first.session_id, token_bytes(4, 5), [], False)
    restarted = reopen(table, tmp_path)
    assert described(restarted) == described(table)
    assert restarted.sessions[first.session_id].tokens == token_bytes(1, 2, 3, 4, 5)
    assert restarted.sessions[second.session_id].chat[1]["content"] == "yo"
    assert stat.S_IMODE((tmp_path / "sessions.journal").stat().st_mode) == 0o600


def test_a_turn_writes_what_it_added_not_the_conversation(tmp_path: Path) -> None:
    table = open_table(tmp_path)
    record = table.create("alice", 4, "gemma", None)
    for _ in range(20):
        table.append(record.session_id, token_bytes(*range(100)), [], False)
    before = journal_size(tmp_path)
    table.append(record.session_id, token_bytes(*range(100)), [], False)
    grown = journal_size(tmp_path) - before
    assert 400 <= grown < 400 + 120  # 100 int32 ids and a record's few fields
    assert len(record.tokens) == 21 * 400


def test_reset_replaces_the_history_before_its_tokens(tmp_path: Path) -> None:
    table = open_table(tmp_path)
    record = table.create("alice", 4, "gemma", None)
    table.append(record.session_id, token_bytes(1, 2), [{"role": "user", "content": "a"}], False)
    table.append(record.session_id, token_bytes(7), [{"role": "user", "content": "b"}], True)
    restarted = reopen(table, tmp_path)
    again = restarted.sessions[record.session_id]
    assert (bytes(again.tokens), again.chat) == (token_bytes(7), [{"role": "user", "content": "b"}])


def test_removed_sessions_stay_removed_and_unknown_ones_are_not_found(tmp_path: Path) -> None:
    table = open_table(tmp_path)
    kept = table.create("alice", 4, "gemma", None)
    gone = table.create("alice", 4, "gemma", None)
    table.append(gone.session_id, token_bytes(1), [], False)
    table.remove(gone.session_id)
    with pytest.raises(NotFound):
        table.remove(gone.session_id)
    assert table.append(gone.session_id, token_bytes(2), [], False) is None
    restarted = reopen(table, tmp_path)
    assert list(restarted.sessions) == [kept.session_id]


def converse(table: SessionTable) -> list[SessionRecord]:
    """Eight sessions, twenty turns each; the first is reset at turn 10, five of them are
    closed at turn 15."""
    sessions = [table.create("alice", 100, "gemma", f"prompt {n}") for n in range(8)]
    for turn in range(20):
        for n, record in enumerate(sessions):
            if record.session_id in table.sessions:
                chat = [{"role": "user", "content": f"turn {turn}"}]
                table.append(record.session_id, token_bytes(turn, n), chat, (turn, n) == (10, 0))
        if turn == 15:
            for record in sessions[1:6]:
                table.remove(record.session_id)
    return sessions


def test_compaction_keeps_exactly_the_live_state(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    plain = open_table(tmp_path / "plain", compact_min_bytes=1 << 30)
    converse(plain)
    table = open_table(tmp_path, compact_min_bytes=2048)
    sessions = converse(table)
    assert table.journal is not None
    assert journal_size(tmp_path) <= 2 * table.journal.live.total
    assert journal_size(tmp_path) < journal_size(tmp_path / "plain") / 2
    restarted = reopen(table, tmp_path, compact_min_bytes=2048)
    assert described(restarted) == described(table)
    # The same conversations as without compaction (ids and times aside: they are new ones).
    assert sorted(d[3:] for d in described(table).values()) == sorted(
        d[3:] for d in described(plain).values()
    )
    assert sorted(restarted.sessions) == sorted(s.session_id for s in sessions[:1] + sessions[6:])
    assert restarted.sessions[sessions[0].session_id].tokens == b"".join(
        token_bytes(turn, 0) for turn in range(10, 20)
    )
    assert not (tmp_path / "sessions.journal.tmp").exists()


def test_a_torn_last_record_is_ignored_and_the_journal_goes_on(tmp_path: Path) -> None:
    table = open_table(tmp_path)
    record = table.create("alice", 4, "gemma", None)
    table.append(record.session_id, token_bytes(1, 2), [], False)
    whole = journal_size(tmp_path)
    table.append(record.session_id, token_bytes(3, 4, 5, 6), [], False)
    assert table.journal is not None
    table.journal.close()
    with open(tmp_path / "sessions.journal", "r+b") as handle:  # a crash mid-write
        handle.truncate(journal_size(tmp_path) - 5)
    restarted = open_table(tmp_path)
    assert restarted.sessions[record.session_id].tokens == token_bytes(1, 2)
    assert journal_size(tmp_path) == whole
    restarted.append(record.session_id, token_bytes(8), [], False)
    again = reopen(restarted, tmp_path)
    assert again.sessions[record.session_id].tokens == token_bytes(1, 2, 8)


def test_a_damaged_last_record_is_ignored(tmp_path: Path) -> None:
    table = open_table(tmp_path)
    record = table.create("alice", 4, "gemma", None)
    table.append(record.session_id, token_bytes(1), [], False)
    assert table.journal is not None
    table.journal.close()
    data = bytearray((tmp_path / "sessions.journal").read_bytes())
    data[-2] ^= 0xFF  # the bytes are all there, but not the ones written
    (tmp_path / "sessions.journal").write_bytes(bytes(data))
    restarted = open_table(tmp_path)
    assert bytes(restarted.sessions[record.session_id].tokens) == b""


def write_old_session_file(directory: Path, record: SessionRecord) -> None:
    """A session as the earlier one-JSON-file-per-session store wrote it."""
    directory.mkdir(exist_ok=True)
    data = {
        "session_id": record.session_id,
        "client_id": record.client_id,
        "model": record.model,
        "created": record.created,
        "system_prompt": record.system_prompt,
        "tokens": bytes(record.tokens).hex(),
        "chat": record.chat,
    }
    (directory / f"{record.session_id}.json").write_text(json.dumps(data))


def test_the_old_one_file_per_session_state_is_migrated_once(tmp_path: Path) -> None:
    first_tokens = bytearray(token_bytes(1))
    chat = [{"role": "user", "content": "x"}]
    old = [
        SessionRecord("s-old1", "alice", "gemma", 1700000000.5, "Be terse.", first_tokens),
        SessionRecord("s-old2", "bob", "gemma", 1700000001.0, None, bytearray(), chat),
    ]
    for record in old:
        write_old_session_file(tmp_path / "sessions", record)
    (tmp_path / "sessions" / "s-bad.json").write_text("{not json")
    table = open_table(tmp_path)
    assert described(table) == {
        r.session_id: (r.client_id, r.model, r.created, r.system_prompt, bytes(r.tokens), r.chat)
        for r in old
    }
    assert not (tmp_path / "sessions").exists()
    table.append("s-old1", token_bytes(2), [], False)
    restarted = reopen(table, tmp_path)
    assert restarted.sessions["s-old1"].tokens == token_bytes(1, 2)
    assert sorted(restarted.sessions) == ["s-old1", "s-old2"]


def test_quota_is_limit_reached(tmp_path: Path) -> None:
    from inferencecenter.protocol.errors import LimitReached

    table = SessionTable()
    table.create("carol", 1, "gemma", None)
    with pytest.raises(LimitReached):
        table.create("carol", 1, "gemma", None)
    table.create("alice", 1, "gemma", None)


# ---- expiry, against a fake engine link ----------------------------------------------


class FakeEngineLink:
    """Stands in for the ActorLink to the engine: answers `close` as it is told to."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.pushed: list[tuple[str, dict[str, Any]]] = []

    async def request(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        self.requests.append((op, fields))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def push(self, op: str, **fields: Any) -> None:
        self.pushed.append((op, fields))


class FakeModels:
    """Stands in for the ModelDirectory: every model's engine is the fake link."""

    def __init__(self, engine: FakeEngineLink) -> None:
        self.engine = engine

    def running_link(self, model: str) -> FakeEngineLink:
        return self.engine


def expiring_actor(engine: FakeEngineLink) -> tuple[SessionsActor, SessionRecord]:
    config = Config(model="gemma.gguf", session_idle_timeout=5)
    actor = SessionsActor(config, FakeModels(engine))  # type: ignore[arg-type]
    record = actor.table.create("alice", 4, "gemma", None)
    return actor, record


@pytest.mark.parametrize(
    "answer",
    [{"closed": True}, InternalError("the engine actor did not answer close in time")],
    ids=["idle", "engine-restarting"],
)
def test_an_idle_session_is_expired(answer: dict[str, Any] | Exception) -> None:
    engine = FakeEngineLink(answer)
    actor, record = expiring_actor(engine)
    trio.run(actor.expire, record)
    assert record.session_id not in actor.table.sessions
    assert engine.requests == [("close", {"session_id": record.session_id, "if_idle": True})]


def test_a_generating_session_is_not_expired_and_counts_as_used() -> None:
    engine = FakeEngineLink({"closed": False})
    actor, record = expiring_actor(engine)
    record.last_used -= 100
    asked = time.monotonic()
    trio.run(actor.expire, record)
    assert actor.table.sessions[record.session_id] is record
    assert record.last_used >= asked


def test_a_sweep_expires_only_sessions_idle_past_the_timeout() -> None:
    engine = FakeEngineLink({"closed": True})
    actor, idle = expiring_actor(engine)
    fresh = actor.table.create("alice", 4, "gemma", None)
    idle.last_used = time.monotonic() - 6  # the timeout is 5 s

    async def one_sweep() -> None:
        with trio.move_on_after(1.5):  # sweeps every timeout / 4
            await actor.expire_idle()

    trio.run(one_sweep, clock=MockClock(autojump_threshold=0))
    assert list(actor.table.sessions) == [fresh.session_id]
    assert engine.requests == [("close", {"session_id": idle.session_id, "if_idle": True})]


def test_an_append_marks_the_session_used_and_one_for_an_unknown_session_closes_it() -> None:
    engine = FakeEngineLink({"closed": True})
    actor, record = expiring_actor(engine)
    record.last_used -= 100
    actor.append({"session_id": record.session_id, "tokens": token_bytes(5), "chat": []}, None)  # type: ignore[arg-type]
    assert record.tokens == token_bytes(5) and actor.table.idle_since(record.last_used) == []
    actor.append({"session_id": "s-gone", "tokens": token_bytes(5), "chat": []}, None)  # type: ignore[arg-type]
    assert engine.pushed == [("close", {"session_id": "s-gone"})]

"""Unit tests of the budget book (no I/O, an explicit clock) and of where budgets come from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from inferencecenter.actors.budgets import WINDOW_S, BudgetBook, Budgets, RefusalPenalty
from inferencecenter.actors.config import (
    Config,
    ConfigError,
    add_serve_arguments,
    config_from_args,
)
from inferencecenter.protocol import clientsfile
from inferencecenter.protocol.errors import RateLimited

KEY = "k" * 40


def test_max_queued_refuses_the_next_infer_until_one_ends() -> None:
    book, budgets = BudgetBook(), Budgets(max_queued=2)
    book.admit("alice", budgets, 1, 0.0)
    book.admit("alice", budgets, 11, 0.0)
    with pytest.raises(RateLimited, match=r"max_queued \(2\)") as refused:
        book.admit("alice", budgets, 2, 0.0)
    assert refused.value.retry_after_s > 0
    book.admit("bob", budgets, 3, 0.0)  # another client has its own count
    book.release("alice", 11, 5, 1.0)
    book.admit("alice", budgets, 4, 1.0)
    assert book.in_flight("alice") == 2


def test_tokens_per_minute_is_a_sliding_window_with_an_exact_retry_after() -> None:
    book, budgets = BudgetBook(), Budgets(max_queued=0, tokens_per_minute=100)
    for t, tokens in ((0.0, 30), (10.0, 50), (20.0, 40)):
        book.admit("alice", budgets, int(t), t)
        book.release("alice", int(t), tokens, t)
    # 120 in the window: under 100 once the 30 of t=0 leave it, at t=60.
    with pytest.raises(RateLimited, match=r"tokens_per_minute \(100\)") as refused:
        book.admit("alice", budgets, 99, 25.0)
    assert refused.value.retry_after_s == pytest.approx(WINDOW_S - 25.0)
    with pytest.raises(RateLimited):
        book.admit("alice", budgets, 99, WINDOW_S - 0.001)
    book.admit("alice", budgets, 99, WINDOW_S)  # 90 left in the window


def test_a_refusal_counts_nothing_and_the_book_forgets_idle_clients() -> None:
    book, budgets = BudgetBook(), Budgets(max_queued=1, tokens_per_minute=10)
    book.admit("alice", budgets, 1, 0.0)
    with pytest.raises(RateLimited):
        book.admit("alice", budgets, 2, 0.0)
    assert book.in_flight("alice") == 1
    book.release("alice", 1, 0, 0.0)
    assert "alice" not in book.clients
    book.release("nobody", 7, 3, 0.0)  # never admitted: ignored
    assert "nobody" not in book.clients


def test_an_entry_overrides_the_daemon_defaults(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    entries = [
        {"client_id": "a", "api_key": KEY, "max_queued": 0, "tokens_per_minute": 500},
        {"client_id": "b", "api_key": KEY + "b"},
    ]
    path.write_text(json.dumps({"clients": entries}))
    path.chmod(0o600)
    a, b = clientsfile.load(path)
    defaults = Budgets.defaults(Config(model="m.gguf", max_prompt_tokens=300, max_queued=4))
    assert defaults.overridden(a) == Budgets(300, 0, 500)
    assert defaults.overridden(b) == defaults == Budgets(300, 4, 0)
    assert Budgets.from_wire(defaults.overridden(a).to_wire()) == Budgets(300, 0, 500)
    # Saved again, an entry keeps its own budgets and writes none it does not have.
    clientsfile.save(path, [a, b])
    saved = json.loads(path.read_text())["clients"]
    assert saved[0]["tokens_per_minute"] == 500 and "max_queued" not in saved[1]


@pytest.mark.parametrize("value", [-1, 1.5, True, "10", 2**31])
def test_a_bad_budget_in_the_clients_file_is_refused(tmp_path: Path, value: object) -> None:
    path = tmp_path / "clients.json"
    entry = {"client_id": "a", "api_key": KEY, "max_queued": value}
    path.write_text(json.dumps({"clients": [entry]}))
    path.chmod(0o600)
    with pytest.raises(clientsfile.ClientsFileError, match=r"clients\[0\]\.max_queued"):
        clientsfile.load(path)


@pytest.mark.parametrize("flag", ["--max-prompt-tokens", "--max-queued", "--tokens-per-minute"])
def test_a_negative_budget_flag_is_refused_with_its_name(tmp_path: Path, flag: str) -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([flag, "-1", "--clients", str(tmp_path / "clients.json")])
    with pytest.raises(ConfigError, match=flag):
        config_from_args(args)


def test_refusals_in_a_row_make_the_connection_wait_longer_up_to_a_second() -> None:
    penalty = RefusalPenalty()
    waits = []
    for now in range(15):
        penalty.refused(float(now))
        waits.append(round(penalty.until - now, 3))
    assert waits[:3] == [0.1, 0.2, 0.3] and waits[-1] == 1.0
    penalty.served()
    penalty.refused(100.0)
    assert penalty.until == pytest.approx(100.1)

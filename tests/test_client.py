"""The client library and the CLI's client commands against the real daemon and model."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from inferencecenter.clients import (
    AsyncClient,
    AuthFailed,
    BadRequest,
    Client,
    CredentialsError,
    Generation,
    InternalError,
    MetricsSubscriber,
    TooLarge,
    credentials,
)
from inferencecenter.clients.client import ConnectionLost
from inferencecenter.daemon.testing import Daemon, free_port, start_daemon, stop_daemon
from inferencecenter.protocol import clientsfile, wire

GREEDY: dict[str, Any] = {"temp": 0.0, "max_tokens": 16}
STATS_KEYS = {"prompt_tokens", "cached_tokens", "tokens", "ttft_ms", "total_ms", "tps"}
CLI_DEADLINE_S = 120.0
TEST_CLIENT_ID = "client-library-tests"


def wait_until(check: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Poll `check` until it holds; fail with `what` at the deadline."""
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def authenticates(endpoint: str, client_id: str, api_key: str) -> bool:
    try:
        with Client(endpoint, client_id, api_key, timeout=10):
            return True
    except AuthFailed:
        return False


@pytest.fixture(scope="module")
def creds(daemon: Daemon) -> tuple[str, str]:
    """A client of our own, so sessions other test modules leave behind never hit our quota."""
    entry = clientsfile.add_client(
        daemon.clients_path, TEST_CLIENT_ID, max_sessions=8, description="tests/test_client.py"
    )
    wait_until(
        lambda: authenticates(daemon.endpoint, entry.client_id, entry.api_key),
        "the daemon to accept a client added to its clients file",
    )
    return entry.client_id, entry.api_key


@pytest.fixture
def client(daemon: Daemon, creds: tuple[str, str]) -> Iterator[Client]:
    with Client(daemon.endpoint, *creds) as connected:
        yield connected


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", *args],
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE_S,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def connection_args(daemon: Daemon, creds: tuple[str, str]) -> list[str]:
    return ["--endpoint", daemon.endpoint, "--client-id", creds[0], "--api-key", creds[1]]


# ---- connecting -------------------------------------------------------------------------


def test_client_authenticates_and_describes_the_server(
    daemon: Daemon, creds: tuple[str, str]
) -> None:
    with Client(daemon.endpoint, *creds) as client:
        assert client.client_id == TEST_CLIENT_ID
        assert client.max_sessions == 8
        assert client.priority == "normal"
        assert client.server["protocol"] == 1.1
        assert client.server["models"] and all(isinstance(m, str) for m in client.server["models"])
        assert 0 < client.ping() < 5
    assert client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.ping()


def test_wrong_key_raises_auth_failed_without_echoing_it(daemon: Daemon) -> None:
    with pytest.raises(AuthFailed) as failure:
        Client(daemon.endpoint, daemon.client_id, "not-the-right-key-42")
    assert "not-the-right-key-42" not in str(failure.value)


def test_no_daemon_is_a_clear_timeout_not_a_hang() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="is the daemon running"):
        Client(endpoint, "someone", "some-key-123456", timeout=0.5)
    assert time.monotonic() - started < 5


def test_a_stopped_daemon_is_a_clear_exception_within_the_timeout(tmp_path: Path) -> None:
    """The daemon goes away under connected clients: their requests fail within the client's
    timeout with a TimeoutError that says the connection dropped; nothing hangs."""
    own = start_daemon(tmp_path)
    timeout = 2.0
    dropped = r"connection dropped .* is the daemon running"
    try:
        with Client(own.endpoint, own.client_id, own.api_key, timeout=timeout) as client:
            session = client.create_session()

            async def trio_client_sees_the_daemon_stop() -> None:
                async with AsyncClient(
                    own.endpoint, own.client_id, own.api_key, timeout=timeout
                ) as async_client:
                    assert await async_client.ping() > 0
                    assert await trio.to_thread.run_sync(stop_daemon, own.process) == 0
                    started = time.monotonic()
                    with pytest.raises(TimeoutError, match=dropped):
                        await async_client.ping()
                    assert time.monotonic() - started < timeout + 1

            trio.run(trio_client_sees_the_daemon_stop)
            for attempt in (client.ping, lambda: next(session.infer("Hi", max_tokens=2))):
                started = time.monotonic()
                with pytest.raises(TimeoutError, match=dropped):
                    attempt()
                assert time.monotonic() - started < timeout + 1
    finally:
        stop_daemon(own.process)


def test_client_authenticates_again_when_the_daemon_dropped_the_connection(
    daemon: Daemon, creds: tuple[str, str]
) -> None:
    with Client(daemon.endpoint, *creds, timeout=2) as client:
        # A frame over the transport's hard cap (the fixture's daemon has the default limit):
        # the daemon drops this connection, ZeroMQ reconnects, and the daemon sees a new
        # connection that has not authenticated. (Forgotten at once: resending it would only
        # drop the connection again.)
        padding = "x" * wire.hard_cap(wire.DEFAULT_MAX_MESSAGE_BYTES)
        client._forget(client._start({"op": "ping", "padding": padding}))

        def pong() -> bool:
            try:
                client.ping()
                return True
            except TimeoutError:
                return False

        wait_until(pong, "the connection to come back")
        with client.create_session() as session:
            assert session.infer("Hi", max_tokens=2).wait() is not None
        assert client._tracker.reauthentications == 1


# ---- sessions and generations ------------------------------------------------------------


def test_infer_streams_pieces_then_finish_reason_and_stats(client: Client) -> None:
    with client.create_session() as session:
        assert session.session_id and session.model in client.server["models"]
        assert session.ctx_size is not None and session.ctx_size > 0
        gen = session.infer("The capital of France is", temp=0, max_tokens=12)
        pieces = list(gen)
        assert pieces and "".join(pieces) == gen.text
        assert gen.finish_reason in ("length", "stop")
        assert gen.stats is not None and STATS_KEYS <= set(gen.stats)
        assert 1 <= gen.stats["tokens"] <= 12
        assert gen.stats["prompt_tokens"] > 0
        if gen.finish_reason == "length":
            assert gen.stats["tokens"] == 12
        with pytest.raises(StopIteration):
            next(gen)


def test_bad_params_are_refused_before_sending(client: Client) -> None:
    with client.create_session() as session:
        with pytest.raises(BadRequest, match="temp"):
            session.infer("Hi", temp=-1)
        with pytest.raises(BadRequest, match="unknown param"):
            session.infer("Hi", temperature=0.5)
        with pytest.raises(BadRequest, match="exactly one"):
            session.infer()
        # Nothing reached the daemon: the session is still idle and empty.
        listed = {s["session_id"]: s for s in client.list_sessions()}
        assert listed[session.session_id]["state"] == "idle"
        assert listed[session.session_id]["tokens"] == 0


def test_greedy_output_is_reproducible_across_sessions(client: Client) -> None:
    texts = []
    for _ in range(2):
        with client.create_session() as session:
            texts.append(session.infer("Write a short poem about the sea.", **GREEDY).wait())
    assert texts[0] and texts[0] == texts[1]


def test_context_persists_between_infers(client: Client) -> None:
    with client.create_session() as session:
        first = session.infer("My name is Ada.", **GREEDY)
        first.wait()
        second = session.infer(" What is my name?", **GREEDY)
        second.wait()
        assert second.stats is not None and second.stats["cached_tokens"] > 0


def test_abort_ends_a_running_generation_with_aborted(client: Client) -> None:
    with client.create_session() as session:
        gen = session.infer("Count from one to one thousand:", max_tokens=500, ignore_eos=True)
        assert next(gen) is not None
        gen.abort()
        gen.wait()
        assert gen.finish_reason == "aborted"
        assert gen.stats is not None and gen.stats["tokens"] < 500
        # The session is idle again and takes the next infer.
        after = session.infer("Hello", max_tokens=4)
        after.wait()
        assert after.finish_reason in ("length", "stop")


def test_two_generations_consumed_interleaved_from_one_thread(client: Client) -> None:
    with client.create_session() as one, client.create_session() as two:
        gens = [
            one.infer("The sky is", temp=0, max_tokens=20),
            two.infer("Python is a language that", temp=0, max_tokens=20),
        ]
        pieces: list[list[str]] = [[], []]
        while not all(g.done for g in gens):
            for index, gen in enumerate(gens):
                piece = next(gen, None)
                if piece is not None:
                    pieces[index].append(piece)
        for gen, got in zip(gens, pieces, strict=True):
            assert got and "".join(got) == gen.text
            assert gen.finish_reason in ("length", "stop")
            # A piece may hold several tokens (a character split over tokens, an end token).
            assert gen.stats is not None and len(got) <= gen.stats["tokens"] <= 20


def test_two_threads_each_consume_their_own_generation(client: Client) -> None:
    results: dict[int, Generation] = {}
    failures: list[BaseException] = []

    def consume(index: int, gen: Generation) -> None:
        try:
            gen.wait()
            results[index] = gen
        except BaseException as exc:
            failures.append(exc)

    with client.create_session() as one, client.create_session() as two:
        gens = [one.infer("Once upon a time", **GREEDY), two.infer("In a galaxy", **GREEDY)]
        threads = [
            threading.Thread(target=consume, args=(i, g), daemon=True) for i, g in enumerate(gens)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        assert sorted(results) == [0, 1]
        for gen in results.values():
            assert gen.text and gen.finish_reason in ("length", "stop")


def test_list_sessions_and_stats(client: Client) -> None:
    with client.create_session() as session:
        session.infer("Hello there", temp=0, max_tokens=4).wait()
        listed = {s["session_id"]: s for s in client.list_sessions()}
        mine = listed[session.session_id]
        assert mine["state"] == "idle" and mine["tokens"] > 0
        assert mine["model"] == session.model
        stats = client.stats()
        assert stats["sessions"] >= 1 and "tokens_per_second" in stats["inference"]
    assert session.session_id not in {s["session_id"] for s in client.list_sessions()}


# ---- what the real daemon seldom shows: a scripted peer ----------------------------------


# In a script's answer: drop every connection here, then serve again (ScriptedDaemon.restart).
CRASH: dict[str, Any] = {"op": "crash"}


class ScriptedDaemon:
    """A ROUTER answering from a script, for client behaviour a healthy daemon rarely shows."""

    def __init__(self, answer: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        self.answer = answer
        self.seen: list[str] = []
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(20):
                peer, *frames = self.sock.recv_multipart()
                request = wire.parse_client_frames(frames, 1 << 20)
                self.seen.append(request["op"])
                for reply in self.answer(request):
                    if reply is CRASH:
                        self.restart()
                        break
                    self.sock.send_multipart([peer, *wire.client_frames(reply)])

    def restart(self) -> None:
        """As a daemon's gateway killed and started again: every connection drops, and the
        same endpoint serves again (knowing no connection as authenticated)."""
        self.sock.close(linger=0)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        end = time.monotonic() + 5
        while True:
            try:
                self.sock.bind(self.endpoint)
                return
            except zmq.ZMQError as exc:  # ZeroMQ's I/O thread frees the port a moment later
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > end:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_client_reauthenticates_flags_lost_tokens_and_takes_id_less_errors() -> None:
    refused = []

    def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
        op, request_id = request["op"], request.get("id")
        if op == "auth":
            server = {"name": "scripted", "version": "0", "protocol": 1, "models": ["m"]}
            success = {"client_id": "x", "max_sessions": 1, "priority": "normal", "server": server}
            return [{"op": "auth_success", "id": request_id, **success}]
        if op == "create_session" and not refused:
            # As after a reconnect: the daemon no longer knows this connection.
            refused.append(request_id)
            return [{"op": "error", "id": request_id, "code": "unauthenticated", "message": "?"}]
        if op == "create_session":
            created = {"session_id": "s-1", "model": "m", "ctx_size": 64}
            return [{"op": "session_created", "id": request_id, **created}]
        if request.get("prompt") == "gap":
            return [
                {"op": "token", "id": request_id, "session_id": "s-1", "seq": 0, "content": "a"},
                {"op": "token", "id": request_id, "session_id": "s-1", "seq": 2, "content": "c"},
            ]
        # The daemon could not read this request's id, as with a body over the size limit.
        return [{"op": "error", "code": "too_large", "message": "body is too large"}]

    scripted = ScriptedDaemon(answer)
    try:
        with Client(scripted.endpoint, "x", "x-key-123456", timeout=5) as client:
            session = client.create_session()
            assert session.session_id == "s-1"
            assert scripted.seen == ["auth", "create_session", "auth", "create_session"]
            gap = session.infer("gap")
            assert next(gap) == "a"
            with pytest.raises(InternalError, match="seq"):
                next(gap)
            with pytest.raises(TooLarge):
                session.infer("big").wait()
    finally:
        scripted.close()


Script = Callable[[dict[str, Any]], list[dict[str, Any]]]


def crashing_script() -> tuple[Script, list[str]]:
    """A daemon that crashes (ScriptedDaemon.restart) the first time it gets certain requests,
    and the sessions it was asked to abort."""
    crashed: set[str] = set()
    aborted: list[str] = []

    def once(what: str) -> bool:
        """True the first time: crash on it."""
        first = what not in crashed
        crashed.add(what)
        return first

    def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
        op, request_id = request["op"], request.get("id")
        session = {"id": request_id, "session_id": request.get("session_id")}
        if op == "auth":
            server = {"name": "scripted", "version": "0", "protocol": 1, "models": ["m"]}
            success = {"client_id": "x", "max_sessions": 4, "priority": "normal", "server": server}
            return [{"op": "auth_success", "id": request_id, **success}]
        if op == "ping":
            return [{"op": "pong", "id": request_id, "time": time.time()}]
        if op == "close_session":
            # The first copy closed the session, then the daemon died before answering.
            if once("close"):
                return [CRASH]
            return [{"op": "error", **session, "code": "not_found", "message": "no session"}]
        if op == "abort":
            aborted.append(request["session_id"])
            return [{"op": "aborted", **session}]
        prompt = request.get("prompt")
        if prompt == "lost before any token" and once(prompt):
            return [CRASH]
        if prompt == "running elsewhere" and once(prompt):
            return [CRASH]
        if prompt == "running elsewhere":  # the first copy runs, its stream went with the crash
            return [{"op": "error", **session, "code": "busy", "message": "still generating"}]
        if prompt == "cut off" and once(prompt):
            return [{"op": "token", **session, "seq": 0, "content": "half"}, CRASH]
        return [
            {"op": "token", **session, "seq": 0, "content": "whole"},
            {"op": "end", **session, "finish_reason": "stop", "stats": {"tokens": 1}},
        ]

    return answer, aborted


def test_client_resends_what_a_crash_left_unanswered() -> None:
    """After a reconnect: auth first, then every request without a reply, under its id."""
    answer, aborted = crashing_script()
    scripted = ScriptedDaemon(answer)
    try:
        with Client(scripted.endpoint, "x", "x-key-123456", timeout=1.5) as client:
            session = client.session("s-1")
            session.close()  # not_found for the resend: the first copy did it
            assert scripted.seen == ["auth", "close_session", "auth", "close_session"]
            assert client._tracker.reauthentications == 1

            assert session.infer("lost before any token").wait() == "whole"

            started = time.monotonic()
            with pytest.raises(ConnectionLost, match="did not come back"):
                session.infer("running elsewhere").wait()
            assert time.monotonic() - started < 1.5 + 1

            cut_off = session.infer("cut off")
            assert next(cut_off) == "half"
            with pytest.raises(ConnectionLost, match="dropped"):
                next(cut_off)
            assert cut_off.finish_reason == "error" and cut_off.text == "half"
            # Nobody can receive the rest: once connected again the client stops it.
            wait_until(lambda: client.ping() > 0 and aborted == ["s-1"], "the abort", 5)
            assert client._tracker.reauthentications == 4
    finally:
        scripted.close()


def test_async_client_resends_what_a_crash_left_unanswered() -> None:
    answer, aborted = crashing_script()
    scripted = ScriptedDaemon(answer)

    async def main() -> None:
        async with AsyncClient(scripted.endpoint, "x", "x-key-123456", timeout=1.5) as client:
            session = client.session("s-1")
            await session.close()
            assert scripted.seen == ["auth", "close_session", "auth", "close_session"]
            assert await session.infer("lost before any token").wait() == "whole"
            with pytest.raises(ConnectionLost, match="did not come back"):
                await session.infer("running elsewhere").wait()
            cut_off = session.infer("cut off")
            assert await cut_off.__anext__() == "half"
            with pytest.raises(ConnectionLost, match="dropped"):
                await cut_off.__anext__()
            assert cut_off.finish_reason == "error" and cut_off.text == "half"
            with trio.fail_after(5):
                while not aborted:
                    await client.ping()
            assert aborted == ["s-1"] and client._tracker.reauthentications == 4

    try:
        trio.run(main)
    finally:
        scripted.close()


# ---- credentials -------------------------------------------------------------------------


def test_credentials_from_env(
    daemon: Daemon, creds: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(credentials.ENV_CLIENT_ID, creds[0])
    monkeypatch.setenv(credentials.ENV_API_KEY, creds[1])
    monkeypatch.setenv(credentials.ENV_CLIENTS, str(tmp_path / "absent.json"))
    with Client(daemon.endpoint) as client:
        assert client.client_id == creds[0]


def test_credentials_from_clients_file(
    daemon: Daemon, creds: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(credentials.ENV_CLIENT_ID, raising=False)
    monkeypatch.delenv(credentials.ENV_API_KEY, raising=False)
    monkeypatch.setenv(credentials.ENV_CREDENTIALS, str(daemon.clients_path.with_name("none")))
    # Only the id: the key comes from the clients file (the daemon's own, here).
    with Client(daemon.endpoint, creds[0], clients_file=daemon.clients_path) as client:
        assert client.client_id == creds[0]
    # Nothing given: no `local` in that file, so its first entry.
    monkeypatch.setenv(credentials.ENV_CLIENTS, str(daemon.clients_path))
    with Client(daemon.endpoint) as client:
        assert client.client_id == clientsfile.load(daemon.clients_path)[0].client_id


def test_credentials_order_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    clientsfile.add_client(path, "first")
    local = clientsfile.add_client(path, clientsfile.LOCAL_CLIENT_ID)
    monkeypatch.delenv(credentials.ENV_CLIENT_ID, raising=False)
    monkeypatch.delenv(credentials.ENV_API_KEY, raising=False)
    monkeypatch.setenv(credentials.ENV_CLIENTS, str(path))
    monkeypatch.setenv(credentials.ENV_CREDENTIALS, str(tmp_path / "no-credentials.json"))
    found = credentials.resolve()
    assert found == (local.client_id, local.api_key)
    assert local.api_key not in repr(found) and local.api_key not in str(found)
    monkeypatch.setenv(credentials.ENV_CLIENT_ID, "env-id")
    monkeypatch.setenv(credentials.ENV_API_KEY, "env-key-123")
    assert credentials.resolve() == ("env-id", "env-key-123")
    assert credentials.resolve("arg-id", "arg-key-123") == ("arg-id", "arg-key-123")
    monkeypatch.delenv(credentials.ENV_CLIENT_ID)
    monkeypatch.delenv(credentials.ENV_API_KEY)
    with pytest.raises(CredentialsError, match="keygen"):
        credentials.resolve(clients_file=tmp_path / "absent.json")
    with pytest.raises(CredentialsError, match="nobody"):
        credentials.resolve("nobody")


# ---- trio --------------------------------------------------------------------------------


def test_async_client_streams_aborts_and_interleaves(
    daemon: Daemon, creds: tuple[str, str]
) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.endpoint, *creds) as client:
            assert client.client_id == creds[0] and client.server["protocol"] == 1.1
            assert await client.ping() > 0
            async with await client.create_session() as one, await client.create_session() as two:
                done: dict[str, Any] = {}

                async def collect(name: str, gen: Any) -> None:
                    done[name] = ([piece async for piece in gen], gen)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect, "one", one.infer("The moon is", **GREEDY))
                    nursery.start_soon(collect, "two", two.infer("Rivers flow", **GREEDY))
                for pieces, gen in done.values():
                    assert pieces and "".join(pieces) == gen.text
                    assert gen.finish_reason in ("length", "stop")
                    assert STATS_KEYS <= set(gen.stats)

                long = one.infer("Count to one thousand:", max_tokens=500, ignore_eos=True)
                assert await long.__anext__()
                await long.abort()
                await long.wait()
                assert long.finish_reason == "aborted"
                listed = {s["session_id"] for s in await client.list_sessions()}
                assert {one.session_id, two.session_id} <= listed

    trio.run(main)


def test_async_client_wrong_key_raises_auth_failed(daemon: Daemon) -> None:
    async def main() -> None:
        with pytest.raises(AuthFailed):
            async with AsyncClient(daemon.endpoint, daemon.client_id, "wrong-key-0000"):
                pass

    trio.run(main)


# ---- metrics -----------------------------------------------------------------------------


def test_metrics_subscriber_receives_the_documented_shape(daemon: Daemon) -> None:
    with MetricsSubscriber(daemon.metrics_endpoint, timeout=10) as subscriber:
        topic, body = next(subscriber)
    assert topic == "metrics"
    assert isinstance(body["timestamp"], float) and abs(body["timestamp"] - time.time()) < 60
    gpu = body["gpu"]
    assert gpu is None or {
        "name",
        "temp",
        "vram_total_mb",
        "vram_used_mb",
        "vram_free_mb",
        "power_watts",
        "fan_percent",
        "utilization_percent",
        "throttling",
    } <= set(gpu)
    assert {"cpu_percent", "ram_total_mb", "ram_used_mb"} <= set(body["host"])
    assert {
        "active_generations",
        "queued",
        "total_sessions",
        "last_tps",
        "last_ttft_ms",
        "total_tokens_generated",
        "tokens_per_second",
    } <= set(body["inference"])


# ---- the CLI -----------------------------------------------------------------------------


def test_cli_infer_prints_the_text(daemon: Daemon, creds: tuple[str, str]) -> None:
    done = cli("infer", "Hello", *connection_args(daemon, creds), "--max-tokens", "8", "--stats")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "finish_reason=" in done.stderr and creds[1] not in done.stderr + done.stdout


def test_cli_says_when_the_daemon_is_not_running() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    done = cli(
        "infer", "Hello", "--endpoint", endpoint, "--client-id", "x", "--api-key", "x-key-123",
        "--timeout", "1",
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and endpoint in lines[0] and "is the daemon running?" in lines[0]


def test_cli_sessions_lists_this_clients_sessions(
    daemon: Daemon, creds: tuple[str, str], client: Client
) -> None:
    with client.create_session() as session:
        done = cli("sessions", *connection_args(daemon, creds))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["SESSION_ID", "MODEL", "STATE", "TOKENS", "CREATED"]
    assert any(row.split()[0] == session.session_id for row in rows)


def test_cli_metrics_prints_json_lines(daemon: Daemon) -> None:
    done = cli("metrics", "--endpoint", daemon.metrics_endpoint, "--json", "--count", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert all("inference" in json.loads(line) for line in lines)


def test_keygen_writes_a_private_clients_file(tmp_path: Path) -> None:
    path = tmp_path / "config" / "clients.json"
    done = cli("keygen", "dave", "--clients", str(path), "--max-sessions", "3", "--priority", "low")
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert printed["client_id"] == "dave" and printed["api_key"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = clientsfile.load(path)
    assert printed["api_key"] not in path.read_text()  # only its hash is kept
    assert (entry.client_id, entry.api_key) == ("dave", "")
    assert entry.api_key_sha256 == clientsfile.key_sha256(printed["api_key"])
    assert (entry.max_sessions, entry.priority) == (3, "low")
    again = cli("keygen", "dave", "--clients", str(path))
    assert again.returncode != 0 and "--replace" in again.stderr
    assert clientsfile.load(path)[0].api_key_sha256 == entry.api_key_sha256


def test_keygen_key_authenticates_with_the_running_daemon(daemon: Daemon) -> None:
    done = cli("keygen", "keygen-test-client", "--clients", str(daemon.clients_path))
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert stat.S_IMODE(daemon.clients_path.stat().st_mode) == 0o600
    wait_until(
        lambda: authenticates(daemon.endpoint, "keygen-test-client", printed["api_key"]),
        "the daemon to accept the key keygen printed",
    )

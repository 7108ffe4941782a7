"""Revocation against the real daemon: a client removed from the clients file, or re-keyed, loses
its open connections at once (its running generation ends `aborted`, its next request is
`unauthenticated`), whether the file was edited or the daemon got SIGHUP; other clients go on.
Over HTTP, a revoked Bearer key gets 401 and an authenticated /ws connection is refused."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from websockets.sync.client import connect

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    actor_process,
    authenticated,
    close_all_sessions,
    new_session,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import clientsfile

CUT_S = 1.0  # the promise: a revoked connection is cut within a second
LONG = {"max_tokens": 800, "ignore_eos": True}  # runs for many seconds unless cut
SHORT = {"max_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("revocation"), http=True)
    yield running
    code = stop_daemon(running.process)
    assert code == 0, running.log()


@pytest.fixture
def alice(daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(daemon.endpoint, daemon.client_id, daemon.api_key) as client:
        yield client


def add(daemon: Daemon, client_id: str) -> str:
    """A new client with only its key's hash in the file; its key."""
    return clientsfile.add_client(daemon.clients_path, client_id, hash_only=True).api_key


def remove(daemon: Daemon, client_id: str) -> None:
    entries = clientsfile.load(daemon.clients_path)
    clientsfile.save(daemon.clients_path, [e for e in entries if e.client_id != client_id])


def generating(client: RawClient, session_id: str, request_id: str, params: Any) -> None:
    """Start an infer and wait for its first token: it runs now."""
    client.send(
        {
            "op": "infer",
            "id": request_id,
            "session_id": session_id,
            "prompt": "Count:",
            "params": params,
        }
    )
    first = client.recv_for(request_id)
    assert first["op"] == "token", first


def end_of(client: RawClient, request_id: str) -> dict[str, Any]:
    _, end = client.stream(request_id)
    assert end["op"] == "end", end
    return end


def connected(daemon: Daemon, client_id: str, api_key: str) -> tuple[RawClient, str]:
    """A connection authenticated as `client_id`, with a session generating at length."""
    client = RawClient(daemon.endpoint)
    client.auth(client_id, api_key)
    session_id = new_session(client)
    generating(client, session_id, "long", LONG)
    return client, session_id


def assert_cut(client: RawClient, since: float) -> float:
    """The running generation ends `aborted` within CUT_S, and the next request is refused."""
    end = end_of(client, "long")
    elapsed = time.monotonic() - since
    assert end["finish_reason"] == "aborted" and "revoked" in end["message"], end
    assert elapsed < CUT_S, f"cut after {elapsed:.2f} s"
    refused = client.request({"op": "list_sessions"})
    assert refused["op"] == "error" and refused["code"] == "unauthenticated", refused
    assert "revoked" in refused["message"]
    return elapsed


def test_removing_a_client_from_the_file_cuts_its_connection_and_spares_others(
    daemon: Daemon, alice: RawClient
) -> None:
    key = add(daemon, "dave")
    dave, _ = connected(daemon, "dave", key)
    alice_session = new_session(alice)
    generating(alice, alice_session, "alice", SHORT)
    since = time.monotonic()
    remove(daemon, "dave")
    elapsed = assert_cut(dave, since)
    print(f"removed by an edit: cut after {elapsed * 1000:.0f} ms")
    assert end_of(alice, "alice")["finish_reason"] == "length"  # alice's went on to its end
    assert alice.request({"op": "list_sessions"})["op"] == "session_list"
    again = dave.request({"op": "auth", "client_id": "dave", "api_key": key})
    assert again["op"] == "auth_failed", again
    assert "client revoked, connections cut" in daemon.log()
    dave.close()


def test_a_rekeyed_client_is_cut_and_its_new_key_works(daemon: Daemon) -> None:
    old = add(daemon, "erin")
    erin, _ = connected(daemon, "erin", old)
    since = time.monotonic()
    new = add(daemon, "erin")  # `keygen erin --replace`
    assert_cut(erin, since)
    erin.auth("erin", new)
    assert erin.request({"op": "auth", "client_id": "erin", "api_key": old})["op"] == "auth_failed"
    close_all_sessions(erin)
    erin.close()


@pytest.mark.parametrize("change", ["re-keyed", "removed"])
def test_sighup_alone_revokes_a_change_made_without_a_new_mtime(
    daemon: Daemon, change: str
) -> None:
    """The file rewritten in place (same size, inode and mtime): nothing on disk shows a change
    but its content, and SIGHUP makes the daemon read it."""
    client_id = f"frank-{change}"
    key = add(daemon, client_id)
    frank, _ = connected(daemon, client_id, key)
    path = daemon.clients_path
    before = path.stat()
    text = path.read_text()
    if change == "re-keyed":
        new_hash = clientsfile.key_sha256(clientsfile.new_api_key())
        edited = text.replace(clientsfile.key_sha256(key), new_hash)
    else:
        data = json.loads(text)
        data["clients"] = [e for e in data["clients"] if e["client_id"] != client_id]
        shorter = json.dumps(data, indent=2)
        edited = shorter + " " * (len(text) - len(shorter) - 1) + "\n"  # padded to the size
    assert edited != text and len(edited) == len(text)
    with open(path, "r+", encoding="utf-8") as handle:  # in place: the same inode and size
        handle.write(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    )
    assert frank.request({"op": "list_sessions"})["op"] == "session_list"
    since = time.monotonic()
    os.kill(daemon.process.pid, signal.SIGHUP)
    elapsed = assert_cut(frank, since)
    print(f"{change} in place, SIGHUP: cut after {elapsed * 1000:.0f} ms")
    assert f"change={change}" in daemon.log()
    assert daemon.process.poll() is None  # the daemon lives on
    frank.close()


def http_status(daemon: Daemon, key: str) -> int:
    request = urllib.request.Request(
        f"{daemon.http_url}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_http_bearer_and_websocket_of_a_removed_client_are_refused(daemon: Daemon) -> None:
    key = add(daemon, "gina")
    assert http_status(daemon, key) == 200
    with connect(f"ws://127.0.0.1:{daemon.http_port}/ws") as ws:

        def request(body: dict[str, Any]) -> dict[str, Any]:
            ws.send(json.dumps(body))
            reply = json.loads(ws.recv(timeout=30))
            assert isinstance(reply, dict)
            return reply

        assert request({"op": "auth", "client_id": "gina", "api_key": key})["op"] == "auth_success"
        session_id = request({"op": "create_session"})["session_id"]
        ws.send(
            json.dumps(
                {"op": "infer", "session_id": session_id, "prompt": "Count:", "params": LONG}
            )
        )
        assert json.loads(ws.recv(timeout=30))["op"] == "token"
        since = time.monotonic()
        remove(daemon, "gina")
        assert http_status(daemon, key) == 401  # at once: the key is checked against the file
        while True:  # the generation's last tokens, then its end
            message = json.loads(ws.recv(timeout=30))
            if message["op"] != "token":
                break
        elapsed = time.monotonic() - since
        assert message["op"] == "end" and message["finish_reason"] == "aborted", message
        assert "revoked" in message["message"]
        assert elapsed < CUT_S, f"cut after {elapsed:.2f} s"
        refused = request({"op": "create_session"})
        assert refused["op"] == "error" and refused["code"] == "unauthenticated", refused
    print(f"/ws of a removed client: cut after {elapsed * 1000:.0f} ms")
    assert http_status(daemon, daemon.api_key) == 200  # alice's key still works


def test_a_streaming_http_generation_of_a_removed_key_ends_unauthenticated(
    daemon: Daemon,
) -> None:
    key = add(daemon, "hugo")
    body = {"prompt": "Count:", "max_tokens": 800, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        f"{daemon.http_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        events = (line[6:].strip() for line in response if line.startswith(b"data: "))
        first = json.loads(next(events))
        assert "choices" in first, first
        since = time.monotonic()
        remove(daemon, "hugo")
        for data in events:  # the last chunks, then the error that ends the stream
            event = json.loads(data)
            if "error" in event:
                break
        elapsed = time.monotonic() - since
    assert event["error"]["code"] == "unauthenticated", event
    assert "revoked" in event["error"]["message"]
    assert elapsed < CUT_S, f"cut after {elapsed:.2f} s"
    print(f"streaming completion of a removed key: cut after {elapsed * 1000:.0f} ms")


def test_revocation_reaches_the_gateway_after_the_auth_actor_restarted(daemon: Daemon) -> None:
    """The gateway watches the new auth actor: a removal after the restart still cuts."""
    key = add(daemon, "hank")
    hank = RawClient(daemon.endpoint)
    hank.auth("hank", key)
    auth = actor_process(daemon, "auth")
    auth.kill()
    auth.wait(30)
    deadline = time.monotonic() + 60
    probe = RawClient(daemon.endpoint)
    while probe.request({"op": "auth", "client_id": "hank", "api_key": key})["op"] != (
        "auth_success"
    ):
        assert time.monotonic() < deadline, "the auth actor did not come back"
        time.sleep(0.1)  # the supervisor's restart backoff: nothing to wait on from here
    probe.close()
    assert actor_process(daemon, "auth").pid != auth.pid
    generating(hank, new_session(hank), "long", LONG)
    since = time.monotonic()
    remove(daemon, "hank")
    assert_cut(hank, since)
    hank.close()


def test_sighup_with_an_unchanged_file_cuts_nobody(daemon: Daemon, alice: RawClient) -> None:
    loads = daemon.log().count("clients loaded")
    os.kill(daemon.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while daemon.log().count("clients loaded") == loads:  # the auth actor read it again
        assert time.monotonic() < deadline, "SIGHUP not acted on"
        assert alice.request({"op": "ping"})["op"] == "pong"
    assert alice.request({"op": "list_sessions"})["op"] == "session_list"


def test_http_guesses_from_one_address_are_slowed_then_refused_with_retry_after(
    daemon: Daemon,
) -> None:
    """The HTTP actor names the peer's address to the auth actor: wrong Bearer keys from one
    address wait their turn, and those whose turn is too far away get 429 with Retry-After.
    (Last in this module: a right key from the address afterwards clears its backoff.)"""

    def guess(n: int) -> tuple[int, str | None]:
        request = urllib.request.Request(
            f"{daemon.http_url}/v1/models", headers={"Authorization": f"Bearer wrong-{n:040d}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return int(response.status), None
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.headers.get("Retry-After")

    with ThreadPoolExecutor(max_workers=200) as pool:
        answers = list(pool.map(guess, range(200)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {401, 429}, statuses
    refused = [retry for status, retry in answers if status == 429]
    assert refused, "no guess refused: the address was not used for the backoff"
    assert all(retry is not None and int(retry) >= 1 for retry in refused), refused
    assert "address=127.0.0.1" in daemon.log()
    deadline = time.monotonic() + 30
    while http_status(daemon, daemon.api_key) != 200:  # the right key, once its turn comes
        assert time.monotonic() < deadline
    print(f"200 wrong keys at once from one address: {len(refused)} refused with 429")

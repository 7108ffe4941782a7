"""Unit tests of the client core alone (no sockets): frames in, frames and filed replies out."""

from __future__ import annotations

from typing import Any

import pytest

from inferencecenter.clients.core import (
    LOST,
    MAX_SENDS,
    Body,
    ClientBase,
    ClientCore,
    ConnectionLost,
    GenerationBase,
    Link,
    SessionBase,
    TokenStream,
    check_auth,
    close_session_call,
    create_session_call,
    expect,
    list_sessions_call,
    reply_error,
)
from inferencecenter.clients.credentials import Credentials
from inferencecenter.protocol import wire
from inferencecenter.protocol.errors import AuthFailed, BadRequest, Busy, InternalError, NotFound

CREDS = Credentials("core-tests", "core-tests-key-123456")
ENDPOINT = "tcp://127.0.0.1:1"
SERVER = {"name": "unit", "version": "0", "protocol": 1, "models": ["m"]}


def sent(core: ClientCore) -> list[Body]:
    """The bodies the core asked to send since the last look (its outbox drained)."""
    bodies = [wire.parse_client_frames(frames, 1 << 20) for frames in core.outbox]
    core.outbox.clear()
    return bodies


class Daemonless:
    """A ClientCore with the daemon's side played by the test: what it sent, what it answers."""

    def __init__(self) -> None:
        self.auth_replies: list[Body] = []
        self.core = ClientCore(CREDS, ENDPOINT, self.auth_replies.append)

    def sent(self) -> list[Body]:
        return sent(self.core)

    def answer(self, *replies: Body, link: Link | None = None) -> set[int]:
        return self.core.take(link, [wire.client_frames(reply) for reply in replies])

    def replies(self, request_id: int) -> list[Body]:
        """Every reply filed for `request_id` so far."""
        filed = []
        while (reply := self.core.next_reply(request_id)) is not None:
            filed.append(reply)
        return filed

    def reconnect(self) -> int:
        """The connection drops and comes back; the id of the `auth` the core then sends."""
        self.answer(link=Link.DROPPED)
        assert not self.core.connected
        self.answer(link=Link.CONNECTED)
        [auth] = self.sent()
        assert auth["op"] == "auth" and auth["client_id"] == CREDS.client_id
        return int(auth["id"])

    def authenticate(self, auth_id: int) -> None:
        self.answer({"op": "auth_success", "id": auth_id, "client_id": "core-tests"})


def token(request_id: int, seq: int, content: str) -> Body:
    return {"op": "token", "id": request_id, "session_id": "s-1", "seq": seq, "content": content}


def end(request_id: int, finish_reason: str = "stop") -> Body:
    stats = {"tokens": 2, "tps": 10.0}
    return {"op": "end", "id": request_id, "finish_reason": finish_reason, "stats": stats}


# ---- ids and routing ----------------------------------------------------------------------


def test_requests_get_fresh_ids_and_replies_are_filed_under_them() -> None:
    daemon = Daemonless()
    ping = daemon.core.start({"op": "ping"})
    stats = daemon.core.start({"op": "stats"})
    assert [(body["op"], body["id"]) for body in daemon.sent()] == [
        ("ping", ping),
        ("stats", stats),
    ]
    assert ping != stats
    assert daemon.core.next_reply(ping) is None

    filed = daemon.answer({"op": "stats", "id": stats, "sessions": 0}, {"op": "pong", "id": ping})
    assert filed == {ping, stats}
    assert [reply["op"] for reply in daemon.replies(ping)] == ["pong"]
    assert daemon.replies(stats) == [{"op": "stats", "id": stats, "sessions": 0}]


def test_a_forgotten_request_drops_its_late_replies() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "ping"})
    daemon.core.forget(request_id)
    assert daemon.answer({"op": "pong", "id": request_id}) == set()
    with pytest.raises(RuntimeError, match="finished"):
        daemon.core.next_reply(request_id)


def test_replies_that_are_not_for_a_request_are_ignored() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "ping"})
    assert daemon.answer({"op": "pong", "id": 999}, {"op": "pong", "id": "1"}) == set()
    assert daemon.core.take(None, [[b"not msgpack"]]) == set()
    assert daemon.core.next_reply(request_id) is None


def test_an_error_without_id_goes_to_the_newest_unanswered_request() -> None:
    daemon = Daemonless()
    answered = daemon.core.start({"op": "ping"})
    older = daemon.core.start({"op": "stats"})
    newest = daemon.core.start({"op": "list_sessions"})
    daemon.answer({"op": "pong", "id": answered})
    daemon.answer({"op": "error", "code": "too_large", "message": "body is too large"})
    assert daemon.replies(older) == []
    [error] = daemon.replies(newest)
    assert error["code"] == "too_large"


def test_replies_filed_before_close_are_taken_then_close_is_an_error() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "ping"})
    daemon.answer({"op": "pong", "id": request_id})
    daemon.core.closed = True
    assert daemon.core.next_reply(request_id) == {"op": "pong", "id": request_id}
    with pytest.raises(RuntimeError, match="closed"):
        daemon.core.next_reply(request_id)


# ---- token streams ------------------------------------------------------------------------


def test_a_token_stream_gathers_pieces_until_its_end() -> None:
    stream = TokenStream()
    assert stream.feed(token(1, 0, "Hel")) == "Hel"
    assert stream.feed(token(1, 1, "lo")) == "lo"
    assert not stream.done and stream.stats is None and stream.finish_reason is None
    assert stream.feed(end(1, "length")) is None
    assert stream.done and stream.text == "Hello"
    assert stream.finish_reason == "length" and stream.stats == {"tokens": 2, "tps": 10.0}


def test_a_gap_in_the_token_seq_ends_the_stream_as_lost_replies() -> None:
    stream = TokenStream()
    stream.feed(token(1, 0, "a"))
    with pytest.raises(InternalError, match="seq 2 arrived where 1 was due"):
        stream.feed(token(1, 2, "c"))
    assert stream.done and stream.text == "a"


def test_an_error_reply_or_an_error_end_raises() -> None:
    busy = TokenStream()
    with pytest.raises(Busy, match="still generating"):
        busy.feed({"op": "error", "id": 1, "code": "busy", "message": "still generating"})
    assert busy.done

    failed = TokenStream()
    failed.feed(token(1, 0, "a"))
    with pytest.raises(InternalError, match="the model failed"):
        failed.feed({**end(1, "error"), "message": "the model failed"})
    assert failed.finish_reason == "error" and failed.message == "the model failed"

    with pytest.raises(NotFound):
        expect({"op": "error", "code": "not_found", "message": "no session"}, "aborted")
    with pytest.raises(InternalError, match="expected a 'pong' reply, got 'stats'"):
        expect({"op": "stats"}, "pong")
    with pytest.raises(AuthFailed, match="revoked"):
        check_auth({"op": "auth_failed", "reason": "revoked"})
    assert isinstance(reply_error({"op": "error", "code": "internal", LOST: True}), ConnectionLost)


def test_an_infer_stays_routed_until_its_end() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "infer", "session_id": "s-1", "prompt": "Hi"})
    daemon.answer(token(request_id, 0, "a"), token(request_id, 1, "b"))
    daemon.answer(end(request_id))
    daemon.answer(token(request_id, 2, "late"))  # after its end: for nobody
    stream = TokenStream()
    pieces = [stream.feed(reply) for reply in daemon.replies(request_id)]
    assert pieces == ["a", "b", None] and stream.done


# ---- a dropped connection and re-auth ----------------------------------------------------


def test_after_a_drop_auth_goes_first_then_every_unanswered_request_under_its_id() -> None:
    daemon = Daemonless()
    ping = daemon.core.start({"op": "ping"})
    daemon.sent()
    daemon.answer(link=Link.DROPPED)
    stats = daemon.core.start({"op": "stats"})
    assert daemon.sent() == []  # waits for the connection and the auth
    message = daemon.core.timeout_error(stats, 5, "the reply to stats")
    assert isinstance(message, TimeoutError) and "has not come back" in str(message)

    auth_id = daemon.reconnect()
    assert daemon.sent() == []  # not before auth succeeded
    message = daemon.core.timeout_error(stats, 5, "the reply to stats")
    assert "did not answer auth" in str(message)
    daemon.authenticate(auth_id)
    assert [(body["op"], body["id"]) for body in daemon.sent()] == [
        ("ping", ping),
        ("stats", stats),
    ]
    assert daemon.core.connected and daemon.core.tracker.reauthentications == 1
    assert [reply["client_id"] for reply in daemon.auth_replies] == ["core-tests"]

    daemon.answer({"op": "pong", "id": ping})
    assert [reply["op"] for reply in daemon.replies(ping)] == ["pong"]


def test_replies_read_with_the_drop_still_reach_their_requests() -> None:
    daemon = Daemonless()
    ping = daemon.core.start({"op": "ping"})
    daemon.sent()
    daemon.answer({"op": "pong", "id": ping}, link=Link.DROPPED)
    assert [reply["op"] for reply in daemon.replies(ping)] == ["pong"]
    daemon.authenticate(daemon.reconnect())
    assert daemon.sent() == []  # answered: nothing to resend


def test_a_stream_cut_by_a_drop_raises_connection_lost_and_is_aborted_once_back() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "infer", "session_id": "s-1", "prompt": "Hi"})
    daemon.sent()
    daemon.answer(token(request_id, 0, "half"))
    daemon.answer(link=Link.DROPPED)
    stream = TokenStream()
    first, cut = daemon.replies(request_id)
    assert stream.feed(first) == "half"
    with pytest.raises(ConnectionLost, match="dropped while this generation was streaming"):
        stream.feed(cut)
    assert stream.finish_reason == "error" and stream.text == "half"

    daemon.authenticate(daemon.reconnect())
    [abort] = daemon.sent()
    assert abort["op"] == "abort" and abort["session_id"] == "s-1"


def test_a_request_lost_with_the_connection_max_sends_times_raises_connection_lost() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "list_sessions"})
    assert len(daemon.sent()) == 1
    for _ in range(MAX_SENDS - 1):
        daemon.authenticate(daemon.reconnect())
        assert [body["id"] for body in daemon.sent()] == [request_id]
    daemon.answer(link=Link.DROPPED)
    [lost] = daemon.replies(request_id)
    with pytest.raises(ConnectionLost, match=f"dropped {MAX_SENDS} times"):
        expect(lost, "session_list")


def test_unauthenticated_means_authenticate_again_and_resend() -> None:
    daemon = Daemonless()
    call = create_session_call("m", None)
    request_id = daemon.core.start(call.body)
    daemon.sent()
    message = "not authenticated"
    daemon.answer({"op": "error", "id": request_id, "code": "unauthenticated", "message": message})
    assert daemon.replies(request_id) == []
    [auth] = daemon.sent()
    assert auth["op"] == "auth"
    daemon.authenticate(int(auth["id"]))
    [resent] = daemon.sent()
    assert resent == {"op": "create_session", "model": "m", "id": request_id}
    created = {"session_id": "s-7", "model": "m", "ctx_size": 512}
    daemon.answer({"op": "session_created", "id": request_id, **created})
    [reply] = daemon.replies(request_id)
    assert call.result(reply) == ("s-7", "m", 512)


def test_a_refused_reauth_fails_the_requests_waiting_for_it() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "stats"})
    daemon.sent()
    auth_id = daemon.reconnect()
    daemon.answer({"op": "auth_failed", "id": auth_id, "reason": "key revoked"})
    [failure] = daemon.replies(request_id)
    with pytest.raises(AuthFailed, match="key revoked"):
        expect(failure, "stats")
    assert daemon.core.tracker.reauthentications == 0


def test_a_resent_infer_answered_busy_waits_for_its_first_copy() -> None:
    daemon = Daemonless()
    request_id = daemon.core.start({"op": "infer", "session_id": "s-1", "prompt": "Hi"})
    daemon.sent()
    daemon.authenticate(daemon.reconnect())
    daemon.sent()
    busy = {"op": "error", "id": request_id, "code": "busy", "message": "still generating"}
    daemon.answer(busy)
    assert daemon.replies(request_id) == []  # the first copy's stream may still come
    message = daemon.core.timeout_error(request_id, 1.5, "the next token")
    assert isinstance(message, ConnectionLost) and "did not come back within 1.5s" in str(message)


def test_a_resent_close_answered_not_found_was_closed_by_its_first_copy() -> None:
    daemon = Daemonless()
    call = close_session_call("s-1")
    request_id = daemon.core.start(call.body)
    daemon.sent()
    daemon.authenticate(daemon.reconnect())
    daemon.sent()
    daemon.answer({"op": "error", "id": request_id, "code": "not_found", "message": "no session"})
    [reply] = daemon.replies(request_id)
    assert call.result(reply)["op"] == "session_closed"


# ---- requests, sessions and generations --------------------------------------------------


def test_requests_are_checked_before_anything_is_sent() -> None:
    session: FakeSession = FakeClient().session("s-1")
    with pytest.raises(BadRequest, match="temp"):
        session.infer("Hi", temp=-1)
    with pytest.raises(BadRequest):
        session.infer("Hi", no_such_param=1)
    assert session.client.sent() == []
    assert create_session_call(None, "Be brief.").body == {
        "op": "create_session",
        "system_prompt": "Be brief.",
    }
    listed = {"op": "session_list", "sessions": [{"session_id": "s-1"}, "junk"]}
    assert list_sessions_call().result(listed) == [{"session_id": "s-1"}]


class FakeClient(ClientBase):
    """A client without a socket (a fake, for the core's session and generation logic): what
    it would send stays in the core's outbox."""

    def __init__(self) -> None:
        super().__init__(ENDPOINT, CREDS.client_id, CREDS.api_key)

    def _start(self, body: Body) -> int:
        return self._core.start(body)

    def sent(self) -> list[Body]:
        return sent(self._core)

    def session(self, session_id: str) -> FakeSession:
        return FakeSession(self, session_id, None, None)


class FakeSession(SessionBase[FakeClient, "FakeGeneration"]):
    def _generation(self, body: Body) -> FakeGeneration:
        return FakeGeneration(self, body)


class FakeGeneration(GenerationBase[FakeSession]):
    def feed(self, reply: Body) -> str | None:
        return self._feed(reply)


def test_a_generation_shows_its_stream_and_lets_go_of_its_request_at_the_end() -> None:
    client = FakeClient()
    generation = client.session("s-1").infer(messages=[{"role": "user", "content": "Hi"}], seed=3)
    [body] = client.sent()
    assert body == {
        "op": "infer",
        "session_id": "s-1",
        "messages": [{"role": "user", "content": "Hi"}],
        "params": {"seed": 3},
        "id": generation.request_id,
    }
    assert generation.feed(token(generation.request_id, 0, "Hey")) == "Hey"
    assert generation.text == "Hey" and not generation.done
    assert generation.feed(end(generation.request_id)) is None
    assert generation.done and generation.finish_reason == "stop"
    assert generation.stats == {"tokens": 2, "tps": 10.0}
    with pytest.raises(RuntimeError, match="finished"):
        client._core.next_reply(generation.request_id)


def test_an_abandoned_generation_is_forgotten() -> None:
    client = FakeClient()
    generation = client.session("s-1").infer("Hi")
    request_id = generation.request_id
    del generation
    assert client._core.take(None, [wire.client_frames(token(request_id, 0, "a"))]) == set()


@pytest.mark.parametrize(
    ("error", "connected", "answers"),
    [
        (None, True, True),
        (ValueError("the caller's own"), True, True),
        (TimeoutError("no reply"), True, False),
        (ConnectionLost("dropped"), False, False),
        (ConnectionLost("dropped"), True, True),
    ],
)
def test_a_block_left_with_an_error_closes_only_when_someone_answers(
    error: BaseException | None, connected: bool, answers: bool
) -> None:
    client = FakeClient()
    if not connected:
        client._core.take(Link.DROPPED, [])
    assert client._answers_after(error) is answers
    client._core.closed = True
    assert client._answers_after(None) is False


def test_the_client_reads_what_auth_says_of_the_server() -> None:
    client = FakeClient()
    success: dict[str, Any] = {"client_id": "core-tests", "max_sessions": 4, "priority": "high"}
    client._apply_auth({"op": "auth_success", **success, "server": SERVER})
    assert (client.max_sessions, client.priority, client.server) == (4, "high", SERVER)
    assert repr(client) == f"FakeClient(endpoint={ENDPOINT!r}, client_id='core-tests')"

"""Sessions outnumbering the slots: eviction to host memory and restore."""

from __future__ import annotations

from pathlib import Path

from inferencecenter.daemon.testing import (
    RawClient,
    new_session,
    reference_reply,
    run_infer,
    start_daemon,
    stop_daemon,
)


def test_evicted_session_continues_its_conversation(tmp_path: Path) -> None:
    """With 4 slots, a fifth session takes the slot of the least recently used one; coming back,
    the evicted session's context is restored and greedy output matches a session never evicted.
    A daemon of its own: KV placement left by earlier tests would change the arithmetic."""
    daemon = start_daemon(tmp_path)
    authed = RawClient(daemon.endpoint)
    authed.auth(daemon.client_id, daemon.api_key)
    try:
        check_eviction(authed)
    finally:
        authed.close()
        assert stop_daemon(daemon.process) == 0


def check_eviction(authed: RawClient) -> None:
    params = {"temp": 0, "max_tokens": 16, "ignore_eos": True}
    target = new_session(authed)
    run_infer(authed, target, prompt="Alice has a red bicycle.", params=params)
    others = [new_session(authed) for _ in range(4)]
    for session_id in others:
        run_infer(authed, session_id, prompt="Unrelated text about the weather.", params=params)
    resumed, end = run_infer(authed, target, prompt=" Her bicycle is", params=params)
    assert end["stats"]["cached_tokens"] > 16
    for session_id in others:
        authed.request({"op": "close_session", "session_id": session_id})
    prompts = ["Alice has a red bicycle.", " Her bicycle is"]
    assert resumed == reference_reply(authed, prompts, params)
    authed.request({"op": "close_session", "session_id": target})

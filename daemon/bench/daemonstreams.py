"""The daemon under measurement: daemon.testing's launcher and raw client, as many timed streams."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from ...protocol import clientsfile
from ..testing import RawClient, actor_process, start_daemon, stop_daemon
from .measurement import PROMPTS, TEMP, Measurement, StreamTiming

BENCH_CLIENT = "bench"
START_DEADLINE_S = 300.0
SILENCE_DEADLINE_MS = 120_000


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, unless it is an error: the bench never expects one."""
    if reply["op"] == "error":
        raise RuntimeError(f"daemon error: {reply}")
    return reply


class DaemonStream:
    """One session on a raw client; records when each token message of its infer arrives. It
    reads without blocking (`receive`), so that many streams are pumped together."""

    def __init__(self, client: RawClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.timing = StreamTiming()
        self.token_times: list[float] = []
        self.stats: dict[str, Any] = {}
        self.ended = False

    @classmethod
    def open(cls, client: RawClient, **fields: Any) -> DaemonStream:
        """A new session (`fields`: create_session's, e.g. system_prompt) on `client`."""
        created = checked(client.request({"op": "create_session", **fields}))
        return cls(client, str(created["session_id"]))

    def infer(self, prompt: str, seed: int, max_tokens: int) -> None:
        """Raw text, sampled like every system of the bench, exactly `max_tokens` long."""
        params = {"temp": TEMP, "seed": seed, "max_tokens": max_tokens, "ignore_eos": True}
        self.send_infer({"prompt": prompt}, params)

    def send_infer(self, text: dict[str, Any], params: dict[str, Any]) -> None:
        """An infer with `text` (`prompt` or `messages`) and `params`; timing starts now."""
        self.timing = StreamTiming()
        self.token_times = []
        self.ended = False
        self.timing.sent = time.perf_counter()
        body = {"op": "infer", "id": "infer", "session_id": self.session_id, **text}
        self.client.send({**body, "params": params})

    def receive(self) -> None:
        """Take every message waiting for this client."""
        for reply in self.client.waiting():
            now = time.perf_counter()
            if reply["op"] == "token":
                self.token_times.append(now)
                if self.timing.first is None:
                    self.timing.first = now
            elif reply["op"] == "end":
                self.timing.last = now
                self.timing.tokens = int(reply["stats"].get("tokens", 0))
                self.stats = reply["stats"]
                self.ended = True
            checked(reply)

    def close(self) -> None:
        """Close the session and the client's connection."""
        checked(self.client.request({"op": "close_session", "session_id": self.session_id}))
        self.client.close()


class DaemonUnderTest:
    """A real `inferencecenter serve` on free ports (daemon.testing's start_daemon), with a
    client allowed 256 sessions, warmed up (`extra`: more `serve` flags; `http`: with its HTTP
    actor)."""

    def __init__(
        self,
        model: str,
        parallel: int,
        threads: int,
        ctx: int,
        extra: Sequence[str] = (),
        *,
        http: bool = False,
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ic-bench-"))
        flags = ["--model", model, "--parallel", str(parallel), "--threads", str(threads)]
        flags += ["--ctx-size", str(ctx), *extra]
        self.daemon = start_daemon(self.tmp, *flags, deadline_s=START_DEADLINE_S, http=http)
        try:
            entry = clientsfile.add_client(self.daemon.clients_path, BENCH_CLIENT, max_sessions=256)
            self.key = entry.api_key
            self._warm_up()
        except BaseException:
            self.stop()
            raise

    def _warm_up(self) -> None:
        """One short generation, so no measurement pays for first-use costs (llama-server warms
        up on its own at start)."""
        (stream,) = self.open_sessions(1)
        stream.infer(PROMPTS[0], seed=0, max_tokens=8)
        until_ended(stream)
        stream.close()

    def client(self) -> RawClient:
        """A new connection, authenticated as the bench's client."""
        client = RawClient(self.daemon.endpoint)
        auth = {"op": "auth", "client_id": BENCH_CLIENT, "api_key": self.key}
        checked(client.request(auth))
        return client

    def open_sessions(self, n: int, **fields: Any) -> list[DaemonStream]:
        """n sessions, each on a connection of its own."""
        return [DaemonStream.open(self.client(), **fields) for _ in range(n)]

    def engine_rss(self) -> int:
        """The engine process's resident memory."""
        return int(actor_process(self.daemon, "engine").memory_info().rss)

    def stop(self) -> None:
        stop_daemon(self.daemon.process, timeout=30)


def pump(
    streams: Sequence[DaemonStream],
    until: Callable[[], bool],
    on_end: Callable[[DaemonStream], None] | None = None,
) -> None:
    """Receive on every stream until `until()` holds; `on_end(stream)` right after a stream's
    infer ends (it may send the stream's next one)."""
    poller = zmq.Poller()
    by_socket = {s.client.sock: s for s in streams}
    for sock in by_socket:
        poller.register(sock, zmq.POLLIN)
    while not until():
        ready = poller.poll(SILENCE_DEADLINE_MS)
        if not ready:
            raise RuntimeError(f"the daemon sent nothing for {SILENCE_DEADLINE_MS // 1000} s")
        for sock, _ in ready:
            stream = by_socket[sock]
            was_running = not stream.ended
            stream.receive()
            if on_end is not None and was_running and stream.ended:
                on_end(stream)


def until_ended(stream: DaemonStream) -> None:
    pump([stream], lambda: stream.ended)


def run_daemon(daemon: DaemonUnderTest, n: int, tokens: int) -> Measurement:
    """N sessions at once, one infer each of `tokens` tokens."""
    streams = daemon.open_sessions(n)
    try:
        for i, stream in enumerate(streams):
            stream.infer(PROMPTS[i % len(PROMPTS)], seed=i, max_tokens=tokens)
        pump(streams, lambda: all(s.ended for s in streams))
        return Measurement.from_timings([s.timing for s in streams], tokens)
    finally:
        for stream in streams:
            stream.close()

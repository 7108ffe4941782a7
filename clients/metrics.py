"""Subscribe to the daemon's metrics stream: (topic, body) pairs from its PUB socket."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import zmq

from inferencecenter.protocol import curve, wire
from inferencecenter.protocol.errors import ProtocolError

from .client import connect

DEFAULT_METRICS_ENDPOINT = "tcp://127.0.0.1:5556"
# The daemon publishes once a second; several missed beats mean it is not there.
DEFAULT_TIMEOUT = 10.0
# Metrics age fast: keep few, so a reader that stalls sees fresh ones, not a backlog.
RECEIVE_HWM = 100


class MetricsSubscriber(Iterator[tuple[str, dict[str, Any]]]):
    """Iterate over (topic, body) as the daemon publishes them.

    Topics are ZeroMQ prefixes: `metrics` is the once-a-second snapshot, `event.` would take
    every event topic. Each `next()` waits at most `timeout` seconds (None: forever) and then
    raises TimeoutError. Messages that are not two frames with a msgpack map are skipped.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_METRICS_ENDPOINT,
        topics: Iterable[str] = ("metrics",),
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        curve_serverkey: str | bytes | None = None,
        curve_keypair: tuple[str | bytes, str | bytes] | None = None,
    ) -> None:
        """Under --curve, give the daemon's public key; the keypair is a fresh one unless given
        (a daemon run with --metrics-clients-only needs an entry's `curve_public_key`)."""
        self.endpoint = endpoint
        self.topics = tuple(topics)
        self.timeout = timeout
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        keys = curve.client_curve(curve_serverkey, curve_keypair)
        if keys is not None:
            keys.apply(self._sock)
        for topic in self.topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        connect(self._sock, endpoint)

    def __repr__(self) -> str:
        return f"MetricsSubscriber(endpoint={self.endpoint!r}, topics={self.topics!r})"

    def __iter__(self) -> MetricsSubscriber:
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        return self.receive()

    def receive(self) -> tuple[str, dict[str, Any]]:
        """The next message, waiting at most `self.timeout` seconds (None: forever)."""
        wait = self.timeout
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            if deadline is None:
                ready = self._sock.poll(None)
            else:
                remaining = deadline - time.monotonic()
                ready = remaining > 0 and self._sock.poll(max(1, int(remaining * 1000)))
            if not ready:
                raise TimeoutError(
                    f"no metrics from {self.endpoint} within {wait:g}s: is the daemon running?"
                )
            frames = self._sock.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                topic = frames[0].decode("utf-8")
                body = wire.unpack(frames[1])
            except (UnicodeDecodeError, ProtocolError):
                continue
            return topic, body

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> MetricsSubscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

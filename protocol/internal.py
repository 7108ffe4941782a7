"""Messages between the daemon's own processes: endpoints, ops per actor, the codec.

Internal messages are one msgpack map per frame with `op` and `ref` (the caller's correlation
number); replies carry the same `ref`. They travel over ipc:// sockets in a private runtime
directory (mode 0700) and are never reachable from the frontend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

Body = dict[str, Any]

# Actor names; each runs as its own process `inferencecenter-<name>`.
GATEWAY = "gateway"
AUTH = "auth"
SESSIONS = "sessions"
ENGINE = "engine"
MONITOR = "monitor"
HTTP = "http"  # the HTTP frontend (OpenAI API, WebSocket); not started with --http-port 0
# Start order: the gateway last. The HTTP actor starts with the first ones, so that /health can
# answer "loading" while the model loads; the supervisor tells it when all are ready.
ACTORS = (AUTH, SESSIONS, MONITOR, ENGINE, HTTP, GATEWAY)
SUPERVISOR = "supervisor"

# Internal reply ops.
REPLY = "reply"
ERROR = "error"
TOKEN = "token"
END = "end"
# The engine's tokens of one step for one front actor, as rows [ref, seq, content]: the front
# actor hands each to its stream as a TOKEN (one message a step instead of one a token).
TOKENS = "tokens"

# Ops each actor serves (its handler table must match this list).
AUTH_OPS = ("authenticate", "authenticate_key")
SESSIONS_OPS = ("create", "check", "remove", "list", "append", "snapshot")
ENGINE_OPS = ("open", "close", "infer", "abort", "info", "stats")
# Pushed to the supervisor: {"op": "ready", "actor": name} or {"op": "fatal", "actor", "message"}.
SUPERVISOR_OPS = ("ready", "fatal", "alive")
# Pushed to the monitor: the engine's figures once a second ("inference"), session events and
# an overloaded queue ("event"), one record per finished infer ("request"); auth failures.
# Asked of it by the HTTP actor: the last metrics ("snapshot"), the Prometheus text.
MONITOR_OPS = ("inference", "event", "request", "auth_failed", "snapshot", "prometheus")
# Pushed to the HTTP actor by the supervisor: {"op": "daemon_state", "ready": bool}, whether
# every actor is ready (GET /health).
HTTP_OPS = ("daemon_state",)


def endpoint(runtime_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(runtime_dir) / name}.sock"


def pack(body: Body) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def unpack(data: bytes) -> Body:
    body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(body, dict):
        raise ValueError("internal message is not a map")
    return body

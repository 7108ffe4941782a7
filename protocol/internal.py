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
# The supervisor's model registry: the one owner of every model's state, asked over this socket.
MODELS = "models"

# Internal reply ops.
REPLY = "reply"
ERROR = "error"
TOKEN = "token"
END = "end"
# The engine's tokens of one step for one front actor, as rows [ref, seq, content]: the front
# actor hands each to its stream as a TOKEN (one message a step instead of one a token).
TOKENS = "tokens"

# Ops each actor serves (its handler table must match this list).
# `watch_clients` (asked by the gateway and the HTTP actor) answers now and after every change of
# the clients file with {"op": "clients", "clients": {client_id: fingerprint}} (see
# actors/revocation.py); `reload` (pushed by the supervisor on SIGHUP) reads the file again.
AUTH_OPS = ("authenticate", "authenticate_key", "watch_clients", "reload")
SESSIONS_OPS = ("create", "check", "remove", "list", "append", "snapshot", "counts")
# `reload`: take the sessions' histories again (a hot swap's new engine, once the old one is gone).
ENGINE_OPS = ("open", "close", "infer", "abort", "info", "stats", "reload")
# Pushed to the supervisor: {"op": "ready", "actor": name} or {"op": "fatal", "actor", "message"}.
SUPERVISOR_OPS = ("ready", "fatal", "alive")
# Asked of the model registry by the gateway, the HTTP and the sessions actors. `watch_models`
# answers now and again at every change ({"op": "models", ...}); `ensure_loaded` answers once the
# model serves (loading it on demand).
MODELS_OPS = ("list_models", "load_model", "unload_model", "ensure_loaded", "watch_models")
# Pushed to the monitor: the engine's figures once a second ("inference"), session events and
# an overloaded queue ("event"), one record per finished infer ("request"); auth failures.
# Asked of it by the HTTP actor: the last metrics ("snapshot"), the Prometheus text.
# The supervisor pushes the models' states and memory ("models") and their events (`event`).
MONITOR_OPS = (
    "inference",
    "event",
    "request",
    "auth_failed",
    "snapshot",
    "prometheus",
    "models",
)
# Pushed to the HTTP actor by the supervisor: {"op": "daemon_state", "ready": bool}, whether
# every actor is ready (GET /health).
HTTP_OPS = ("daemon_state",)


def endpoint(runtime_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(runtime_dir) / name}.sock"


def engine_id(load: int) -> str:
    """The name of one load's engine (its socket, its reports): short, whatever the model's
    name (an ipc path is limited to about 100 bytes), and new for each load, so that a hot swap's
    two engines of one model never share a socket. A restart after a crash keeps it."""
    return f"{ENGINE}.{load}"


def engine_process_name(model: str) -> str:
    """What `ps` shows for a model's engine."""
    return f"inferencecenter-{ENGINE}-{model}"


def pack(body: Body) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def unpack(data: bytes) -> Body:
    body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(body, dict):
        raise ValueError("internal message is not a map")
    return body

"""`GET /ws`: the original InferenceCenter's WebSocket protocol, one JSON object per text frame.

A connection authenticates with `auth` (client_id and api_key) and then creates sessions,
infers (tokens, then an `end` with stats), aborts, and subscribes to the metrics, once a second.
Requests are handled in order, except that generations stream on while others are served. A bad
frame gets an `error` with a protocol code; the connection goes on. When it closes, its running
generations are aborted; its sessions stay, as on ZeroMQ.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import trio
from starlette.websockets import WebSocket, WebSocketDisconnect

from ...protocol.errors import (
    BadRequest,
    Busy,
    Forbidden,
    InternalError,
    NotFound,
    ProtocolError,
    TooLarge,
    Unauthenticated,
)
from ...protocol.messages import MAX_NAME_BYTES, parse_params
from ..config import Config
from ..logs import EventLog
from ..revocation import REVOKED_MESSAGE, Table
from .link import Client, DaemonLink, End, InferStream
from .routes import DaemonState

log = EventLog("http")

Body = dict[str, Any]
METRICS_POLL_S = 0.25  # the monitor publishes once a second
GPU_FIELDS = (
    "temp",
    "vram_total_mb",
    "vram_used_mb",
    "vram_free_mb",
    "power_watts",
    "fan_percent",
    "throttling",
)
INFERENCE_FIELDS = (
    "active_generations",
    "total_sessions",
    "last_tps",
    "last_ttft_ms",
    "total_tokens_generated",
)


def metrics_message(snapshot: Body) -> Body:
    """The monitor's metrics in the original protocol's shape."""
    gpu = snapshot.get("gpu")
    inference = snapshot.get("inference") or {}
    return {
        "op": "metrics",
        "timestamp": snapshot.get("timestamp"),
        "gpu": None if gpu is None else {key: gpu.get(key) for key in GPU_FIELDS},
        "inference": {key: inference.get(key, 0) for key in INFERENCE_FIELDS},
    }


def _text(body: Body, name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"field {name!r} must be a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES and name != "prompt":
        raise BadRequest(f"field {name!r} is too long")
    return value


class WebSocketHandler:
    """The ASGI endpoint: one Connection per WebSocket."""

    def __init__(
        self, config: Config, link: DaemonLink, state: DaemonState, models: list[str]
    ) -> None:
        self.config = config
        self.link = link
        self.state = state
        self.models = models
        self.connections: set[Connection] = set()
        link.revokers.append(self.revoke)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        connection = Connection(self, websocket)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    def revoke(self, table: Table) -> Counter[str]:
        """Connections of a client removed or re-keyed lose their auth (their generations are
        aborted by the link); how many per client_id."""
        cut: Counter[str] = Counter()
        for connection in self.connections:
            client = connection.client
            if client is not None and table.get(client.client_id) != client.fingerprint:
                connection.client = None
                connection.revoked = True
                connection.owned.clear()
                cut[client.client_id] += 1
        return cut


class Connection:
    def __init__(self, handler: WebSocketHandler, websocket: WebSocket) -> None:
        self.handler = handler
        self.link = handler.link
        self.websocket = websocket
        self.client: Client | None = None
        self.revoked = False  # its client was revoked since its auth
        self.owned: set[str] = set()  # sessions this connection's client owns (never changes)
        self.streams: dict[str, InferStream] = {}  # running generations by session
        self.metrics: trio.CancelScope | None = None
        self.send_lock = trio.Lock()
        self.nursery: trio.Nursery | None = None
        self.ops = {
            "ping": self.ping,
            "auth": self.auth,
            "create_session": self.create_session,
            "close_session": self.close_session,
            "infer": self.infer,
            "abort": self.abort,
            "subscribe_metrics": self.subscribe_metrics,
            "unsubscribe_metrics": self.unsubscribe_metrics,
        }

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                await self.serve()
            finally:
                for session_id in list(self.streams):
                    self.link.abort(session_id)  # the client is gone: its generations end
                nursery.cancel_scope.cancel()

    async def serve(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            try:
                if text is None:
                    raise BadRequest("frames must be text frames holding one JSON object")
                body = self.parse(text)
                op = body.get("op")
                handler = self.ops.get(op) if isinstance(op, str) else None
                if handler is None:
                    raise BadRequest(f"unknown op {str(op)[:64]!r}")
                if self.client is None and op != "auth":  # nothing else before it
                    if self.revoked:
                        raise Unauthenticated(REVOKED_MESSAGE)
                    raise Unauthenticated(f"{op} needs a successful auth first")
                await handler(body)
            except ProtocolError as exc:
                await self.send(exc.to_body())  # with retry_after_s when rate_limited
            except WebSocketDisconnect:
                return
            except Exception:
                log.exception("websocket request failed")
                error = InternalError("the request failed")
                await self.send(error.to_body())

    def parse(self, text: str) -> Body:
        limit = self.handler.config.max_message_bytes
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            raise TooLarge(f"frame over the limit of {limit} bytes")
        try:
            body = json.loads(text)
        except ValueError:
            raise BadRequest("the frame is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the frame must be a JSON object")
        return body

    async def send(self, body: Body) -> None:
        async with self.send_lock:
            try:
                await self.websocket.send_text(json.dumps(body))
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # it is closing; the receive loop notices

    def authenticated(self) -> Client:
        if self.client is None:
            raise Unauthenticated("this connection is not authenticated")
        return self.client

    async def owned_session(self, body: Body) -> str:
        session_id = _text(body, "session_id")
        assert session_id is not None
        if session_id not in self.owned:
            await self.link.check_owner(self.authenticated(), session_id)
            self.owned.add(session_id)
        return session_id

    # ---- ops ----------------------------------------------------------------------------

    async def ping(self, body: Body) -> None:
        await self.send({"op": "pong", "time": time.time()})

    async def auth(self, body: Body) -> None:
        client_id, api_key = _text(body, "client_id"), _text(body, "api_key")
        assert client_id is not None and api_key is not None
        self.handler.state.check()
        address = self.websocket.client.host if self.websocket.client else ""
        client = await self.link.authenticate(client_id, api_key, address)
        if client is None:
            self.client = None
            self.owned.clear()
            await self.send({"op": "auth_failed", "reason": "unknown client_id or wrong api_key"})
            return
        if self.client is None or self.client.client_id != client.client_id:
            self.owned.clear()
        self.client = client
        self.revoked = False
        await self.send(
            {
                "op": "auth_success",
                "client_id": client.client_id,
                "max_sessions": client.max_sessions,
            }
        )

    async def create_session(self, body: Body) -> None:
        client = self.authenticated()
        models = self.handler.models
        model = _text(body, "model", required=False) or models[0]
        if model not in models:
            raise NotFound(f"no model {model[:80]!r}; this daemon serves {', '.join(models)}")
        system_prompt = body.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise BadRequest("field 'system_prompt' must be a string")
        session_id, ctx_size = await self.link.create_session(client, model, system_prompt)
        self.owned.add(session_id)
        await self.send(
            {
                "op": "session_created",
                "session_id": session_id,
                "model": model,
                "ctx_size": ctx_size,
            }
        )

    async def close_session(self, body: Body) -> None:
        session_id = await self.owned_session(body)
        await self.link.close_session(session_id)
        self.owned.discard(session_id)
        await self.send({"op": "session_closed", "session_id": session_id})

    async def infer(self, body: Body) -> None:
        client = self.authenticated()
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("field 'prompt' must be a string")
        params = parse_params(body.get("params")).to_wire()
        session_id = await self.owned_session(body)
        if session_id in self.streams:
            raise Busy("this session is still generating; abort it or wait for its end")
        stream = self.link.infer(client, session_id, params, prompt=prompt)
        self.streams[session_id] = stream
        assert self.nursery is not None
        self.nursery.start_soon(self.forward, stream)

    async def forward(self, stream: InferStream) -> None:
        """A generation's tokens and end to the client."""
        session_id = stream.session_id
        try:
            while True:
                try:
                    event = await stream.next()
                except ProtocolError as exc:
                    if isinstance(exc, (NotFound, Forbidden)):
                        self.owned.discard(session_id)
                    await self.send({**exc.to_body(), "session_id": session_id})
                    return
                if isinstance(event, End):
                    end: Body = {
                        "op": "end",
                        "session_id": session_id,
                        "finish_reason": event.finish_reason,
                        "stats": event.stats,
                    }
                    if event.message:
                        end["message"] = event.message
                    await self.send(end)
                    return
                await self.send({"op": "token", "session_id": session_id, "content": event.content})
        finally:
            if self.streams.get(session_id) is stream:
                del self.streams[session_id]

    async def abort(self, body: Body) -> None:
        session_id = await self.owned_session(body)
        await self.link.abort_now(session_id)

    async def subscribe_metrics(self, body: Body) -> None:
        if self.metrics is None:
            assert self.nursery is not None
            self.metrics = trio.CancelScope()
            self.nursery.start_soon(self.push_metrics, self.metrics)
        await self.send({"op": "metrics_subscribed", "message": "metrics once a second"})

    async def unsubscribe_metrics(self, body: Body) -> None:
        if self.metrics is not None:
            self.metrics.cancel()
            self.metrics = None
        await self.send({"op": "metrics_unsubscribed", "message": "no more metrics"})

    async def push_metrics(self, scope: trio.CancelScope) -> None:
        """Each metrics the monitor publishes (once a second), looked for four times as often."""
        last = None
        with scope:
            while True:
                await trio.sleep(METRICS_POLL_S)
                try:
                    reply = await self.link.monitor_request("snapshot")
                except ProtocolError as exc:
                    log.warning("metrics unavailable", reason=exc.message)
                    continue
                snapshot = reply.get("metrics")
                if snapshot is None or snapshot.get("timestamp") == last:
                    continue
                last = snapshot.get("timestamp")
                await self.send(metrics_message(snapshot))

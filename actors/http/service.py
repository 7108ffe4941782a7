"""The HTTP actor's process: hypercorn's trio worker serving the routes on --bind:--http-port,
its links into the daemon, and the internal socket where the supervisor says when all is ready."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as ServerConfig
from hypercorn.trio import serve

from ...protocol import internal, wire
from ..actor import ActorServer, Body, Caller, report_to_supervisor
from ..config import Config
from ..logs import EventLog
from .link import DaemonLink
from .routes import DaemonState, Routes
from .websocket import WebSocketHandler

log = EventLog("http")

GRACEFUL_S = 2.0  # on stop, requests in flight get this long to finish


def server_config(config: Config) -> ServerConfig:
    server = ServerConfig()
    host = "0.0.0.0" if config.bind in ("*", "") else config.bind
    server.bind = [f"[{host}]:{config.http_port}" if ":" in host else f"{host}:{config.http_port}"]
    server.accesslog = None
    server.errorlog = logging.getLogger("http")
    server.graceful_timeout = GRACEFUL_S
    if config.tls_cert:
        server.certfile, server.keyfile = config.tls_cert, config.tls_key  # HTTPS, WSS
    # Beyond this a frame closes the connection; up to it, a frame over --max-message-bytes
    # gets a `too_large` error and the connection goes on (as on ZeroMQ).
    server.websocket_max_message_size = wire.hard_cap(config.max_message_bytes)
    return server


async def main(config: Config, stop: trio.Event) -> None:
    state = DaemonState()

    def daemon_state(body: Body, caller: Caller) -> None:
        state.ready = bool(body.get("ready"))
        log.info("daemon state", ready=state.ready)

    handlers = {"daemon_state": daemon_state}
    assert set(handlers) == set(internal.HTTP_OPS)
    server = ActorServer(internal.HTTP, config, handlers)
    link = DaemonLink(config)
    routes = Routes(config, link, state)
    app = routes.app(WebSocketHandler(config, link, state, routes.models))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        nursery.start_soon(link.run)
        async with trio.open_nursery() as front:
            binds = await front.start(serve_http, app, server_config(config), stop)
            report_to_supervisor(config, {"op": "ready", "actor": internal.HTTP})
            log.info("serving", endpoint=" ".join(binds))
        # `stop` was set and the server has let its connections finish (GRACEFUL_S at most).
        nursery.cancel_scope.cancel()


async def serve_http(
    app: object,
    server: ServerConfig,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, server, shutdown_trigger=stop.wait, task_status=task_status)  # type: ignore[arg-type]

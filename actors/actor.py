"""What every actor shares: its ROUTER with an op table, links to other actors, its process life."""

from __future__ import annotations

import ctypes
import inspect
import itertools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from ..protocol import internal
from ..protocol.errors import InternalError, ProtocolError, error_from_body
from ..protocol.zmqtrio import TrioSocket
from .config import Config
from .logs import EventLog, setup_logging

Body = dict[str, Any]

log = EventLog("actor")


@dataclass
class Caller:
    """Who sent a request to this actor, so a handler can reply now or stream later."""

    server: ActorServer
    peer: bytes
    ref: int

    def send(self, op: str, **fields: Any) -> None:
        self.server.send(self.peer, {"op": op, "ref": self.ref, **fields})

    def reply(self, **fields: Any) -> None:
        self.send(internal.REPLY, **fields)

    def error(self, exc: ProtocolError) -> None:
        self.send(internal.ERROR, code=exc.code, message=exc.message, **exc.extra())


Handler = Callable[[Body, Caller], Awaitable[None] | None]


class ActorServer:
    """The actor's ROUTER at its ipc endpoint; each op goes through the handler table, and an op
    that is not in the table is refused (nothing internal is reachable by accident)."""

    def __init__(self, name: str, config: Config, handlers: Mapping[str, Handler]) -> None:
        self.name = name
        self.handlers = dict(handlers)
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(internal.endpoint(config.runtime_dir, name))
        self.socket = TrioSocket(sock, on_receive=self.on_receive)
        self.nursery: trio.Nursery | None = None

    def send(self, peer: bytes, body: Body) -> None:
        self.socket.send([peer, internal.pack(body)])

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.socket.run)

    def on_receive(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        peer, data = frames
        try:
            body = internal.unpack(data)
        except Exception:
            log.error("undecodable internal message", actor=self.name)
            return
        caller = Caller(self, peer, int(body.get("ref", 0)))
        handler = self.handlers.get(str(body.get("op")))
        if handler is None:
            caller.error(InternalError(f"{self.name} has no op {body.get('op')!r}"))
            return
        self._dispatch(handler, body, caller)

    def _dispatch(self, handler: Handler, body: Body, caller: Caller) -> None:
        try:
            result = handler(body, caller)
        except ProtocolError as exc:
            caller.error(exc)
            return
        except Exception:
            log.exception("handler failed", actor=self.name, op=body.get("op"))
            caller.error(InternalError(f"{self.name} failed on {body.get('op')}"))
            return
        if inspect.isawaitable(result):
            assert self.nursery is not None
            self.nursery.start_soon(self._finish, result, body, caller)

    async def _finish(self, awaitable: Awaitable[None], body: Body, caller: Caller) -> None:
        try:
            await awaitable
        except ProtocolError as exc:
            caller.error(exc)
        except Exception:
            log.exception("handler failed", actor=self.name, op=body.get("op"))
            caller.error(InternalError(f"{self.name} failed on {body.get('op')}"))


@dataclass
class _Pending:
    on_message: Callable[[Body], None] | None = None
    reply: trio.MemorySendChannel[Body] | None = None


class ActorLink:
    """A DEALER to another actor: request/reply by `ref`, or a stream of messages to a callback.
    With `watch=True`, losing the connection (the actor died) fails everything pending at once,
    instead of leaving callers to time out."""

    def __init__(self, name: str, config: Config, watch: bool = False) -> None:
        self.name = name
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(internal.endpoint(config.runtime_dir, name))
        self.socket = TrioSocket(sock, on_receive=self.on_receive)
        self._refs = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self.monitor: TrioSocket | None = None
        if watch:
            events = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.monitor = TrioSocket(events, on_receive=self.on_monitor_event)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.socket.run)
            if self.monitor is not None:
                nursery.start_soon(self.monitor.run)

    def on_monitor_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            log.warning("actor connection lost", actor=self.name, pending=len(self._pending))
            self.fail_all(f"the {self.name} stopped; it is restarting")

    def fail_all(self, message: str, **marks: Any) -> None:
        """Answer everything in flight with an `error` marked `lost` (and `marks`)."""
        for ref, pending in list(self._pending.items()):
            body: Body = {"op": internal.ERROR, "ref": ref, "code": "internal"}
            body.update(message=message, lost=True, **marks)
            if pending.on_message is not None:
                self._pending.pop(ref, None)
                pending.on_message(body)
            elif pending.reply is not None:
                try:
                    pending.reply.send_nowait(body)
                except trio.WouldBlock:
                    pass

    def on_receive(self, frames: list[bytes]) -> None:
        try:
            body = internal.unpack(frames[-1])
        except Exception:
            return
        if body.get("op") == internal.TOKENS:
            self.fan_out(body)
            return
        pending = self._pending.get(int(body.get("ref", 0)))
        if pending is None:
            return
        if pending.on_message is not None:
            pending.on_message(body)
        elif pending.reply is not None:
            pending.reply.send_nowait(body)

    def fan_out(self, body: Body) -> None:
        """A step's tokens, each to its stream as a TOKEN message (with the row's
        log-probabilities, its fourth element, when the infer asked for them)."""
        for row in body.get("rows", ()):
            ref = row[0]
            pending = self._pending.get(ref)
            if pending is not None and pending.on_message is not None:
                message = {"op": internal.TOKEN, "ref": ref, "seq": row[1], "content": row[2]}
                if len(row) > 3:
                    message["logprobs"] = row[3]
                pending.on_message(message)

    def push(self, op: str, **fields: Any) -> None:
        """Fire and forget (no reply expected)."""
        self.socket.send([internal.pack({"op": op, "ref": 0, **fields})])

    async def request(self, op: str, timeout: float = 30.0, **fields: Any) -> Body:
        """Send one request and wait for its reply; an `error` reply raises its exception."""
        ref = next(self._refs)
        send, receive = trio.open_memory_channel[Body](1)
        self._pending[ref] = _Pending(reply=send)
        try:
            self.socket.send([internal.pack({"op": op, "ref": ref, **fields})])
            with trio.move_on_after(timeout):
                body = await receive.receive()
                if body.get("op") == internal.ERROR:
                    raise error_from_body(body)
                return body
            raise InternalError(f"the {self.name} actor did not answer {op} in time")
        finally:
            del self._pending[ref]

    def stream(self, op: str, on_message: Callable[[Body], None], **fields: Any) -> int:
        """Send a request whose replies (any number) go to `on_message` until `forget(ref)`."""
        ref = next(self._refs)
        self._pending[ref] = _Pending(on_message=on_message)
        self.socket.send([internal.pack({"op": op, "ref": ref, **fields})])
        return ref

    def forget(self, ref: int) -> None:
        self._pending.pop(ref, None)


def report_to_supervisor(config: Config, body: Body) -> None:
    """Tell the supervisor `ready` or `fatal` (a short-lived PUSH: used once or twice per life)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(internal.endpoint(config.runtime_dir, internal.SUPERVISOR))
    sock.send(internal.pack(body))
    sock.close()


class SupervisorLink:
    """A lasting PUSH to the supervisor, for messages sent every second (heartbeats)."""

    def __init__(self, config: Config) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10)
        self.sock.connect(internal.endpoint(config.runtime_dir, internal.SUPERVISOR))

    def send(self, body: Body) -> None:
        try:
            self.sock.send(internal.pack(body), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the supervisor is busy; the next beat will do


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the supervisor dies, so no actor outlives it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


ActorMain = Callable[[Config, trio.Event], Awaitable[None]]


@dataclass
class ActorProcess:
    """Runs one actor's main in trio; SIGTERM/SIGINT set `stop`, which the main turns into a
    clean shutdown (the engine ends running generations first)."""

    name: str
    config: Config
    main: ActorMain
    parent_pid: int = field(default_factory=os.getppid)

    def run(self) -> int:
        setup_logging(self.config.log_format, self.config.log_level)
        _die_with_parent()
        if os.getppid() != self.parent_pid:
            return 1
        try:
            trio.run(self._main)
        except KeyboardInterrupt:
            return 0
        except Exception as exc:
            cause = _leaf(exc)
            message = str(cause) or type(cause).__name__
            EventLog(self.name).error("actor failed", error=message)
            EventLog(self.name).debug("actor failed", traceback=_traceback(exc))
            report_to_supervisor(
                self.config, {"op": "fatal", "actor": self.name, "message": message}
            )
            return 1
        return 0

    async def _main(self) -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        stop.set()

            nursery.start_soon(watch_signals)
            await self.main(self.config, stop)
            nursery.cancel_scope.cancel()


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc))


def actor_entry() -> None:
    """`python -m inferencecenter.actors.run inferencecenter-<name> --config FILE`."""
    from importlib import import_module

    if len(sys.argv) != 4 or sys.argv[2] != "--config":
        sys.exit("usage: inferencecenter-<actor> --config FILE")
    name = sys.argv[1].removeprefix("inferencecenter-")
    config = Config.from_file(sys.argv[3])
    if name.startswith(internal.ENGINE + "-") and config.engine_id:
        # A model's engine (`inferencecenter-engine-NAME` in ps) reports as its engine id.
        module, name = import_module("inferencecenter.actors.engine"), config.engine_id
    elif name in internal.ACTORS:
        module = import_module(f"inferencecenter.actors.{name}")
    else:
        sys.exit(f"unknown actor {name!r}")
    sys.exit(ActorProcess(name, config, module.main).run())

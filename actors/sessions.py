"""The sessions actor: who owns which session, per-client quotas, creation times."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import trio

from ..daemon.config import Config
from ..daemon.logs import EventLog
from ..protocol import internal
from ..protocol.errors import Forbidden, LimitReached, NotFound
from .actor import ActorServer, Body, Caller, report_to_supervisor

log = EventLog("sessions")


@dataclass
class SessionRecord:
    session_id: str
    client_id: str
    model: str
    created: float


class SessionTable:
    """Ownership and quotas; the engine holds the contexts, this table says who may use them."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}

    def owned_by(self, client_id: str) -> list[SessionRecord]:
        return [s for s in self.sessions.values() if s.client_id == client_id]

    def create(self, client_id: str, max_sessions: int, model: str) -> SessionRecord:
        if len(self.owned_by(client_id)) >= max_sessions:
            raise LimitReached(f"client {client_id!r} already has {max_sessions} sessions")
        record = SessionRecord("s-" + secrets.token_urlsafe(18), client_id, model, time.time())
        self.sessions[record.session_id] = record
        return record

    def check(self, client_id: str, session_id: str) -> SessionRecord:
        record = self.sessions.get(session_id)
        if record is None:
            raise NotFound(f"no session {session_id[:80]!r}")
        if record.client_id != client_id:
            raise Forbidden("this session belongs to another client")
        return record

    def remove(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


class SessionsActor:
    def __init__(self) -> None:
        self.table = SessionTable()
        self.handlers = {
            "create": self.create,
            "check": self.check,
            "remove": self.remove,
            "list": self.list,
        }

    def create(self, body: Body, caller: Caller) -> None:
        record = self.table.create(body["client_id"], int(body["max_sessions"]), body["model"])
        log.info("session created", session_id=record.session_id, client_id=record.client_id)
        caller.reply(session_id=record.session_id, created=record.created)

    def check(self, body: Body, caller: Caller) -> None:
        record = self.table.check(body["client_id"], body["session_id"])
        caller.reply(model=record.model)

    def remove(self, body: Body, caller: Caller) -> None:
        self.table.remove(body["session_id"])
        log.info("session closed", session_id=body["session_id"])
        caller.reply()

    def list(self, body: Body, caller: Caller) -> None:
        records = sorted(self.table.owned_by(body["client_id"]), key=lambda s: s.created)
        caller.reply(
            sessions=[
                {"session_id": s.session_id, "model": s.model, "created": s.created}
                for s in records
            ]
        )


async def main(config: Config, stop: trio.Event) -> None:
    actor = SessionsActor()
    assert set(actor.handlers) == set(internal.SESSIONS_OPS)
    server = ActorServer(internal.SESSIONS, config, actor.handlers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        report_to_supervisor(config, {"op": "ready", "actor": internal.SESSIONS})
        await stop.wait()
        nursery.cancel_scope.cancel()

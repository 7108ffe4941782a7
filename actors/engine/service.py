"""The engine actor's shell: ops from the socket to the core, the core's events to the sockets,
and the loop that hands each planned step to the decode thread and its result back to the core."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable
from typing import Any

import trio
import zmq

from ...protocol import internal
from ...protocol.messages import SamplingParams
from ..actor import ActorLink, ActorServer, Body, Caller, SupervisorLink, report_to_supervisor
from ..config import Config
from ..logs import EventLog
from .core import Arrival, EngineCore
from .jobs import (
    Backend,
    EndOut,
    Event,
    HistoryAppend,
    QueueFull,
    RequestDone,
    SessionEvent,
    TokenOut,
)
from .planner import PadRows
from .startup import choose_padding, load_backend
from .tokenizer import TokenizerThread
from .worker import DecodeThread, StepResult, execute_step

log = EventLog("engine")

STATS_PERIOD_S = 1.0
# Requests sent together start together, so one prefill step takes them all (instead of the
# first alone and the rest a step later), and temp-0 output, which depends on the batch's shape,
# is the same each time they are sent together. After an idle spell the first step waits for
# the rest: while the last infer is marked `more` (the gateway had others queued behind it) it
# waits for the next one however slow the gateway is (up to COALESCE_MAX_S in all); after an
# unmarked one (the last, or one the gateway forwarded before the next reached it) only
# COALESCE_FIRST_S. A lone request pays COALESCE_FIRST_S.
COALESCE_FIRST_S = 0.001
COALESCE_MAX_S = 0.03
# An input this short is tokenized on the loop: it costs less than the hop to a thread (~0.5 ms
# a KiB), and requests sent together still arrive together.
TOKENIZE_INLINE_CHARS = 2048


class EngineActor:
    """Maps ops to core calls and core events to messages; runs the step loop."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        sessions_link: ActorLink | None = None,
        monitor: ActorLink | None = None,
        pad_rows: PadRows | None = None,
    ) -> None:
        self.config = config
        self.sessions_link = sessions_link
        self.monitor = monitor
        run = functools.partial(execute_step, backend)
        self.decoder = DecodeThread(run, backend.is_eog)
        self.wakeup = trio.Event()
        self.core = EngineCore(config, backend, pad_rows, on_change=self.kick)
        self.callers: dict[int, Caller] = {}  # who asked for each running job
        self.server: ActorServer | None = None  # the socket the callers' messages go out on
        self.next_job_id = 0
        self.more_coming = False  # the last infer said others were sent with it
        self.tokenizer = TokenizerThread()
        self.handlers = {
            "open": self.open,
            "close": self.close,
            "infer": self.infer,
            "abort": self.abort,
            "info": self.info,
            "stats": self.stats,
            "reload": self.reload,
        }

    # ---- ops ---------------------------------------------------------------------------

    def open(self, body: Body, caller: Caller) -> None:
        ctx_size = self.core.open(
            body["session_id"], body.get("system_prompt"), str(body.get("client_id", ""))
        )
        self.send_events()
        caller.reply(ctx_size=ctx_size, max_token_bytes=self.core.max_token_bytes)

    def close(self, body: Body, caller: Caller) -> None:
        closed = self.core.close(body["session_id"], if_idle=bool(body.get("if_idle")))
        self.send_events()
        caller.reply(closed=closed)

    def abort(self, body: Body, caller: Caller) -> None:
        self.core.abort(body["session_id"])
        self.send_events()
        caller.reply()

    def info(self, body: Body, caller: Caller) -> None:
        caller.reply(sessions=self.core.info(list(body.get("session_ids", []))))

    def stats(self, body: Body, caller: Caller) -> None:
        caller.reply(inference=self.core.inference_snapshot())

    async def reload(self, body: Body, caller: Caller) -> None:
        """A hot swap's new engine, once the old one is gone: the idle sessions take their
        histories again (the old engine added to some after this one loaded them)."""
        assert self.sessions_link is not None
        snapshot = await self.sessions_link.request(
            "snapshot", timeout=60.0, model=self.config.model_name
        )
        fresh = [
            h
            for h in snapshot["sessions"]
            if self.core.sessions.get(h["session_id"]) is None
            or (
                self.core.sessions[h["session_id"]].job is None
                and h["session_id"] not in self.core.arriving  # its input is being tokenized
            )
        ]
        for history in fresh:
            session = self.core.sessions.get(history["session_id"])
            if session is not None:
                self.core.slots.release(session)
        self.core.load_histories(fresh)
        caller.reply(sessions=len(fresh))

    def infer(self, body: Body, caller: Caller) -> Awaitable[None] | None:
        """Checked at once, in the order infers and aborts arrive; a long input is then
        tokenized in the tokenizer thread (tokenizer.py) while the loop goes on stepping (a
        1 MiB prompt costs ~0.6 s)."""
        self.next_job_id += 1
        job_id = self.next_job_id
        self.more_coming = bool(body.get("more"))
        self.callers[job_id] = caller
        try:
            arrival = self.core.accept(
                job_id,
                body["session_id"],
                SamplingParams.from_wire(body["params"]),
                prompt=body.get("prompt"),
                messages=body.get("messages"),
                reset=bool(body.get("reset")),
                priority=str(body.get("priority", "normal")),
                client_id=str(body.get("client_id", "")),
                max_prompt_tokens=int(body.get("max_prompt_tokens") or 0),
            )
            if arrival.chars > TOKENIZE_INLINE_CHARS:
                return self.tokenize_off_loop(arrival)
            try:
                tokenized = self.core.tokenize(arrival)
            except BaseException:
                self.core.drop(arrival)
                raise
            self.core.arrived(arrival, *tokenized)
        except BaseException:
            self.callers.pop(job_id, None)
            raise
        finally:
            self.send_events()
        return None

    async def tokenize_off_loop(self, arrival: Arrival) -> None:
        try:
            try:
                tokenized = await self.tokenizer.run(functools.partial(self.core.tokenize, arrival))
            except BaseException:
                self.core.drop(arrival)
                raise
            self.core.arrived(arrival, *tokenized)
        except BaseException:
            self.callers.pop(arrival.job.job_id, None)
            raise
        finally:
            self.send_events()

    # ---- events out ----------------------------------------------------------------------

    def send_events(self) -> None:
        """The core's events as messages: a step's tokens go to each gateway in one message
        (it fans them out to its clients); every end follows its tokens."""
        rows: dict[bytes, list[list[Any]]] = {}
        for event in self.core.take_events():
            if isinstance(event, TokenOut):
                caller = self.callers.get(event.job_id)
                if caller is not None:
                    row = [caller.ref, event.seq, event.content]
                    if event.logprobs is not None:
                        row.append(event.logprobs)
                    rows.setdefault(caller.peer, []).append(row)
                continue
            if isinstance(event, EndOut) and rows:
                self.send_tokens(rows)
                rows = {}
            self.send_event(event)
        if rows:
            self.send_tokens(rows)

    def send_tokens(self, rows: dict[bytes, list[list[Any]]]) -> None:
        assert self.server is not None
        for peer, batch in rows.items():
            self.server.send(peer, {"op": internal.TOKENS, "ref": 0, "rows": batch})

    def send_event(self, event: Event) -> None:
        monitor, model = self.monitor, self.config.model_name
        if isinstance(event, EndOut):
            caller = self.callers.pop(event.job_id, None)
            if caller is not None:
                fields: Body = {"finish_reason": event.finish_reason, "stats": event.stats}
                if event.message:
                    fields["message"] = event.message
                caller.send(internal.END, **fields)
        elif isinstance(event, HistoryAppend):
            if self.sessions_link is not None:
                self.sessions_link.push(
                    "append",
                    model=model,
                    session_id=event.session_id,
                    tokens=event.tokens,
                    chat=event.chat,
                    reset=event.reset,
                )
        elif monitor is None:
            return
        elif isinstance(event, SessionEvent):
            monitor.push(
                "event",
                topic="session",
                kind=event.kind,
                session_id=event.session_id,
                client_id=event.client_id,
                model=model,
            )
        elif isinstance(event, RequestDone):
            monitor.push("request", model=model, **vars(event))
        elif isinstance(event, QueueFull):
            monitor.push("event", topic="engine", kind="overloaded")

    # ---- the loop ------------------------------------------------------------------------

    def kick(self) -> None:
        """Something changed (an arrival, an abort, an end): the loop must look, and the decode
        thread must not go on by itself."""
        self.decoder.hold.set()
        self.wakeup.set()

    async def run(self) -> None:
        core = self.core
        self.decoder.start()
        self.tokenizer.start()
        while True:
            await trio.lowlevel.checkpoint()  # steps wait for their results shielded
            if core.going_on:  # the decode thread went on by itself
                core.going_on_done(await self.next_result())
                self.send_events()
                continue
            core.admit()
            self.send_events()
            if not core.active:
                seen = core.arrivals
                await self.wait_for_change()
                if core.arrivals != seen:
                    await self.coalesce()
                continue
            await self.step()

    async def wait_for_change(self) -> None:
        await self.wakeup.wait()
        self.wakeup = trio.Event()

    async def coalesce(self) -> None:
        """Wait for the requests sent with the one that just arrived (bounded)."""
        deadline = trio.current_time() + COALESCE_MAX_S
        while True:
            seen = self.core.arrivals
            until = deadline if self.more_coming else trio.current_time() + COALESCE_FIRST_S
            with trio.move_on_at(min(deadline, until)):
                while self.core.arrivals == seen:
                    await self.wait_for_change()
            if self.core.arrivals == seen:
                return

    async def step(self) -> None:
        started = time.perf_counter()
        # The loop looks at everything now; what happens from here on holds the thread again.
        self.decoder.hold.clear()
        step = self.core.plan_step()
        self.send_events()
        if step is None:
            return
        self.decoder.submit(step)
        result = await self.next_result()
        self.core.step_done(result, (time.perf_counter() - started) * 1000)
        self.send_events()

    async def next_result(self) -> StepResult:
        """The decode thread's next result; the loop waits for it even when cancelled (the
        context must not be closed under a decode)."""
        with trio.CancelScope(shield=True):
            result = await self.decoder.results.get()
        return result

    async def stop_decoding(self) -> None:
        """Let the decode thread finish what it is doing and end (the context is closed next)."""
        self.decoder.hold.set()
        while self.core.going_on:
            self.core.going_on_done(await self.next_result())
        self.decoder.stop()


async def push_stats(engine: EngineActor, monitor: ActorLink, supervisor: SupervisorLink) -> None:
    """Figures for the monitor, and the heartbeat the supervisor's hang check reads."""
    core, config = engine.core, engine.config
    while True:
        monitor.push(
            "inference",
            model=config.model_name,
            engine=config.engine_id,
            inference=core.inference_snapshot(),
        )
        supervisor.send(
            {
                "op": "alive",
                "actor": config.engine_id or internal.ENGINE,
                "steps": core.steps,
                "pending": core.pending(),
                "sessions": len(core.sessions),
            }
        )
        await trio.sleep(STATS_PERIOD_S)


async def main(config: Config, stop: trio.Event) -> None:
    started = time.monotonic()
    backend = await trio.to_thread.run_sync(load_backend, config)
    await trio.to_thread.run_sync(backend.eog_tokens)  # a vocabulary scan, once, not mid-request
    log.info(
        "model loaded",
        model=config.model_name,
        name=backend.model_name,
        seconds=round(time.monotonic() - started, 2),
        parallel=backend.n_seq_max,
        ctx_size=backend.n_ctx_seq,
        gpu_layers=backend.gpu_layers_used,
    )
    pad_rows = await trio.to_thread.run_sync(choose_padding, config, backend)
    sessions_link = ActorLink(internal.SESSIONS, config)
    monitor = ActorLink(internal.MONITOR, config)
    engine = EngineActor(config, backend, sessions_link, monitor, pad_rows)
    assert set(engine.handlers) == set(internal.ENGINE_OPS)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sessions_link.run)
            nursery.start_soon(monitor.run)
            snapshot = await sessions_link.request(
                "snapshot", timeout=60.0, model=config.model_name
            )
            engine.core.load_histories(snapshot["sessions"])
            if engine.core.sessions:
                log.info("sessions reloaded", count=len(engine.core.sessions))
            name = config.engine_id or internal.ENGINE
            server = engine.server = ActorServer(name, config, engine.handlers)
            nursery.start_soon(server.run)
            nursery.start_soon(push_stats, engine, monitor, SupervisorLink(config))
            loop_scope = trio.CancelScope()
            loop_done = trio.Event()

            async def run_loop() -> None:
                try:
                    with loop_scope:
                        await engine.run()
                finally:
                    loop_done.set()

            nursery.start_soon(run_loop)
            report_to_supervisor(config, {"op": "ready", "actor": name})
            await stop.wait()
            engine.decoder.hold.set()
            loop_scope.cancel()  # the loop waits for a step in flight to complete
            await loop_done.wait()
            await engine.stop_decoding()
            engine.core.abort_all()
            engine.send_events()
            await server.socket.flush(2.0)
            await sessions_link.socket.flush(2.0)  # the histories' last appends
            sessions_link.socket.sock.setsockopt(zmq.LINGER, 2000)  # not dropped at exit
            nursery.cancel_scope.cancel()
    finally:
        engine.decoder.stop(wait_s=10.0)  # never close the context under a decode
        engine.tokenizer.stop()  # nor the model under a tokenize
        backend.close()

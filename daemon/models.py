"""The model registry: the one owner of every model's state (available, loading, loaded,
unloading), its engine process, its last use and its memory.

It lives in the supervisor, which starts and supervises the engines anyway. The gateway, the
HTTP and the sessions actors ask it over the `models` socket through an explicit op table
(`list_models`, `load_model`, `unload_model`, `ensure_loaded`, `watch_models`) and hear of every
change (`watch_models`), so each of them knows where a model's engine is without asking per
request. Each load gets an engine of its own (`engine.N`, shown as
`inferencecenter-engine-NAME` in ps); a crashed engine is restarted under the same id, so
requests waiting in its socket reach its next life.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from ..actors.config import MODEL_NAME, Config
from ..actors.logs import EventLog
from ..protocol import internal
from ..protocol.errors import BadRequest, InternalError, NotFound, ProtocolError, Unavailable
from .memory import MemoryCheck, MemoryPlan, Settings
from .processes import STABLE_S, ActorProcess, EngineHealth

log = EventLog("supervisor")

AVAILABLE, LOADING, LOADED, UNLOADING = "available", "loading", "loaded", "unloading"
# A hot swap holds new work for its model, then waits for the old engine to be idle; only a
# heartbeat sent this long after the hold counts, so that infers forwarded just before it
# (already on their way to the old engine) are seen in its queue.
DRAIN_GRACE_S = 0.5
STOP_DEADLINE_S = 10.0
RELOAD_TIMEOUT_S = 10.0
BUSY_TIMEOUT_S = 2.0
TICK_S = 1.0

Body = dict[str, Any]


@dataclass
class Caller:
    """Who asked (a peer of the models socket and its ref); answered now or when done."""

    peer: bytes
    ref: int
    since: float = field(default_factory=time.monotonic)


@dataclass
class Engine(ActorProcess):
    """One load's engine process."""

    model: str = ""
    settings: Settings = field(default_factory=lambda: Settings("", 1, 64, 0))
    plan: MemoryPlan | None = None
    health: EngineHealth = field(default_factory=EngineHealth)
    served: bool = False  # it was ready at least once: a later exit is a crash, not a failed load
    stopping: bool = False  # asked to stop: its exit is expected
    stop_by: float = 0.0
    fatal: str = ""  # the reason it reported before failing
    rss_mb: float | None = None


@dataclass
class ModelEntry:
    name: str
    settings: Settings  # what its next load uses (a running engine has its own)
    from_dir: bool = False
    state: str = AVAILABLE
    engine: Engine | None = None  # the engine serving it (or loading, or stopping)
    incoming: Engine | None = None  # a hot swap's new engine
    swap: Settings | None = None  # a swap in progress, to these settings
    held_at: float | None = None  # a swap holds new work since (the old engine drains)
    waiters: list[Caller] = field(default_factory=list)  # answered once it serves
    swap_waiters: list[Caller] = field(default_factory=list)  # answered once the swap is done
    unload_waiters: list[Caller] = field(default_factory=list)
    reload_after: bool = False  # asked for while unloading: loaded again once gone
    unload_reason: str = ""
    last_used: float = field(default_factory=time.monotonic)
    load_started: float = 0.0
    error: str = ""  # why its last load failed
    sessions: int = 0  # as its engine last said (kept while unloaded, as the sessions are)

    def engines(self) -> list[Engine]:
        return [e for e in (self.engine, self.incoming) if e is not None]

    def idle(self) -> bool:
        """Serving and nothing for it on the way; whether its engine generates is asked of the
        engine itself (see ModelRegistry.engine_busy)."""
        engine = self.engine
        return (
            self.state == LOADED
            and self.swap is None
            and not self.waiters
            and engine is not None
            and engine.ready
        )


def check_model_file(path: str) -> str:
    """The absolute path of a readable GGUF file, or BadRequest saying what is wrong."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise BadRequest(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise BadRequest(f"{path} is not a GGUF file")
    return os.path.abspath(path)


class ModelRegistry:
    """Every model the daemon knows, each in one state, with the engines that serve them."""

    def __init__(
        self,
        config: Config,
        send: Callable[[bytes, Body], None],
        notify: Callable[[Body], None],
    ) -> None:
        self.config = config
        self.send = send  # to a peer of the models socket
        self.notify = notify  # to the monitor (model events, the models' figures)
        self.default = config.model_name
        self.models: dict[str, ModelEntry] = {
            name: ModelEntry(name, self.settings_for(path)) for name, path in config.models
        }
        if not self.models:  # a config without --model: the default model's file
            self.models[self.default] = ModelEntry(self.default, self.settings_for(config.model))
        self.memory = MemoryCheck(config.batch_size, config.vram_margin_mb)
        self.loads = 0  # numbers the engines
        self.watchers: dict[str, Caller] = {}
        self.ticked = 0.0
        self.handlers: dict[str, Callable[[Caller, Body], None]] = {
            "list_models": self.list_models,
            "load_model": self.load_model,
            "unload_model": self.unload_model,
            "ensure_loaded": self.ensure_loaded,
            "watch_models": self.watch_models,
        }
        assert set(self.handlers) == set(internal.MODELS_OPS)
        self.rescan()

    def settings_for(self, path: str, body: Body | None = None) -> Settings:
        """The serve flags' settings for a file, with a load's overrides."""
        body = body or {}
        config = self.config

        def pick(name: str, default: int) -> int:
            value = body.get(name)
            return default if value is None else int(value)

        return Settings(
            path,
            pick("parallel", config.parallel),
            pick("ctx_size", config.ctx_size),
            pick("gpu_layers", config.gpu_layers),
        )

    def rescan(self) -> None:
        """--models-dir: each *.gguf there is a model named by its stem; one that is gone is
        forgotten unless it is in memory."""
        directory = self.config.models_dir
        if not directory:
            return
        try:
            found = {p.stem: str(p) for p in Path(directory).glob("*.gguf") if p.is_file()}
        except OSError as exc:
            log.warning("models dir not read", path=directory, reason=str(exc))
            return
        changed = False
        for name, path in sorted(found.items()):
            if name not in self.models and MODEL_NAME.fullmatch(name):
                self.models[name] = ModelEntry(name, self.settings_for(path), from_dir=True)
                changed = True
        for name, entry in list(self.models.items()):
            if entry.from_dir and name not in found and entry.state == AVAILABLE:
                del self.models[name]
                changed = True
        if changed:
            self.broadcast()

    # ---- the op table -------------------------------------------------------------------

    def handle(self, peer: bytes, body: Body) -> None:
        caller = Caller(peer, int(body.get("ref", 0)))
        handler = self.handlers.get(str(body.get("op")))
        try:
            if handler is None:
                raise InternalError(f"the model registry has no op {body.get('op')!r}")
            handler(caller, body)
        except ProtocolError as exc:
            self.fail(caller, exc)
        except Exception:
            log.exception("model op failed", op=body.get("op"))
            self.fail(caller, InternalError(f"the model registry failed on {body.get('op')}"))

    def reply(self, caller: Caller, **fields: Any) -> None:
        self.send(caller.peer, {"op": internal.REPLY, "ref": caller.ref, **fields})

    def fail(self, caller: Caller, exc: ProtocolError) -> None:
        body = {"op": internal.ERROR, "ref": caller.ref, "code": exc.code, "message": exc.message}
        self.send(caller.peer, body)

    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            self.rescan()
            entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"no model {name[:80]!r}; known: {', '.join(self.models)}")
        return entry

    def list_models(self, caller: Caller, body: Body) -> None:
        self.rescan()
        models = [self.describe(entry) for entry in self.models.values()]
        self.reply(caller, default=self.default, models=models)

    def load_model(self, caller: Caller, body: Body) -> None:
        """Load a model (admin only; the front actor checked): a known one by name, or a file
        under a name (a new name, or a hot swap of a loaded one)."""
        name = str(body["model"])
        path = body.get("path")
        entry = self.models.get(name)
        if entry is None and path is None:
            entry = self.entry(name)  # NotFound unless --models-dir now has it
        if path is not None:
            path = check_model_file(str(path))
        base = entry.settings.path if entry is not None else str(path)
        settings = self.settings_for(path or base, body)
        if entry is None:
            entry = self.models[name] = ModelEntry(name, settings)
            self.broadcast()
        self.request_load(entry, settings, caller)

    def ensure_loaded(self, caller: Caller, body: Body) -> None:
        """A session needs the model: answered once it serves (loaded on demand)."""
        entry = self.entry(str(body.get("model") or self.default))
        entry.last_used = time.monotonic()
        self.request_load(entry, None, caller)

    def unload_model(self, caller: Caller, body: Body) -> None:
        self.unload(self.entry(str(body["model"])), "request", caller)

    def watch_models(self, caller: Caller, body: Body) -> None:
        """The table now and at every change; a watcher that comes again replaces itself."""
        self.watchers[str(body.get("watcher", ""))] = caller
        self.send(caller.peer, {"op": "models", "ref": caller.ref, **self.table()})

    # ---- what the others see ------------------------------------------------------------

    def table(self) -> Body:
        """Per model: its state, the engine new work goes to and every engine alive (a link
        to one is kept while it runs: a hot swap's old engine finishes its streams)."""
        models = {}
        for name, entry in self.models.items():
            models[name] = {
                "state": entry.state,
                "engine": entry.engine.name if entry.engine is not None else None,
                "engines": [e.name for e in entry.engines()],
            }
        return {"default": self.default, "models": models}

    def broadcast(self) -> None:
        table = self.table()
        for caller in self.watchers.values():
            self.send(caller.peer, {"op": "models", "ref": caller.ref, **table})

    def describe(self, entry: ModelEntry) -> Body:
        engine = entry.engine
        settings = engine.settings if engine is not None else entry.settings
        memory: float | None = None
        for running in entry.engines():
            if running.rss_mb is not None:
                gpu = running.plan.gpu_mb if running.plan is not None else 0.0
                memory = (memory or 0.0) + running.rss_mb + gpu
        return {
            "model": entry.name,
            "state": entry.state,
            "parallel": settings.parallel,
            "ctx_size": settings.ctx_size,
            "sessions": entry.sessions,
            "active_generations": engine.health.pending if engine is not None else 0,
            "memory_mb": None if memory is None else round(memory, 1),
        }

    def event(self, entry: ModelEntry, kind: str, **fields: Any) -> None:
        """`event.model` on the metrics stream: loading, loaded, unloaded, failed."""
        self.notify(
            {"op": "event", "ref": 0, "topic": "model", "kind": kind, **fields, "model": entry.name}
        )

    # ---- loading ------------------------------------------------------------------------

    def request_load(self, entry: ModelEntry, settings: Settings | None, caller: Caller) -> None:
        """Answer `caller` once `entry` serves (with `settings`, when given: a different file
        or size under a loaded name is a hot swap)."""
        if entry.state == LOADED:
            assert entry.engine is not None
            if settings is None or settings == entry.engine.settings:
                self.reply_loaded(caller, entry)
            elif entry.swap is None:
                self.start_swap(entry, settings, caller)
            elif settings == entry.swap:
                entry.swap_waiters.append(caller)
            else:
                raise Unavailable(f"model {entry.name} is being swapped; retry once it is done")
        elif entry.state == LOADING:
            target = entry.swap or (entry.engine.settings if entry.engine else entry.settings)
            if settings is not None and settings != target:
                raise Unavailable(f"model {entry.name} is loading; load it again once it serves")
            if settings is not None and entry.swap is not None:
                entry.swap_waiters.append(caller)
            else:
                entry.waiters.append(caller)
        elif entry.state == UNLOADING:
            entry.settings = settings or entry.settings
            entry.reload_after = True
            entry.waiters.append(caller)
        else:
            entry.settings = settings or entry.settings
            entry.waiters.append(caller)
            self.start_load(entry)

    def start_load(self, entry: ModelEntry) -> None:
        entry.state = LOADING
        entry.error = ""
        entry.load_started = time.monotonic()
        self.event(entry, "loading")
        self.broadcast()
        self.advance(entry)

    def advance(self, entry: ModelEntry) -> None:
        """Start the engine of a model waiting to load, once there is room: under
        --max-loaded-models and in memory. The least recently used idle model is unloaded to
        make room; with none, the load fails `unavailable`."""
        others = [e for m in self.models.values() if m is not entry for e in m.engines()]
        limit = self.config.max_loaded_models
        if limit and len(others) >= limit:
            if any(e.stopping for e in others):
                return  # room is on its way
            victim = self.idle_victim(entry)
            if victim is None:
                self.fail_load(
                    entry,
                    Unavailable(
                        f"{len(others)} models are loaded (--max-loaded-models {limit}) and "
                        f"none is idle; model {entry.name} cannot be loaded now"
                    ),
                )
            else:
                self.unload(victim, f"room for {entry.name}")
            return
        reserved = [e.plan for e in others if not e.ready and e.plan is not None]
        short, plan = self.memory.check(entry.name, entry.settings, reserved)
        if short is not None:
            if any(e.stopping for e in others):
                return
            victim = self.idle_victim(entry)
            if victim is None:
                self.fail_load(entry, Unavailable(short))
            else:
                log.info("unloading a model for memory", model=victim.name, reason=short)
                self.unload(victim, f"memory for {entry.name}")
            return
        entry.engine = self.spawn_engine(entry, entry.settings, plan)

    def advance_all(self) -> None:
        """Room was freed: loads waiting for it go on."""
        for entry in list(self.models.values()):
            if entry.state == LOADING and entry.engine is None and entry.swap is None:
                self.advance(entry)

    def idle_victim(self, entry: ModelEntry) -> ModelEntry | None:
        """The least recently used idle model but `entry`. Its engine is asked first: the
        heartbeat may be a second old, and an infer that just started must not be cut."""
        idle = sorted(
            (m for m in self.models.values() if m is not entry and m.idle()),
            key=lambda m: m.last_used,
        )
        for candidate in idle:
            assert candidate.engine is not None
            if not self.engine_busy(candidate.engine):
                return candidate
            candidate.last_used = time.monotonic()
        return None

    def spawn_engine(
        self, entry: ModelEntry, settings: Settings, plan: MemoryPlan | None
    ) -> Engine:
        self.loads += 1
        engine_id = internal.engine_id(self.loads)
        gpu_layers = settings.gpu_layers
        if plan is not None and plan.gpu_layers is not None:
            gpu_layers = plan.gpu_layers  # planned here, with the loads in progress counted
        config = dataclasses.replace(
            self.config,
            model=settings.path,
            parallel=settings.parallel,
            ctx_size=settings.ctx_size,
            gpu_layers=gpu_layers,
            served_name=entry.name,
            engine_id=engine_id,
        )
        path = Path(self.config.runtime_dir) / f"{engine_id}.json"
        path.write_text(config.to_json())
        engine = Engine(
            engine_id,
            process_name=internal.engine_process_name(entry.name),
            config_path=path,
            model=entry.name,
            settings=settings,
            plan=plan,
        )
        engine.spawn(path)
        log.info(
            "loading model",
            model=entry.name,
            engine=engine_id,
            path=settings.path,
            parallel=settings.parallel,
            ctx_size=settings.ctx_size,
            host_mb=round(plan.host_mb) if plan else None,
            gpu_mb=round(plan.gpu_mb) if plan else None,
        )
        return engine

    def mark_loaded(self, entry: ModelEntry) -> None:
        now = time.monotonic()
        entry.state = LOADED
        entry.last_used = now
        seconds = round(now - entry.load_started, 2)
        log.info("model loaded", model=entry.name, seconds=seconds)
        self.event(entry, "loaded", seconds=seconds)
        self.broadcast()  # before the replies: a front actor knows the engine when it hears
        for caller in entry.waiters + entry.swap_waiters:
            self.reply_loaded(caller, entry)
        entry.waiters, entry.swap_waiters = [], []

    def reply_loaded(self, caller: Caller, entry: ModelEntry) -> None:
        assert entry.engine is not None
        seconds = round(time.monotonic() - caller.since, 2)
        self.reply(caller, model=entry.name, engine=entry.engine.name, seconds=seconds)

    def fail_load(self, entry: ModelEntry, exc: ProtocolError) -> None:
        entry.state = AVAILABLE
        entry.error = exc.message
        log.error("model not loaded", model=entry.name, reason=exc.message)
        self.event(entry, "failed", message=exc.message)
        for caller in entry.waiters:
            self.fail(caller, exc)
        entry.waiters = []
        self.broadcast()

    # ---- hot swap -----------------------------------------------------------------------

    def start_swap(self, entry: ModelEntry, settings: Settings, caller: Caller) -> None:
        """A new file (or size) under a loaded name: its engine loads beside the old one, which
        serves meanwhile; then new work is held while the old engine finishes its running
        generations, and the new one takes the sessions' histories and serves. When both do
        not fit, the old one drains and goes first."""
        entry.swap, entry.swap_waiters = settings, [caller]
        others = [e for m in self.models.values() for e in m.engines()]
        limit = self.config.max_loaded_models
        reserved = [e.plan for e in others if not e.ready and e.plan is not None]
        short, plan = self.memory.check(entry.name, settings, reserved)
        log.info("swapping model", model=entry.name, path=settings.path, hot=short is None)
        if short is None and not (limit and len(others) >= limit):
            entry.incoming = self.spawn_engine(entry, settings, plan)
        else:
            self.hold(entry)

    def hold(self, entry: ModelEntry) -> None:
        entry.state = LOADING
        entry.held_at = time.monotonic()
        entry.load_started = entry.held_at
        self.broadcast()

    def switch(self, entry: ModelEntry) -> None:
        """The old engine of a swap drained and stopped: the new one serves."""
        settings, new = entry.swap, entry.incoming
        assert settings is not None
        entry.swap, entry.held_at, entry.incoming = None, None, None
        entry.settings = settings
        entry.waiters += entry.swap_waiters
        entry.swap_waiters = []
        if new is None:  # cold: a plain load now that the old one is gone
            self.advance(entry)
            return
        entry.engine = new
        if new.ready:
            self.reload(new)
            self.mark_loaded(entry)
        # else it is restarting: it takes the histories afresh and is marked loaded when ready

    def reload(self, engine: Engine) -> None:
        """Have an engine take its sessions' histories again."""
        reply = self.ask_engine(engine, "reload", RELOAD_TIMEOUT_S)
        if reply is None:
            log.warning("engine did not reload its sessions in time", engine=engine.name)
        else:
            log.info("sessions reloaded", engine=engine.name, sessions=reply.get("sessions"))

    def engine_busy(self, engine: Engine) -> bool:
        """Whether the engine generates or has infers waiting, by its own answer (no answer:
        busy, to be safe)."""
        reply = self.ask_engine(engine, "stats", BUSY_TIMEOUT_S)
        if reply is None:
            return True
        inference = reply.get("inference", {})
        return bool(inference.get("active_generations", 0) or inference.get("queued", 0))

    def ask_engine(self, engine: Engine, op: str, timeout_s: float) -> Body | None:
        """One request to an engine, waited for here (bounded: the supervisor's loop waits)."""
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(internal.endpoint(self.config.runtime_dir, engine.name))
            sock.send(internal.pack({"op": op, "ref": 1}))
            if not sock.poll(int(timeout_s * 1000)):
                return None
            reply = internal.unpack(sock.recv())
            return reply if reply.get("op") == internal.REPLY else None
        finally:
            sock.close()

    # ---- unloading ----------------------------------------------------------------------

    def unload(self, entry: ModelEntry, reason: str, caller: Caller | None = None) -> None:
        """Stop the model's engine (its running generations end "aborted"); its sessions stay
        with the sessions actor and go on when it is loaded again."""
        if entry.state == AVAILABLE:
            if caller is not None:
                self.reply(caller, model=entry.name)
            return
        if caller is not None:
            entry.unload_waiters.append(caller)
        if entry.state == UNLOADING:
            entry.reload_after = False
            return
        gone = Unavailable(f"model {entry.name} was unloaded before it served")
        if entry.swap is not None:
            if entry.incoming is not None:
                self.stop_engine(entry.incoming)
            for waiter in entry.swap_waiters:
                self.fail(waiter, gone)
            entry.swap, entry.swap_waiters, entry.held_at = None, [], None
        for waiter in entry.waiters:
            self.fail(waiter, gone)
        entry.waiters = []
        entry.unload_reason = reason
        log.info("unloading model", model=entry.name, reason=reason)
        if entry.engine is None:  # it was waiting for room
            entry.state = UNLOADING
            self.engine_gone(entry, None)
            return
        entry.state = UNLOADING
        self.stop_engine(entry.engine)
        self.broadcast()

    def stop_engine(self, engine: Engine) -> None:
        engine.stopping = True
        engine.stop_by = time.monotonic() + STOP_DEADLINE_S
        if engine.restart_at is not None:
            engine.restart_at = None  # due to restart: it is simply not started again
        elif engine.running():
            assert engine.process is not None
            engine.process.terminate()

    def engine_gone(self, entry: ModelEntry, engine: Engine | None) -> None:
        """An engine stopped as asked (or an unload found none running)."""
        if engine is not None:
            log.info("engine stopped", model=entry.name, engine=engine.name)
        if engine is not None and engine is entry.incoming:
            entry.incoming = None
        elif engine is entry.engine:
            entry.engine = None
            if entry.swap is not None:
                self.switch(entry)
            else:
                entry.state = AVAILABLE
                self.event(entry, "unloaded", reason=entry.unload_reason)
                for caller in entry.unload_waiters:
                    self.reply(caller, model=entry.name)
                entry.unload_waiters = []
                if entry.reload_after:
                    entry.reload_after = False
                    self.start_load(entry)
        self.broadcast()
        self.advance_all()

    # ---- what the engines report, and watching them ---------------------------------------

    def engine_by_id(self, engine_id: str) -> tuple[ModelEntry, Engine] | None:
        for entry in self.models.values():
            for engine in entry.engines():
                if engine.name == engine_id:
                    return entry, engine
        return None

    def on_report(self, body: Body) -> bool:
        """An engine's `ready`, `alive` or `fatal`; False when no engine has this id."""
        found = self.engine_by_id(str(body.get("actor")))
        if found is None:
            return False
        entry, engine = found
        op, now = body.get("op"), time.monotonic()
        if op == "ready":
            engine.ready = engine.served = True
            engine.health = EngineHealth()
            if engine is entry.incoming:
                self.hold(entry)  # the new engine serves: the old one drains
            elif engine is entry.engine and entry.state == LOADING and entry.swap is None:
                self.mark_loaded(entry)
            elif engine is entry.engine and entry.state == LOADED:
                self.broadcast()
        elif op == "alive":
            steps, pending = int(body.get("steps", 0)), int(body.get("pending", 0))
            if steps != engine.health.steps or pending:
                entry.last_used = now
            engine.health.beat(steps, pending, now)
            engine.health.sessions = int(body.get("sessions", 0))
            if engine is entry.engine:
                entry.sessions = engine.health.sessions
        elif op == "fatal":
            engine.fatal = str(body.get("message", ""))
        return True

    def poll(self, now: float) -> None:
        """Exits, restarts, stop deadlines, hung engines; then the once-a-second work."""
        for entry in list(self.models.values()):
            for engine in entry.engines():
                self.watch_engine(entry, engine, now)
        if now - self.ticked >= TICK_S:
            self.ticked = now
            self.tick(now)

    def watch_engine(self, entry: ModelEntry, engine: Engine, now: float) -> None:
        if engine.restart_at is not None:
            if now >= engine.restart_at:
                engine.restart_at = None
                assert engine.config_path is not None
                engine.spawn(engine.config_path)
            return
        process = engine.process
        code = process.poll() if process is not None else 0
        if code is None:
            assert process is not None
            if engine.stopping and now > engine.stop_by:
                log.warning("engine did not stop in time, killing", engine=engine.name)
                process.kill()
            elif engine.ready and now - engine.started > STABLE_S:
                engine.crashes_in_a_row = 0
            if engine.ready and not engine.stopping:
                self.check_hung(entry, engine, now)
            return
        engine.ready = False
        old_of_swap = entry.held_at is not None and engine is entry.engine
        if engine.stopping or old_of_swap:
            self.engine_gone(entry, engine)
        elif not engine.served:
            self.load_failed(entry, engine, code)
        else:
            self.crashed(entry, engine, code, now)

    def check_hung(self, entry: ModelEntry, engine: Engine, now: float) -> None:
        if engine.health.hung(now, self.config.engine_hang_s) and engine.process is not None:
            log.error(
                "engine hung, killing it",
                model=entry.name,
                pending=engine.health.pending,
                seconds=round(now - engine.health.progress_at, 1),
            )
            engine.process.kill()

    def load_failed(self, entry: ModelEntry, engine: Engine, code: int) -> None:
        reason = engine.fatal or f"its engine exited with code {code}"
        error = Unavailable(f"cannot load model {entry.name}: {reason}")
        if engine is entry.incoming:
            entry.incoming = None
            log.error("swap failed", model=entry.name, reason=reason)
            self.event(entry, "failed", message=error.message)
            for caller in entry.swap_waiters:
                self.fail(caller, error)
            entry.swap, entry.swap_waiters = None, []
            self.broadcast()
        else:
            entry.engine = None
            self.fail_load(entry, error)
        self.advance_all()

    def crashed(self, entry: ModelEntry, engine: Engine, code: int, now: float) -> None:
        """An engine that served exited: restarted with backoff (its sessions come back with
        it), or, crashing in a loop, its model is unloaded; the other models go on."""
        if engine.crashed(now):
            delay = engine.backoff()
            engine.restart_at = now + delay
            log.warning(
                "engine exited, restarting",
                model=entry.name,
                engine=engine.name,
                code=code,
                delay_s=round(delay, 2),
            )
            self.event(entry, "failed", message=f"its engine exited with code {code}; restarting")
            if engine is entry.engine and entry.state == LOADED:
                entry.state = LOADING
                entry.load_started = now
                self.broadcast()
            return
        log.error("engine keeps crashing, unloading its model", model=entry.name, code=code)
        error = Unavailable(f"the engine of model {entry.name} keeps crashing")
        if engine is entry.incoming:
            entry.incoming = None
        else:
            entry.engine = None
        if entry.engine is None and entry.incoming is None:
            entry.swap, entry.held_at = None, None
            entry.waiters += entry.swap_waiters
            entry.swap_waiters = []
            self.fail_load(entry, error)
            for caller in entry.unload_waiters:
                self.reply(caller, model=entry.name)
            entry.unload_waiters = []
        self.broadcast()
        self.advance_all()

    def tick(self, now: float) -> None:
        """Once a second: keep-alive, swaps whose old engine is drained, memory figures."""
        keep_alive = self.config.keep_alive
        for entry in list(self.models.values()):
            if keep_alive and entry.idle() and now - entry.last_used >= keep_alive:
                assert entry.engine is not None
                if self.engine_busy(entry.engine):
                    entry.last_used = now
                else:
                    self.unload(entry, "keep_alive")
            old = entry.engine
            if entry.held_at is not None and old is not None and not old.stopping:
                fresh = old.health.heard_at >= entry.held_at + DRAIN_GRACE_S
                if not old.running() or (fresh and old.health.pending == 0):
                    log.info("old engine drained", model=entry.name, engine=old.name)
                    self.stop_engine(old)
            for engine in entry.engines():
                engine.rss_mb = process_rss_mb(engine)
        self.notify(
            {
                "op": "models",
                "ref": 0,
                "default": self.default,
                "models": [self.describe(entry) for entry in self.models.values()],
                "engines": {e.name: m.name for m in self.models.values() for e in m.engines()},
            }
        )

    # ---- the supervisor's own use -------------------------------------------------------

    def start_at_launch(self) -> list[str]:
        """Begin loading the models given with --model (up to --max-loaded-models), in order;
        the supervisor waits for each before the next (see Supervisor.start)."""
        names = [name for name, _ in self.config.models] or [self.default]
        limit = self.config.max_loaded_models
        return names[:limit] if limit else names

    def all_engines(self) -> list[Engine]:
        return [e for entry in self.models.values() for e in entry.engines()]

    def serving(self) -> bool:
        """No engine is down after a crash (GET /health says 503 until it is back)."""
        return not any(e.served and not e.ready and not e.stopping for e in self.all_engines())

    def heartbeats_fresh(self, now: float) -> bool:
        return all(now - e.health.heard_at < 5.0 for e in self.all_engines() if e.ready)

    def stop_all(self, deadline_s: float) -> None:
        """Every engine at once (each ends its generations with `end`), then wait for them."""
        engines = self.all_engines()
        for engine in engines:
            engine.stopping = True
            engine.restart_at = None
            if engine.running():
                assert engine.process is not None
                engine.process.terminate()
        for engine in engines:
            engine.stop(deadline_s)


def process_rss_mb(engine: Engine) -> float | None:
    if not engine.running():
        return None
    assert engine.process is not None
    try:
        return float(psutil.Process(engine.process.pid).memory_info().rss) / 2**20
    except psutil.Error:
        return None

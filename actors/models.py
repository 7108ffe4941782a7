"""What the gateway, the HTTP and the sessions actors know of the models: each one's state and
engine as the supervisor's model registry tells them (`watch_models`, at every change), a link
to every running engine, and the registry's ops. New work for a model goes straight to its
engine while it serves; otherwise `ensure_loaded` waits until it does (loading it on demand).
Also the one place that combines the engines' figures into the `inference` map."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..protocol import internal
from ..protocol.errors import ProtocolError, Unavailable
from .actor import ActorLink, Body
from .config import Config
from .logs import EventLog

log = EventLog("models")

AVAILABLE, LOADING, LOADED, UNLOADING = "available", "loading", "loaded", "unloading"
# A load can take minutes (a large model from a slow disk); the supervisor gives up at 600 s.
LOAD_TIMEOUT_S = 630.0
UNLOAD_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 5.0
UNLOADED_MESSAGE = "the model was unloaded"


@dataclass
class ModelView:
    state: str
    engine: str | None  # where new work goes
    engines: list[str] = field(default_factory=list)  # every engine running (a swap has two)


class ModelDirectory:
    """The models as the registry last said, and links to their engines."""

    def __init__(self, config: Config, watcher: str) -> None:
        self.config = config
        self.watcher = watcher
        self.registry = ActorLink(internal.MODELS, config)
        self.default = config.model_name
        # Known models, the default first; updated in place (others may hold the list).
        self.names: list[str] = [self.default]
        self.views: dict[str, ModelView] = {}
        self.links: dict[str, tuple[ActorLink, trio.CancelScope]] = {}  # by engine id
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.registry.run)
            self.registry.stream("watch_models", self.on_table, watcher=self.watcher)

    def on_table(self, body: Body) -> None:
        """The registry's table: states, and which engines run (a link to each)."""
        if body.get("op") != "models":
            log.error("models not watched", reason=body.get("message"))
            return
        self.default = str(body.get("default", self.default))
        self.views = {
            name: ModelView(view["state"], view.get("engine"), list(view.get("engines", [])))
            for name, view in body.get("models", {}).items()
        }
        self.names[:] = [self.default, *sorted(n for n in self.views if n != self.default)]
        running = {engine for view in self.views.values() for engine in view.engines}
        for engine_id in running - set(self.links):
            self.open_link(engine_id)
        for engine_id in set(self.links) - running:
            self.close_link(engine_id)

    def open_link(self, engine_id: str) -> None:
        assert self.nursery is not None
        link = ActorLink(engine_id, self.config, watch=True)
        scope = trio.CancelScope()
        self.links[engine_id] = (link, scope)

        async def run() -> None:
            try:
                with scope:
                    await link.run()
            finally:
                link.socket.close()
                if link.monitor is not None:
                    link.monitor.close()

        self.nursery.start_soon(run)

    def close_link(self, engine_id: str) -> None:
        """The engine is gone for good (its model unloaded): what still waits on it ends."""
        link, scope = self.links.pop(engine_id)
        link.fail_all(UNLOADED_MESSAGE, unloaded=True)
        scope.cancel()

    def known(self, model: str) -> bool:
        return model in self.views

    def link(self, model: str) -> ActorLink | None:
        """The link for new work on `model` while it serves; None otherwise."""
        view = self.views.get(model)
        if view is None or view.state != LOADED or view.engine is None:
            return None
        found = self.links.get(view.engine)
        return found[0] if found is not None else None

    def running_link(self, model: str) -> ActorLink | None:
        """The link to the model's engine in any state but unloaded (one restarting answers
        once it is back)."""
        view = self.views.get(model)
        if view is None or view.engine is None:
            return None
        found = self.links.get(view.engine)
        return found[0] if found is not None else None

    async def engine(self, model: str) -> ActorLink:
        """The model's engine once it serves, loaded on demand: `not_found` for an unknown
        model, `unavailable` when it cannot be loaded now."""
        link = self.link(model)
        if link is not None:
            return link
        reply = await self.registry.request("ensure_loaded", timeout=LOAD_TIMEOUT_S, model=model)
        found = self.links.get(str(reply.get("engine")))
        if found is None:  # unloaded again at once
            raise Unavailable(f"model {model} was unloaded while it loaded; try again")
        return found[0]

    async def describe(self) -> Body:
        """`list_models` as the registry answers it (sessions: what its engines hold)."""
        return await self.registry.request("list_models", timeout=10.0)

    async def model_list(self, sessions: ActorLink) -> Body:
        """`list_models`' answer (PROTOCOL.md), for both fronts: `default` and `models`, each
        with its state; `sessions` counts the sessions kept for it, loaded or not."""
        described = await self.describe()
        counts = (await sessions.request("counts"))["counts"]
        models = [
            {
                "model": m["model"],
                "state": m["state"],
                "parallel": m["parallel"],
                "ctx_size": m["ctx_size"],
                "sessions": int(counts.get(m["model"], 0)),
                "memory_mb": m["memory_mb"],
            }
            for m in described["models"]
        ]
        return {"default": described["default"], "models": models}

    async def load(self, **fields: Any) -> Body:
        return await self.registry.request("load_model", timeout=LOAD_TIMEOUT_S, **fields)

    async def unload(self, model: str) -> Body:
        return await self.registry.request("unload_model", timeout=UNLOAD_TIMEOUT_S, model=model)

    async def inference(self) -> dict[str, Body]:
        """Each serving engine's figures, by model (asked together)."""
        figures: dict[str, Body] = {}

        async def ask(model: str, link: ActorLink) -> None:
            try:
                figures[model] = (await link.request("stats", timeout=STATS_TIMEOUT_S))["inference"]
            except ProtocolError as exc:
                log.debug("no figures", model=model, reason=exc.message)

        async with trio.open_nursery() as nursery:
            for model in self.views:
                link = self.link(model)
                if link is not None:
                    nursery.start_soon(ask, model, link)
        return figures


# The engines' figures that add up across models.
SUMMED = (
    "active_generations",
    "queued",
    "total_sessions",
    "total_tokens_generated",
    "total_requests",
    "tokens_per_second",
    "kv_cells_used",
    "kv_cells_total",
    "decode_steps",
    "padded_steps",
)
# Per model in the `models` map.
PER_MODEL = (
    "active_generations",
    "queued",
    "tokens_per_second",
    "total_tokens_generated",
    "total_requests",
    "kv_cells_used",
    "kv_cells_total",
)


def combine_inference(
    figures: dict[str, Body], described: Iterable[Body], default: str
) -> dict[str, Any]:
    """The `inference` map of the metrics stream and the `stats` op from each engine's own:
    the counts summed over models, `last_tps` and `last_ttft_ms` of the default model (else of
    the first that has them), and `models`: per known model its state, sessions, active
    generations, queued infers, tokens/s, tokens generated and memory."""
    inference: dict[str, Any] = {key: 0 for key in SUMMED}
    inference["tokens_per_second"] = 0.0
    for values in figures.values():
        for key in SUMMED:
            inference[key] += values.get(key, 0)
    order = sorted(figures, key=lambda name: name != default)
    last = next((figures[n] for n in order if figures[n].get("last_ttft_ms")), None)
    inference["last_tps"] = float(last.get("last_tps", 0.0)) if last else 0.0
    inference["last_ttft_ms"] = float(last.get("last_ttft_ms", 0.0)) if last else 0.0
    models: dict[str, Any] = {}
    for model in described:
        name = str(model["model"])
        own = figures.get(name, {})
        entry = {key: own.get(key, 0) for key in PER_MODEL}
        entry["state"] = model.get("state")
        entry["sessions"] = own.get("total_sessions", model.get("sessions", 0))
        entry["memory_mb"] = model.get("memory_mb")
        entry["parallel"] = model.get("parallel")
        entry["ctx_size"] = model.get("ctx_size")
        models[name] = entry
    inference["models"] = models
    return inference

"""Unit tests of several models' pure parts: the supervisor's model registry (its engines stand
in as fake processes, named as such), the memory plan, the combined figures, the serve flags,
the wire checks of the model ops, roles, and the dashboard's models panel."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from inferencecenter.actors.config import Config, ConfigError, add_serve_arguments, config_from_args
from inferencecenter.actors.engine.fit import MIB, ModelLayout
from inferencecenter.actors.models import combine_inference
from inferencecenter.clients import core
from inferencecenter.clients.top import DashboardState, render
from inferencecenter.daemon.memory import MemoryPlan, Settings, plan_memory, shortfall
from inferencecenter.daemon.models import (
    AVAILABLE,
    LOADED,
    LOADING,
    UNLOADING,
    Engine,
    ModelRegistry,
)
from inferencecenter.protocol import clientsfile, errors
from inferencecenter.protocol.messages import parse_request

# ---- the registry, with fake engine processes ------------------------------------------------


class FakeProcess:
    """Stands in for an engine's Popen: it runs until told to exit."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.pid = 0
        self.terminated = False

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class FakeEngine(Engine):
    """An engine whose process is a FakeProcess (a restart makes a new one)."""

    def spawn(self, config_path: Path) -> None:
        self.process = FakeProcess()  # type: ignore[assignment]
        self.ready = False
        self.started = time.monotonic()


class FakeMemory:
    """Stands in for MemoryCheck: fits, or not, as told."""

    def __init__(self) -> None:
        self.short: str | None = None

    def check(self, name: str, settings: Settings, reserved: list[MemoryPlan]) -> Any:
        return self.short, MemoryPlan(None, 100.0, 0.0)


class Registry:
    """A ModelRegistry with fake engines, and what it sent (replies, watches, monitor)."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self.notified: list[dict[str, Any]] = []
        settings = {"parallel": 2, "ctx_size": 256, "runtime_dir": str(tmp), **config}
        path = str(tmp / "m.gguf")
        models = (("a", path), ("b", path), ("c", path))
        self.registry = ModelRegistry(
            Config(model=path, models=models, **settings),
            lambda peer, body: self.sent.append((peer, body)),
            self.notified.append,
        )
        self.memory = FakeMemory()
        self.registry.memory = self.memory  # type: ignore[assignment]
        self.registry.spawn_engine = self.spawn  # type: ignore[method-assign]
        # The engine's own answer is its heartbeat's pending count here.
        self.registry.engine_busy = lambda engine: engine.health.pending > 0  # type: ignore[method-assign]
        self.refs = 0

    def spawn(self, entry: Any, settings: Settings, plan: MemoryPlan | None) -> Engine:
        self.registry.loads += 1
        engine = FakeEngine(
            f"engine.{self.registry.loads}",
            config_path=Path("unused"),
            model=entry.name,
            settings=settings,
        )
        engine.spawn(Path("unused"))
        return engine

    def ask(self, op: str, **fields: Any) -> int:
        self.refs += 1
        self.registry.handle(b"peer", {"op": op, "ref": self.refs, **fields})
        return self.refs

    def replies(self, ref: int) -> list[dict[str, Any]]:
        return [body for _, body in self.sent if body.get("ref") == ref and body["op"] != "models"]

    def engine(self, model: str) -> Engine:
        engine = self.registry.models[model].engine
        assert engine is not None
        return engine

    def ready(self, engine: Engine) -> None:
        self.registry.on_report({"op": "ready", "actor": engine.name})

    def beat(self, engine: Engine, pending: int = 0, steps: int = 0) -> None:
        body = {"op": "alive", "actor": engine.name, "steps": steps, "pending": pending}
        self.registry.on_report(body)

    def exit(self, engine: Engine, code: int = 0) -> None:
        assert isinstance(engine.process, FakeProcess)
        engine.process.returncode = code
        self.registry.poll(time.monotonic())

    def events(self) -> list[tuple[str, str]]:
        return [(n["kind"], n["model"]) for n in self.notified if n["op"] == "event"]

    def load(self, model: str) -> Engine:
        ref = self.ask("ensure_loaded", model=model)
        engine = self.engine(model)
        self.ready(engine)
        assert self.replies(ref)[0]["op"] == "reply"
        return engine


def test_a_model_loads_on_demand_and_watchers_hear_before_the_reply(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    watch = r.ask("watch_models", watcher="gateway")
    ref = r.ask("ensure_loaded", model="b")
    assert r.registry.models["b"].state == LOADING and r.replies(ref) == []
    engine = r.engine("b")
    r.ready(engine)
    ops = [body["op"] for _, body in r.sent if body["ref"] in (watch, ref)]
    assert ops[-2:] == ["models", "reply"]  # the table naming the engine comes first
    table = [body for _, body in r.sent if body["op"] == "models"][-1]
    assert table["models"]["b"] == {
        "state": LOADED,
        "engine": engine.name,
        "engines": [engine.name],
    }
    assert r.replies(ref)[0]["engine"] == engine.name
    assert r.events() == [("loading", "b"), ("loaded", "b")]


def test_unknown_model_is_not_found_and_a_failed_load_unavailable(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    assert r.replies(r.ask("ensure_loaded", model="zz"))[0]["code"] == "not_found"
    ref = r.ask("ensure_loaded", model="a")
    engine = r.engine("a")
    r.registry.on_report({"op": "fatal", "actor": engine.name, "message": "llama.cpp said no"})
    r.exit(engine, 1)
    reply = r.replies(ref)[0]
    assert reply["code"] == "unavailable" and "llama.cpp said no" in reply["message"]
    assert r.registry.models["a"].state == AVAILABLE and ("failed", "a") in r.events()


def test_at_the_limit_the_least_recently_used_idle_model_makes_room(tmp_path: Path) -> None:
    r = Registry(tmp_path, max_loaded_models=2)
    a, b = r.load("a"), r.load("b")
    r.registry.models["a"].last_used -= 10  # a is the least recently used
    ref = r.ask("ensure_loaded", model="c")
    assert r.registry.models["a"].state == UNLOADING and a.stopping and b.process is not None
    assert r.registry.models["c"].engine is None  # waits for the room
    r.exit(a)
    assert r.registry.models["a"].state == AVAILABLE
    r.ready(r.engine("c"))
    assert r.replies(ref)[0]["model"] == "c"
    assert ("unloaded", "a") in r.events()


def test_at_the_limit_with_every_model_busy_the_load_is_unavailable(tmp_path: Path) -> None:
    r = Registry(tmp_path, max_loaded_models=1)
    a = r.load("a")
    r.beat(a, pending=1)
    reply = r.replies(r.ask("ensure_loaded", model="b"))[0]
    assert reply["code"] == "unavailable" and "--max-loaded-models 1" in reply["message"]
    assert r.registry.models["a"].state == LOADED


def test_a_load_that_does_not_fit_in_memory_says_why(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    r.memory.short = "model a needs about 900 MiB of host memory; 10 MiB are free"
    reply = r.replies(r.ask("ensure_loaded", model="a"))[0]
    assert reply["code"] == "unavailable" and "900 MiB" in reply["message"]


def test_keep_alive_unloads_an_idle_model(tmp_path: Path) -> None:
    r = Registry(tmp_path, keep_alive=5.0)
    a = r.load("a")
    r.registry.tick(time.monotonic())
    assert not a.stopping
    r.registry.models["a"].last_used -= 6
    r.registry.tick(time.monotonic())
    assert a.stopping and r.registry.models["a"].unload_reason == "keep_alive"
    r.exit(a)
    assert r.registry.models["a"].state == AVAILABLE


def test_a_crashed_engine_restarts_and_a_crash_loop_unloads_only_its_model(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    a, b = r.load("a"), r.load("b")
    r.exit(a, -9)
    entry = r.registry.models["a"]
    assert entry.state == LOADING and a.restart_at is not None
    a.restart_at = 0.0
    r.registry.poll(time.monotonic())
    r.ready(a)
    assert entry.state == LOADED
    for _ in range(5):
        r.exit(a, -9)
        a.restart_at = 0.0
        r.registry.poll(time.monotonic())
        r.ready(a)
    assert entry.state == AVAILABLE and entry.engine is None
    assert r.registry.models["b"].state == LOADED and b.process is not None


def test_unload_answers_once_the_engine_is_gone_and_an_infer_reloads(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    a = r.load("a")
    ref = r.ask("unload_model", model="a")
    assert r.replies(ref) == [] and isinstance(a.process, FakeProcess) and a.process.terminated
    again = r.ask("ensure_loaded", model="a")  # asked for while it unloads
    r.exit(a)
    assert r.replies(ref)[0] == {"op": "reply", "ref": ref, "model": "a"}
    assert r.registry.models["a"].state == LOADING
    r.ready(r.engine("a"))
    assert r.replies(again)[0]["model"] == "a"


def test_hot_swap_drains_the_old_engine_then_switches(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    old = r.load("a")
    reloaded: list[str] = []
    r.registry.reload = lambda engine: reloaded.append(engine.name)  # type: ignore[method-assign]
    new_file = tmp_path / "new.gguf"
    new_file.write_bytes(b"GGUF")
    ref = r.ask("load_model", model="a", path=str(new_file))
    entry = r.registry.models["a"]
    new = entry.incoming
    assert new is not None and entry.state == LOADED  # the old one serves meanwhile
    r.beat(old, pending=1)
    r.ready(new)
    assert entry.state == LOADING and entry.held_at is not None  # new work waits
    r.registry.tick(time.monotonic())
    assert not old.stopping  # no fresh heartbeat yet
    entry.held_at -= 1.0
    r.beat(old, pending=1)
    r.registry.tick(time.monotonic())
    assert not old.stopping  # still generating
    r.beat(old, pending=0)
    r.registry.tick(time.monotonic())
    assert old.stopping
    r.exit(old)
    assert reloaded == [new.name] and entry.engine is new and entry.state == LOADED
    reply = r.replies(ref)[0]
    assert reply["model"] == "a" and reply["engine"] == new.name
    assert entry.settings.path == str(new_file)


def test_load_model_checks_the_file(tmp_path: Path) -> None:
    r = Registry(tmp_path)
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"nope")
    reply = r.replies(r.ask("load_model", model="x", path=str(bogus)))[0]
    assert reply["code"] == "bad_request" and "not a GGUF" in reply["message"]
    assert r.replies(r.ask("load_model", model="x"))[0]["code"] == "not_found"
    assert "x" not in r.registry.models


def test_models_dir_makes_every_gguf_available(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "small.gguf").write_bytes(b"GGUF")
    r = Registry(tmp_path, models_dir=str(tmp_path / "models"))
    assert r.registry.models["small"].state == AVAILABLE
    (tmp_path / "models" / "later.gguf").write_bytes(b"GGUF")
    ref = r.ask("list_models")
    names = [m["model"] for m in r.replies(ref)[0]["models"]]
    assert names == ["a", "b", "c", "small", "later"] and r.replies(ref)[0]["default"] == "a"


# ---- memory -----------------------------------------------------------------------------------


def layout() -> ModelLayout:
    """A made-up model: 4 blocks of 100 MiB, 50 MiB embeddings, 1 KiB of KV per token."""
    return ModelLayout(
        path="m.gguf",
        arch="llama",
        n_layers=4,
        block_bytes=(100 * MIB,) * 4,
        input_bytes=50 * MIB,
        output_gpu_bytes=50 * MIB,
        output_cpu_bytes=0,
        kv_bytes_per_cell=(256,) * 4,
        swa_layers=(False,) * 4,
        sliding_window=0,
        n_embd=1024,
        n_ff=4096,
        n_vocab=32000,
    )


def test_without_a_gpu_everything_is_host_memory() -> None:
    plan = plan_memory(layout(), Settings("m.gguf", 4, 1024, -1), 512, 500, None)
    compute = 4 * 512 * (32000 + 1024 + 4096) / MIB
    kv = 4 * 4 * 1024 * 256 / MIB
    assert plan.gpu_layers is None and plan.gpu_mb == 0.0
    assert plan.host_mb == pytest.approx(450 + kv + compute)


def test_with_a_gpu_the_layers_that_fit_leave_the_host() -> None:
    roomy = plan_memory(layout(), Settings("m.gguf", 4, 1024, -1), 512, 500, 8192.0)
    assert roomy.gpu_layers == 5 and roomy.host_mb == pytest.approx(50.0)
    assert roomy.gpu_mb > 450
    cpu_only = plan_memory(layout(), Settings("m.gguf", 4, 1024, 0), 512, 500, 8192.0)
    assert cpu_only.gpu_layers == 0 and cpu_only.gpu_mb == 0.0


def test_a_shortfall_names_the_figures() -> None:
    plan = MemoryPlan(None, 900.0, 0.0)
    assert shortfall("big", plan, 1000.0) is None
    message = shortfall("big", plan, 300.0)
    assert message is not None and "900 MiB" in message and "300 MiB are free" in message


# ---- figures ----------------------------------------------------------------------------------


def test_figures_are_summed_and_kept_per_model() -> None:
    figures = {
        "a": {"active_generations": 1, "total_sessions": 3, "tokens_per_second": 10.0,
              "total_tokens_generated": 100, "total_requests": 4, "last_tps": 50.0,
              "last_ttft_ms": 20.0},
        "b": {"active_generations": 2, "total_sessions": 1, "tokens_per_second": 5.0,
              "total_tokens_generated": 7, "total_requests": 2, "last_tps": 9.0,
              "last_ttft_ms": 30.0},
    }  # fmt: skip
    described = [
        {"model": "a", "state": "loaded", "sessions": 3, "memory_mb": 500.0},
        {"model": "b", "state": "loaded", "sessions": 1, "memory_mb": 400.0},
        {"model": "c", "state": "available", "sessions": 2, "memory_mb": None},
    ]
    inference = combine_inference(figures, described, "b")
    assert inference["active_generations"] == 3 and inference["total_sessions"] == 4
    assert inference["tokens_per_second"] == 15.0 and inference["total_tokens_generated"] == 107
    assert inference["total_requests"] == 6 and inference["models"]["a"]["total_requests"] == 4
    assert inference["last_tps"] == 9.0  # the default model's
    models = inference["models"]
    assert models["a"]["state"] == "loaded" and models["a"]["memory_mb"] == 500.0
    assert models["c"] == {
        "active_generations": 0,
        "queued": 0,
        "tokens_per_second": 0,
        "total_tokens_generated": 0,
        "total_requests": 0,
        "kv_cells_used": 0,
        "kv_cells_total": 0,
        "state": "available",
        "sessions": 2,
        "memory_mb": None,
        "parallel": None,
        "ctx_size": None,
    }


def test_the_dashboard_shows_the_models() -> None:
    state = DashboardState("tcp://x:5556", started=0.0)
    models = {
        "small": {"state": "loaded", "sessions": 2, "active_generations": 1, "memory_mb": 900.0},
        "big": {"state": "available", "sessions": 0, "memory_mb": None},
    }
    state.ingest("metrics", {"timestamp": 1.0, "inference": {"models": models}}, received=1.0)
    console = Console(width=100, record=True, no_color=True)
    console.print(render(state, now=1.0))
    text = console.export_text()
    assert "models" in text and "small" in text and "loaded" in text and "900 MiB" in text
    assert "big" in text and "available" in text


# ---- serve flags ------------------------------------------------------------------------------


def serve_args(tmp: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    clients = tmp / "clients.json"
    if not clients.exists():
        clientsfile.save(clients, [clientsfile.ClientEntry("x", "x" * 40)])
    return parser.parse_args(["--clients", str(clients), *argv])


def gguf(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(b"GGUF" + b"\0" * 16)
    return str(path)


def test_model_flags_name_the_models_the_first_the_default(tmp_path: Path) -> None:
    one, two = gguf(tmp_path, "one.gguf"), gguf(tmp_path, "two-q4.gguf")
    config, _ = config_from_args(serve_args(tmp_path, "--model", one, "--model", f"fast={two}"))
    assert config.models == (("one", one), ("fast", two)) and config.model == one
    assert config.model_name == "one"
    back = tmp_path / "config.json"
    back.write_text(config.to_json())
    assert Config.from_file(str(back)) == config


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "a={one}", "--model", "a={one}"], "given twice"),
        (["--model", "a={tmp}/nope.gguf"], "does not exist"),
        (["--model", "{tmp}/bad name.gguf"], "NAME=PATH"),
        (["--model", "{one}", "--max-loaded-models", "-1"], "--max-loaded-models"),
        (["--model", "{one}", "--keep-alive", "-2"], "--keep-alive"),
        (["--model", "{one}", "--models-dir", "{tmp}/none"], "not a directory"),
    ],
)
def test_bad_model_flags_are_refused(tmp_path: Path, argv: list[str], fragment: str) -> None:
    one = gguf(tmp_path, "one.gguf")
    gguf(tmp_path, "bad name.gguf")
    filled = [a.format(one=one, tmp=tmp_path) for a in argv]
    with pytest.raises(ConfigError, match=fragment):
        config_from_args(serve_args(tmp_path, *filled))


# ---- the wire ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"op": "load_model"}, "missing field 'model'"),
        ({"op": "load_model", "model": "a b"}, "must match"),
        ({"op": "load_model", "model": "a", "parallel": 0}, "'parallel' must be in"),
        ({"op": "load_model", "model": "a", "ctx_size": 1.5}, "'ctx_size' must be an int"),
        ({"op": "load_model", "model": "a", "gpu_layers": -2}, "'gpu_layers' must be in"),
        ({"op": "load_model", "model": "a", "path": ""}, "'path' must not be empty"),
        ({"op": "unload_model", "model": 3}, "must be a str"),
        ({"op": "list_sessions", "all": 1}, "'all' must be a bool"),
    ],
)
def test_model_ops_are_checked(body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(errors.BadRequest, match=fragment):
        parse_request(body)


def test_the_client_checks_model_ops_before_sending() -> None:
    with pytest.raises(errors.BadRequest):
        core.load_model_call("bad name")
    call = core.load_model_call("m", "/x.gguf", parallel=2)
    assert call.body == {"op": "load_model", "model": "m", "path": "/x.gguf", "parallel": 2}
    assert core.list_sessions_call(True).body == {"op": "list_sessions", "all": True}
    listed = core.list_models_call().result(
        {"op": "model_list", "id": 1, "default": "m", "models": [{"model": "m"}, "junk"]}
    )
    assert listed == {"default": "m", "models": [{"model": "m"}]}
    with pytest.raises(errors.Unavailable):
        core.load_model_call("m").result({"op": "error", "code": "unavailable", "message": "no"})


def test_roles_in_the_clients_file(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    clientsfile.add_client(path, "root", role="admin")
    clientsfile.add_client(path, "joe")
    entries = {e.client_id: e for e in clientsfile.load(path)}
    assert entries["root"].role == "admin" and entries["joe"].role == "user"
    raw = json.loads(path.read_text())
    raw["clients"][0]["role"] = "god"
    path.write_text(json.dumps(raw))
    with pytest.raises(clientsfile.ClientsFileError, match="role must be one of"):
        clientsfile.load(path)

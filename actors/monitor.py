"""The monitor actor: `metrics` once a second (GPUs through NVML, host, inference: every model's
engine's figures combined, and per model), `event.*` topics (sessions, models, alerts with
hysteresis), and an optional Prometheus exporter."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psutil
import trio
import zmq
from prometheus_client import generate_latest

from ..protocol import internal, wire
from ..protocol.zmqtrio import TrioSocket
from .actor import ActorServer, Body, Caller, report_to_supervisor
from .config import Config
from .logs import EventLog
from .metrics_access import open_metrics_socket
from .models import SUMMED, combine_inference
from .prometheus import PrometheusExporter

log = EventLog("monitor")

METRICS_TOPIC = b"metrics"
SESSION_TOPIC = b"event.session"
MODEL_TOPIC = b"event.model"
ALERT_TOPIC = b"event.alert"
PERIOD_S = 1.0
# The largest message a subscriber may send: a subscription is a topic of a few bytes (and a
# CURVE handshake a few hundred); a bigger one drops the peer before anything is kept (without
# the limit a 4 MB subscription stays in the socket's memory as long as its peer does).
SUB_MAX_MESSAGE_BYTES = 1024
# An alert that cleared is raised again only after this long (hysteresis against flapping).
ALERT_REPEAT_S = 60.0
TEMP_HYSTERESIS_C = 5.0

EMPTY_INFERENCE: dict[str, Any] = {
    "active_generations": 0,
    "queued": 0,
    "total_sessions": 0,
    "last_tps": 0.0,
    "last_ttft_ms": 0.0,
    "total_tokens_generated": 0,
    "total_requests": 0,
    "tokens_per_second": 0.0,
    "models": {},
}
# Totals an engine counts from its start: kept for its model once the engine is gone.
RUNNING_TOTALS = ("total_tokens_generated", "total_requests")

# NVML's throttle reason bits, by the names the metrics use.
THROTTLE_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
}
BENIGN_REASONS = 0x1 | 0x2 | 0x10  # idle, application clocks, sync boost: not throttling


class GpuProbe:
    """NVML readings of every NVIDIA GPU; an empty list on a machine without GPU or driver."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            log.info("NVIDIA GPUs found", count=len(self.handles))
        except Exception as exc:  # no driver, no library, no device: all mean "no GPU"
            log.info("no NVIDIA GPU, gpu metrics are null", reason=type(exc).__name__)

    def read(self) -> list[dict[str, Any]]:
        return [self._read_one(index, handle) for index, handle in enumerate(self.handles)]

    def _read_one(self, index: int, handle: Any) -> dict[str, Any]:
        nvml = self.nvml

        def field(read: Any) -> Any:
            try:
                return read()
            except Exception:  # a field this GPU does not report is null
                return None

        memory = field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        name = field(lambda: nvml.nvmlDeviceGetName(handle))
        power_mw = field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        reasons = field(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        mb = 2**20
        return {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else name,
            "temp": field(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "vram_total_mb": memory.total / mb if memory else None,
            "vram_used_mb": memory.used / mb if memory else None,
            "vram_free_mb": memory.free / mb if memory else None,
            "power_watts": power_mw / 1000 if power_mw is not None else None,
            "fan_percent": field(lambda: nvml.nvmlDeviceGetFanSpeed(handle)),
            "utilization_percent": field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "throttle_reasons": (
                {key: bool(reasons & bit) for key, bit in THROTTLE_REASONS.items()}
                if reasons is not None
                else None
            ),
            "throttling": bool(reasons & ~BENIGN_REASONS) if reasons is not None else None,
        }


def host_metrics() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(None),
        "ram_total_mb": memory.total / 2**20,
        "ram_used_mb": (memory.total - memory.available) / 2**20,
    }


def daemon_rss_mb() -> float:
    """The supervisor and all its actors together."""
    try:
        supervisor = psutil.Process(os.getppid())
        processes = [supervisor, *supervisor.children()]
        return float(sum(p.memory_info().rss for p in processes)) / 2**20
    except psutil.Error:
        return 0.0


@dataclass
class Alert:
    """One condition with hysteresis: raised when it starts, cleared when it ends, and not
    raised again within ALERT_REPEAT_S of the last time."""

    kind: str
    active: bool = False
    raised_at: float = -1e9

    def update(self, condition: bool, cleared: bool, now: float) -> str | None:
        if not self.active and condition and now - self.raised_at >= ALERT_REPEAT_S:
            self.active, self.raised_at = True, now
            return "raised"
        if self.active and cleared:
            self.active = False
            return "cleared"
        return None


class MonitorActor:
    def __init__(self, config: Config, pub: TrioSocket) -> None:
        self.config = config
        self.pub = pub
        # Each engine's model and latest figures (a hot swap runs two engines of one model).
        self.engines: dict[str, tuple[str, Body]] = {}
        # Totals counted by engines that are gone (unloaded, restarted), so that they only grow.
        self.retired: dict[str, Counter[str]] = {}
        self.models: list[Body] = []  # the model registry's view (state, memory, settings)
        self.default = config.model_name
        # Kept even without --prometheus-port: the HTTP actor's /metrics shows the same series.
        self.prometheus = PrometheusExporter()
        self.latest: Body | None = None  # the last metrics published
        self.alerts: dict[str, Alert] = {}
        self.auth_failures = 0  # failed auth attempts, with those refused unchecked (backoff)
        self.auth_refused = 0
        self.handlers = {
            "inference": self.update_inference,
            "event": self.on_event,
            "request": self.on_request,
            "auth_failed": self.on_auth_failed,
            "snapshot": self.snapshot,
            "prometheus": self.prometheus_text,
            "models": self.update_models,
        }

    def publish(self, topic: bytes, body: Body) -> None:
        self.pub.send([topic, wire.pack(body)])

    def update_inference(self, body: Body, caller: Caller) -> None:
        """One engine's figures (once a second)."""
        model = str(body.get("model") or self.default)
        engine = str(body.get("engine") or model)
        figures = dict(body.get("inference", {}))
        old = self.engines.get(engine)
        tokens = int(figures.get("total_tokens_generated", 0))
        if old is not None and tokens < int(old[1].get("total_tokens_generated", 0)):
            self.retire(engine)  # restarted: it counts from 0 again
        self.engines[engine] = (model, figures)

    def retire(self, engine: str) -> None:
        """Keep an engine's running totals (tokens, requests) once it is gone (or restarted)."""
        model, figures = self.engines.pop(engine)
        retired = self.retired.setdefault(model, Counter())
        for key in RUNNING_TOTALS:
            retired[key] += int(figures.get(key, 0))

    def update_models(self, body: Body, caller: Caller) -> None:
        """The registry's models and running engines (once a second)."""
        self.models = list(body.get("models", []))
        self.default = str(body.get("default", self.default))
        running = body.get("engines")
        if isinstance(running, dict):
            for engine in list(self.engines):
                if engine not in running:
                    self.retire(engine)

    def per_model(self) -> dict[str, Body]:
        """The engines' figures by model (a hot swap's two engines added up)."""
        figures: dict[str, Body] = {}
        for model, values in self.engines.values():
            into = figures.setdefault(model, {})
            for key, value in values.items():
                into[key] = into.get(key, 0) + value if key in SUMMED else value
        return figures

    def inference(self) -> Body:
        """The engines' figures combined, with the running totals of engines that are gone."""
        inference = combine_inference(self.per_model(), self.models, self.default)
        for name, retired in self.retired.items():
            for key in RUNNING_TOTALS:
                inference[key] += retired[key]
                if name in inference["models"]:
                    inference["models"][name][key] += retired[key]
        return {**EMPTY_INFERENCE, **inference}

    def on_event(self, body: Body, caller: Caller) -> None:
        """Events: sessions' lives, models' (loading, loaded, unloaded, failed), a full queue."""
        kind = str(body.get("kind"))
        if body.get("topic") == "session":
            # No client_id: anyone who can reach the port may subscribe, and it is clear text.
            event = {"kind": kind, "timestamp": time.time()}
            event.update({k: body.get(k) for k in ("session_id", "model")})
            self.publish(SESSION_TOPIC, event)
        elif body.get("topic") == "model":
            fields = {k: v for k, v in body.items() if k not in ("op", "ref", "topic")}
            self.publish(MODEL_TOPIC, {**fields, "timestamp": time.time()})
        elif kind == "overloaded":
            self.alert("overloaded", True, False, "the queue is full: infers get `overloaded`")

    def on_request(self, body: Body, caller: Caller) -> None:
        if self.prometheus is not None:
            self.prometheus.observe_request(body)

    def on_auth_failed(self, body: Body, caller: Caller) -> None:
        self.auth_failures += 1
        self.auth_refused += bool(body.get("refused"))
        if self.prometheus is not None:
            self.prometheus.auth_failures.inc()

    def snapshot(self, body: Body, caller: Caller) -> None:
        """The last metrics published (for the HTTP actor's WebSocket subscribers)."""
        caller.reply(metrics=self.latest)

    def prometheus_text(self, body: Body, caller: Caller) -> None:
        """The Prometheus exposition of the exporter's series (the HTTP actor's /metrics)."""
        assert self.prometheus is not None
        caller.reply(text=generate_latest(self.prometheus.registry).decode())

    def alert(self, kind: str, condition: bool, cleared: bool, message: str, **fields: Any) -> None:
        state = self.alerts.setdefault(kind, Alert(kind))
        change = state.update(condition, cleared, time.monotonic())
        if change is None:
            return
        level = "warning" if change == "raised" else "info"
        text = message if change == "raised" else f"cleared: {message}"
        body = {"kind": kind, "state": change, "level": level, "message": text, **fields}
        self.publish(ALERT_TOPIC, {**body, "timestamp": time.time()})
        log.warning("alert", kind=kind, state=change, message=text)

    def check_gpu_alerts(self, gpus: list[dict[str, Any]]) -> None:
        limit = self.config.alert_temp_c
        margin = self.config.vram_margin_mb
        for gpu in gpus:
            index, temp, free = gpu["index"], gpu["temp"], gpu["vram_free_mb"]
            if temp is not None:
                self.alert(
                    f"gpu{index}.temperature",
                    temp >= limit,
                    temp < limit - TEMP_HYSTERESIS_C,
                    f"GPU {index} at {temp} °C (limit {limit} °C)",
                    gpu=index,
                    temp=temp,
                )
            if free is not None:
                self.alert(
                    f"gpu{index}.vram",
                    free < margin,
                    free >= margin * 1.2,
                    f"GPU {index} has {free:.0f} MB free (margin {margin} MB)",
                    gpu=index,
                )
            if gpu["throttling"] is not None:
                self.alert(
                    f"gpu{index}.throttling",
                    gpu["throttling"],
                    not gpu["throttling"],
                    f"GPU {index} is throttling",
                    gpu=index,
                    reasons=gpu["throttle_reasons"],
                )

    async def run(self) -> None:
        probe = await trio.to_thread.run_sync(GpuProbe)
        psutil.cpu_percent(None)  # prime: the first reading is meaningless
        next_tick = trio.current_time()
        while True:
            next_tick += PERIOD_S
            await trio.sleep_until(next_tick)
            gpus = await trio.to_thread.run_sync(probe.read)
            inference = self.inference()
            body = {
                "timestamp": time.time(),
                "gpu": gpus[0] if gpus else None,
                "gpus": gpus,
                "host": host_metrics(),
                "daemon": {
                    "rss_mb": daemon_rss_mb(),
                    "auth_failures": self.auth_failures,
                    "auth_refused": self.auth_refused,
                },
                "inference": inference,
            }
            self.publish(METRICS_TOPIC, body)
            self.latest = body
            self.check_gpu_alerts(gpus)
            if inference.get("queued", 0) == 0:
                self.alert("overloaded", False, True, "the queue is full: infers get `overloaded`")
            if self.prometheus is not None:
                self.prometheus.update_gauges(body)


async def main(config: Config, stop: trio.Event) -> None:
    sock, zap = open_metrics_socket(config)  # under --curve, only CURVE peers subscribe
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100)  # a slow subscriber loses messages, never slows us
    sock.setsockopt(zmq.MAXMSGSIZE, SUB_MAX_MESSAGE_BYTES)
    sock.bind(f"tcp://{config.bind}:{config.metrics_port}")
    pub = TrioSocket(sock)
    actor = MonitorActor(config, pub)
    assert set(actor.handlers) == set(internal.MONITOR_OPS)
    if config.prometheus_port:
        actor.prometheus.serve(config.bind, config.prometheus_port)
        log.info(
            "prometheus exporter", endpoint=f"http://{config.bind}:{config.prometheus_port}/metrics"
        )
    server = ActorServer(internal.MONITOR, config, actor.handlers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        nursery.start_soon(pub.run)
        if zap is not None:
            nursery.start_soon(zap.run)
        nursery.start_soon(actor.run)
        report_to_supervisor(config, {"op": "ready", "actor": internal.MONITOR})
        await stop.wait()
        nursery.cancel_scope.cancel()

"""The monitor actor: publishes `metrics` once a second (GPU through NVML, host, inference)."""

from __future__ import annotations

import time
from typing import Any

import psutil
import trio
import zmq

from ..daemon.config import Config
from ..daemon.logs import EventLog
from ..protocol import internal, wire
from ..protocol.zmqtrio import TrioSocket
from .actor import ActorServer, Body, Caller, report_to_supervisor

log = EventLog("monitor")

METRICS_TOPIC = b"metrics"
PERIOD_S = 1.0

EMPTY_INFERENCE: dict[str, Any] = {
    "active_generations": 0,
    "queued": 0,
    "total_sessions": 0,
    "last_tps": 0.0,
    "last_ttft_ms": 0.0,
    "total_tokens_generated": 0,
    "tokens_per_second": 0.0,
}


class GpuProbe:
    """NVML readings of the first GPU; None on a machine without an NVIDIA GPU or driver."""

    def __init__(self) -> None:
        self.handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self.nvml = pynvml
        except Exception as exc:  # no driver, no library, no device: all mean "no GPU"
            log.info("no NVIDIA GPU, gpu metrics are null", reason=type(exc).__name__)
            self.handle = None

    def read(self) -> dict[str, Any] | None:
        if self.handle is None:
            return None
        nvml, handle = self.nvml, self.handle

        def field(read: Any) -> Any:
            try:
                return read()
            except Exception:  # a field this GPU does not report is null
                return None

        memory = field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        name = field(lambda: nvml.nvmlDeviceGetName(handle))
        power_mw = field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        reasons = field(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        idle = getattr(nvml, "nvmlClocksThrottleReasonGpuIdle", 1)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "temp": field(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "vram_total_mb": memory.total / 2**20 if memory else None,
            "vram_used_mb": memory.used / 2**20 if memory else None,
            "vram_free_mb": memory.free / 2**20 if memory else None,
            "power_watts": power_mw / 1000 if power_mw is not None else None,
            "fan_percent": field(lambda: nvml.nvmlDeviceGetFanSpeed(handle)),
            "utilization_percent": field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "throttling": bool(reasons & ~idle) if reasons is not None else None,
        }


def host_metrics() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(None),
        "ram_total_mb": memory.total / 2**20,
        "ram_used_mb": (memory.total - memory.available) / 2**20,
    }


class MonitorActor:
    def __init__(self) -> None:
        self.inference: dict[str, Any] = dict(EMPTY_INFERENCE)
        self.handlers = {"inference": self.update_inference}

    def update_inference(self, body: Body, caller: Caller) -> None:
        self.inference = {**EMPTY_INFERENCE, **body.get("inference", {})}

    async def publish(self, pub: TrioSocket) -> None:
        gpu = await trio.to_thread.run_sync(GpuProbe)
        psutil.cpu_percent(None)  # prime: the first reading is meaningless
        next_tick = trio.current_time()
        while True:
            next_tick += PERIOD_S
            await trio.sleep_until(next_tick)
            body = {
                "timestamp": time.time(),
                "gpu": await trio.to_thread.run_sync(gpu.read),
                "host": host_metrics(),
                "inference": self.inference,
            }
            pub.send([METRICS_TOPIC, wire.pack(body)])


async def main(config: Config, stop: trio.Event) -> None:
    actor = MonitorActor()
    assert set(actor.handlers) == set(internal.MONITOR_OPS)
    server = ActorServer(internal.MONITOR, config, actor.handlers)
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100)  # a slow subscriber loses messages, never slows us
    sock.bind(f"tcp://{config.bind}:{config.metrics_port}")
    pub = TrioSocket(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        nursery.start_soon(pub.run)
        nursery.start_soon(actor.publish, pub)
        report_to_supervisor(config, {"op": "ready", "actor": internal.MONITOR})
        await stop.wait()
        nursery.cancel_scope.cancel()

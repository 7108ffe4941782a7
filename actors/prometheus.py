"""The Prometheus exporter of the monitor actor: `inferencecenter_*` counters, gauges and
histograms, named and unit-suffixed by Prometheus conventions."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class PrometheusExporter:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "inferencecenter_"
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens evaluated", registry=r)
        self.cached_tokens = Counter(p + "cached_prompt_tokens", "Prompt tokens reused", registry=r)
        self.requests = Counter(
            p + "requests", "Finished infers by finish_reason", ["finish_reason"], registry=r
        )
        self.auth_failures = Counter(p + "auth_failures", "Failed auth attempts", registry=r)
        self.active = Gauge(p + "active_generations", "Generations holding a slot", registry=r)
        self.queued = Gauge(p + "queued_requests", "Infers waiting for a slot", registry=r)
        self.sessions = Gauge(p + "sessions", "Open sessions", registry=r)
        self.kv_used = Gauge(p + "kv_cells_used", "KV cells holding tokens", registry=r)
        self.kv_total = Gauge(p + "kv_cells", "KV cells in all slots", registry=r)
        self.tokens_per_second = Gauge(
            p + "tokens_per_second", "Tokens generated over the last second", registry=r
        )
        self.rss = Gauge(p + "resident_memory_bytes", "RSS of all daemon processes", registry=r)
        gpu = ["gpu"]
        self.gpu_temp = Gauge(p + "gpu_temperature_celsius", "GPU temperature", gpu, registry=r)
        self.gpu_used = Gauge(p + "gpu_memory_used_bytes", "GPU memory used", gpu, registry=r)
        self.gpu_total = Gauge(p + "gpu_memory_total_bytes", "GPU memory", gpu, registry=r)
        self.gpu_power = Gauge(p + "gpu_power_watts", "GPU power draw", gpu, registry=r)
        self.gpu_util = Gauge(p + "gpu_utilization_ratio", "GPU utilization (0-1)", gpu, registry=r)
        self.gpu_throttling = Gauge(p + "gpu_throttling", "1 while throttling", gpu, registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "From arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Decoding time per generated token",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            p + "queue_time_seconds", "Waiting for a slot", buckets=LATENCY_BUCKETS, registry=r
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "From arrival to end",
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def serve(self, address: str, port: int) -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def observe_request(self, record: dict[str, Any]) -> None:
        """One finished infer, as the engine reports it."""
        self.requests.labels(str(record.get("finish_reason", "unknown"))).inc()
        self.generated_tokens.inc(record.get("tokens", 0))
        self.prompt_tokens.inc(record.get("prompt_tokens", 0))
        self.cached_tokens.inc(record.get("cached_tokens", 0))
        if record.get("tokens", 0) > 0:
            self.ttft.observe(record.get("ttft_s", 0.0))
        if record.get("tpot_s"):
            self.tpot.observe(record["tpot_s"])
        self.queue_time.observe(record.get("queue_s", 0.0))
        self.duration.observe(record.get("duration_s", 0.0))

    def update_gauges(self, metrics: dict[str, Any]) -> None:
        inference = metrics.get("inference", {})
        self.active.set(inference.get("active_generations", 0))
        self.queued.set(inference.get("queued", 0))
        self.sessions.set(inference.get("total_sessions", 0))
        self.kv_used.set(inference.get("kv_cells_used", 0))
        self.kv_total.set(inference.get("kv_cells_total", 0))
        self.tokens_per_second.set(inference.get("tokens_per_second", 0.0))
        self.rss.set(metrics.get("daemon", {}).get("rss_mb", 0.0) * 2**20)
        for gpu in metrics.get("gpus", []):
            label = str(gpu["index"])
            for gauge, value in (
                (self.gpu_temp, gpu.get("temp")),
                (self.gpu_used, (gpu.get("vram_used_mb") or 0) * 2**20 or None),
                (self.gpu_total, (gpu.get("vram_total_mb") or 0) * 2**20 or None),
                (self.gpu_power, gpu.get("power_watts")),
                (
                    self.gpu_util,
                    gpu["utilization_percent"] / 100
                    if gpu.get("utilization_percent") is not None
                    else None,
                ),
                (
                    self.gpu_throttling,
                    None if gpu.get("throttling") is None else int(gpu["throttling"]),
                ),
            ):
                if value is not None:
                    gauge.labels(label).set(value)

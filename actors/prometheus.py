"""The Prometheus exporter of the monitor actor: `inferencecenter_*` counters, gauges and
histograms, named and unit-suffixed by Prometheus conventions. The inference series carry a
`model` label (sum them for the daemon's totals); the GPU ones a `gpu` label."""

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
        m = ["model"]
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated", m, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens evaluated", m, registry=r)
        self.cached_tokens = Counter(
            p + "cached_prompt_tokens", "Prompt tokens reused", m, registry=r
        )
        self.requests = Counter(
            p + "requests",
            "Finished infers by finish_reason",
            ["model", "finish_reason"],
            registry=r,
        )
        self.auth_failures = Counter(p + "auth_failures", "Failed auth attempts", registry=r)
        self.active = Gauge(p + "active_generations", "Generations holding a slot", m, registry=r)
        self.queued = Gauge(p + "queued_requests", "Infers waiting for a slot", m, registry=r)
        self.sessions = Gauge(p + "sessions", "Open sessions", m, registry=r)
        self.kv_used = Gauge(p + "kv_cells_used", "KV cells holding tokens", m, registry=r)
        self.kv_total = Gauge(p + "kv_cells", "KV cells in all slots", m, registry=r)
        self.tokens_per_second = Gauge(
            p + "tokens_per_second", "Tokens generated over the last second", m, registry=r
        )
        self.model_loaded = Gauge(p + "model_loaded", "1 while the model serves", m, registry=r)
        self.model_memory = Gauge(
            p + "model_memory_bytes", "Memory of the model's engine (host and GPU)", m, registry=r
        )
        self.labelled = (
            self.active,
            self.queued,
            self.sessions,
            self.kv_used,
            self.kv_total,
            self.tokens_per_second,
            self.model_loaded,
            self.model_memory,
        )
        self.models: set[str] = set()  # models with gauges now
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
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Decoding time per generated token",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            p + "queue_time_seconds", "Waiting for a slot", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "From arrival to end",
            m,
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def serve(self, address: str, port: int) -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def observe_request(self, record: dict[str, Any]) -> None:
        """One finished infer, as the engine reports it."""
        model = str(record.get("model", ""))
        self.requests.labels(model, str(record.get("finish_reason", "unknown"))).inc()
        self.generated_tokens.labels(model).inc(record.get("tokens", 0))
        self.prompt_tokens.labels(model).inc(record.get("prompt_tokens", 0))
        self.cached_tokens.labels(model).inc(record.get("cached_tokens", 0))
        if record.get("tokens", 0) > 0:
            self.ttft.labels(model).observe(record.get("ttft_s", 0.0))
        if record.get("tpot_s"):
            self.tpot.labels(model).observe(record["tpot_s"])
        self.queue_time.labels(model).observe(record.get("queue_s", 0.0))
        self.duration.labels(model).observe(record.get("duration_s", 0.0))

    def update_gauges(self, metrics: dict[str, Any]) -> None:
        models = metrics.get("inference", {}).get("models", {})
        for name in self.models - set(models):  # a model no longer known
            for gauge in self.labelled:
                gauge.remove(name)
        self.models = set(models)
        for name, figures in models.items():
            for counter in (self.generated_tokens, self.prompt_tokens, self.cached_tokens):
                counter.labels(name)  # a known model's series exists before its first request
            self.active.labels(name).set(figures.get("active_generations") or 0)
            self.queued.labels(name).set(figures.get("queued") or 0)
            self.sessions.labels(name).set(figures.get("sessions") or 0)
            self.kv_used.labels(name).set(figures.get("kv_cells_used") or 0)
            self.kv_total.labels(name).set(figures.get("kv_cells_total") or 0)
            self.tokens_per_second.labels(name).set(figures.get("tokens_per_second") or 0.0)
            self.model_loaded.labels(name).set(int(figures.get("state") == "loaded"))
            self.model_memory.labels(name).set((figures.get("memory_mb") or 0.0) * 2**20)
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

"""What the engine does once at start: load the model (planning GPU layers), time decode steps."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Config
from ..logs import EventLog
from .backend import BatchEntry, LlamaBackend, amx_kernels_built
from .scheduling import RowPadding, padded_rows

log = EventLog("engine")


def load_backend(config: Config) -> LlamaBackend:
    """Load the model; `--gpu-layers -1` offloads as many layers as the free VRAM holds."""
    import llama_cpp

    from .fit import FitError, gpu_vram_free_mb, plan_split

    gpu_layers = config.gpu_layers
    if gpu_layers == -1:
        vram_mb = gpu_vram_free_mb()
        if vram_mb is None or not llama_cpp.llama_supports_gpu_offload():
            reason = "no NVIDIA GPU" if vram_mb is None else "CPU build of llama-cpp-python"
            log.info("no GPU: running on CPU", reason=reason)
            gpu_layers = 0
        else:
            try:
                plan = plan_split(
                    config.model,
                    vram_mb,
                    config.parallel,
                    config.ctx_size,
                    config.vram_margin_mb,
                    batch_size=config.batch_size,
                )
            except FitError as exc:  # llama.cpp may still load it: offload all, as before
                log.warning("cannot plan gpu layers, offloading all", reason=str(exc))
            else:
                log.info("gpu layers planned", **plan.mib_fields())
                gpu_layers = plan.gpu_layers
    if amx_kernels_built():
        log.warning(
            "llama.cpp was built with AMX kernels, which crash on batched decodes: weights are "
            "not repacked (a few per cent slower); `make install` builds it without them",
            issue="https://github.com/ggml-org/llama.cpp/issues/20824",
        )
    return LlamaBackend(
        config.model,
        n_seq_max=config.parallel,
        n_ctx_seq=config.ctx_size,
        n_batch=config.batch_size,
        n_threads=config.threads or None,
        n_gpu_layers=gpu_layers,
    )


# Row counts timed at start for --batch-padding auto (more would lengthen the start).
PAD_MEASURED_ROWS = 16


def measure_step_times(backend: LlamaBackend, most: int, reps: int = 3) -> dict[int, float]:
    """The time of a decode-only step of 1..`most` rows (one token of each of that many
    contiguous empty sequences), the fastest of `reps` after one that builds the compute graphs;
    the counts are interleaved so that the machine's noise hits all alike. A fraction of a
    second to a few seconds on CPU; the sequences are emptied after."""
    most = min(most, backend.n_seq_max)
    token = backend.tokenize("the", add_bos=False)[0]
    times: dict[int, list[float]] = {rows: [] for rows in range(1, most + 1)}
    try:
        for rep in range(reps + 1):
            positions = [0] * most  # each pass from empty sequences: `most` tokens deep at most
            for s in range(most):
                backend.seq_clear(s)
            for rows in times:
                entries = [BatchEntry(token, positions[s], s, True) for s in range(rows)]
                started = time.perf_counter()
                backend.decode(entries)
                if rep > 0:
                    times[rows].append((time.perf_counter() - started) * 1000)
                for s in range(rows):
                    positions[s] += 1
    finally:
        for s in range(most):
            backend.seq_clear(s)
    return {rows: min(ms) for rows, ms in times.items()}


def choose_padding(config: Config, backend: LlamaBackend) -> Callable[[int, int], int] | None:
    """--batch-padding: off, the fixed groups-of-4 rule, or (auto) a table from step times
    measured here and now."""
    if config.batch_padding == "off":
        return None
    if config.batch_padding == "on":
        return padded_rows
    step_ms = measure_step_times(backend, PAD_MEASURED_ROWS)
    padding = RowPadding(step_ms)
    log.info(
        "batch padding measured",
        step_ms={rows: round(ms, 1) for rows, ms in step_ms.items()},
        padded={f"{rows} rows": more for rows, more in padding.padded_counts().items()},
    )
    return padding.rows_for

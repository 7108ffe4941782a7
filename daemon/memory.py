"""Whether a model fits before it is loaded: the fit planner puts as many layers as fit in the
VRAM the loaded models leave free (none without a GPU), and what stays on the host (weights,
KV cache, llama.cpp's compute buffer when no layer is on the GPU) must fit the host's free
memory. Loads still in progress have not taken their memory yet: their plans are counted too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import psutil

from ..actors.engine.fit import (
    F32_BYTES,
    MIB,
    FitError,
    ModelLayout,
    gpu_vram_free_mb,
    plan_split,
    read_layout,
)


class Settings(NamedTuple):
    """What one load of a model uses."""

    path: str
    parallel: int
    ctx_size: int
    gpu_layers: int


@dataclass(frozen=True)
class MemoryPlan:
    """One load's planned memory. `gpu_layers` is what its engine is told (None: no GPU was
    found, the engine's own --gpu-layers stands)."""

    gpu_layers: int | None
    host_mb: float
    gpu_mb: float


def plan_memory(
    layout: ModelLayout,
    settings: Settings,
    batch_size: int,
    margin_mb: int,
    vram_free_mb: float | None,
) -> MemoryPlan:
    """The plan for `settings` with `vram_free_mb` of VRAM free (None: no GPU). An explicit
    layer count is checked as `-1` would plan it (the planner knows no other), which is close
    when the count is what fits."""
    compute = F32_BYTES * batch_size * (layout.n_vocab + layout.n_embd + layout.n_ff)
    on_gpu = vram_free_mb is not None and settings.gpu_layers != 0
    split = plan_split(
        layout,
        int(vram_free_mb) if on_gpu and vram_free_mb is not None else 0,
        settings.parallel,
        settings.ctx_size,
        margin_mb,
        batch_size=batch_size,
    )
    host = split.weights_cpu_bytes + split.kv_cache_cpu_bytes
    if split.gpu_layers == 0:
        host += compute  # llama.cpp's compute buffer is on the host then
    if not on_gpu:
        layers = None if vram_free_mb is None else 0
        return MemoryPlan(layers, host / MIB, 0.0)
    layers = split.gpu_layers if settings.gpu_layers == -1 else settings.gpu_layers
    return MemoryPlan(layers, host / MIB, split.gpu_bytes / MIB)


def shortfall(name: str, plan: MemoryPlan, host_free_mb: float) -> str | None:
    """Why the plan does not fit (the figures), or None when it does."""
    if plan.host_mb <= host_free_mb:
        return None
    where = (
        "with nothing on the GPU" if not plan.gpu_mb else f"with {plan.gpu_mb:.0f} MiB on the GPU"
    )
    return (
        f"model {name} needs about {plan.host_mb:.0f} MiB of host memory ({where}); "
        f"{max(host_free_mb, 0.0):.0f} MiB are free"
    )


class MemoryCheck:
    """Plans loads against the memory free now; a model file's layout is read once."""

    def __init__(self, batch_size: int, margin_mb: int) -> None:
        self.batch_size = batch_size
        self.margin_mb = margin_mb
        self.layouts: dict[tuple[str, int, int], ModelLayout] = {}

    def layout(self, path: str) -> ModelLayout:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = read_layout(path)
        return layout

    def check(
        self, name: str, settings: Settings, reserved: list[MemoryPlan]
    ) -> tuple[str | None, MemoryPlan | None]:
        """(why it does not fit or None, its plan). A file the planner cannot read is let
        through without a plan: llama.cpp has the last word, as with --gpu-layers -1."""
        try:
            layout = self.layout(settings.path)
        except (OSError, FitError):
            return None, None
        vram: float | None = gpu_vram_free_mb()
        if vram is not None:
            vram -= sum(plan.gpu_mb for plan in reserved)
        plan = plan_memory(layout, settings, self.batch_size, self.margin_mb, vram)
        host_free = psutil.virtual_memory().available / MIB - sum(p.host_mb for p in reserved)
        return shortfall(name, plan, host_free), plan

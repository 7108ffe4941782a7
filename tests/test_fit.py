"""The GPU layer planner on the real default model: pure computation, no GPU needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inferencecenter.actors.config import default_model_path
from inferencecenter.actors.engine.fit import MIB, ModelLayout, SplitPlan, plan_split, read_layout

GEMMA_270M_BLOCKS = 18


@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    # GGUFReader parses the whole 262k-token vocabulary: read once, plan many times.
    return read_layout(default_model_path())


def plan(layout: ModelLayout, vram_mb: int, parallel: int = 4, ctx_size: int = 2048) -> SplitPlan:
    return plan_split(layout, vram_mb, parallel, ctx_size, margin_mb=500)


def test_layers_come_from_the_gguf(layout: ModelLayout) -> None:
    assert layout.arch == "gemma3"
    assert layout.n_layers == GEMMA_270M_BLOCKS
    assert plan(layout, 3072).n_layers == GEMMA_270M_BLOCKS
    # gemma 3: every 6th layer is global, the rest slide over a 512-token window.
    assert layout.sliding_window == 512
    assert [il for il, swa in enumerate(layout.swa_layers) if not swa] == [5, 11, 17]


def test_plan_split_reads_the_file_itself() -> None:
    assert plan_split(default_model_path(), 24000, 4, 2048).n_layers == GEMMA_270M_BLOCKS


def test_a_large_card_takes_every_layer(layout: ModelLayout) -> None:
    big = plan(layout, 24000)
    assert big.gpu_layers == big.offloadable_layers == GEMMA_270M_BLOCKS + 1
    # Only the input embeddings stay on the CPU (llama.cpp never offloads them); the tied
    # output matrix is a second copy of them on the GPU.
    assert big.weights_cpu_bytes == layout.input_bytes
    assert big.weights_gpu_bytes == sum(layout.block_bytes) + layout.output_gpu_bytes
    assert big.kv_cache_cpu_bytes == 0
    # f16 K and V, 256 + 256 wide, one KV head, 4 x 2048 cells in each of 18 layers (swa_full).
    assert big.kv_cache_bytes == 2 * 512 * 4 * 2048 * GEMMA_270M_BLOCKS
    assert big.compute_buffer_bytes > 0
    assert big.gpu_bytes + big.margin_bytes <= big.vram_bytes


def test_a_tiny_card_takes_fewer(layout: ModelLayout) -> None:
    tiny = plan(layout, 600)
    assert tiny.gpu_layers < tiny.offloadable_layers
    assert tiny.gpu_bytes + tiny.margin_bytes <= tiny.vram_bytes
    assert tiny.weights_gpu_bytes + tiny.weights_cpu_bytes >= sum(layout.block_bytes)


def test_no_vram_means_cpu_only(layout: ModelLayout) -> None:
    none = plan(layout, 0)
    assert none.gpu_layers == 0
    assert none.weights_gpu_bytes == none.kv_cache_bytes == none.compute_buffer_bytes == 0


def test_more_vram_never_gives_fewer_layers(layout: ModelLayout) -> None:
    full = plan(layout, 24000)
    needed_mb = (full.gpu_bytes + full.margin_bytes) // MIB + 1
    sizes = [0, 300, 600, 1000, 1200, *range(needed_mb - 80, needed_mb + 2, 4), 3072, 24000]
    layers = [plan(layout, mb).gpu_layers for mb in sizes]
    assert layers == sorted(layers)
    assert layers[0] == 0 and layers[-1] == full.offloadable_layers
    # Between nothing and everything there are partial splits: the output layer, then blocks.
    assert any(0 < n < full.offloadable_layers for n in layers)
    for mb in sizes:
        p = plan(layout, mb)
        assert p.gpu_bytes + p.margin_bytes <= p.vram_bytes or p.gpu_layers == 0


def test_partial_split_keeps_kv_with_its_layers(layout: ModelLayout) -> None:
    full = plan(layout, 24000)
    needed_mb = (full.gpu_bytes + full.margin_bytes) // MIB
    part = plan(layout, needed_mb - 40)
    assert 1 < part.gpu_layers < full.gpu_layers
    assert part.kv_cache_cpu_bytes > 0
    assert part.kv_cache_bytes + part.kv_cache_cpu_bytes == full.kv_cache_bytes
    assert part.weights_gpu_bytes + part.weights_cpu_bytes == (
        full.weights_gpu_bytes + full.weights_cpu_bytes
    )


@pytest.mark.parametrize("vram_mb", [1000, 1200, 1250, 1300, 1400, 3072])
def test_more_sequences_or_context_never_give_more_layers(
    layout: ModelLayout, vram_mb: int
) -> None:
    base = plan(layout, vram_mb, parallel=2, ctx_size=1024).gpu_layers
    assert plan(layout, vram_mb, parallel=8, ctx_size=1024).gpu_layers <= base
    assert plan(layout, vram_mb, parallel=2, ctx_size=8192).gpu_layers <= base
    assert plan(layout, vram_mb, parallel=16, ctx_size=8192).gpu_layers <= base


def test_a_smaller_swa_cache_needs_less_kv(layout: ModelLayout) -> None:
    full = plan_split(layout, 24000, 4, 2048, swa_full=True)
    window = plan_split(layout, 24000, 4, 2048, swa_full=False)
    # 15 SWA layers of min(2048, 512 + 512) cells per sequence, 3 global ones of 2048.
    assert window.kv_cache_bytes == 2 * 512 * 4 * (15 * 1024 + 3 * 2048)
    assert window.kv_cache_bytes < full.kv_cache_bytes


def test_fit_command_prints_one_json_object() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "fit", "--vram-mb", "3072", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert isinstance(plan, dict)
    assert plan["n_layers"] == GEMMA_270M_BLOCKS
    assert plan["gpu_layers"] == GEMMA_270M_BLOCKS + 1
    assert plan["vram_source"] == "--vram-mb"


def test_fit_command_refuses_a_negative_margin() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "fit", "--margin-mb", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--margin-mb must be >= 0" in result.stderr

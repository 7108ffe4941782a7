"""How many of a GGUF model's layers fit in a GPU's free memory: `--gpu-layers -1` and `fit`.

The planner is pure computation on the GGUF's tensor table and metadata (read with the `gguf`
package) and a VRAM size, so it runs, and is tested, on a machine without a GPU. What it assumes
about llama.cpp (the one vendored in llama-cpp-python 0.3.36, `src/llama-model.cpp`,
`llama-kv-cache-iswa.cpp`, `llama-context.cpp`):

- Layers. `n_gpu_layers` counts n_layers + 1 offloadable layers: the repeating blocks 0..n-1
  (tensors `blk.N.*`) and the output layer (index n: `output_norm`, `output`, and any other
  tensor outside the blocks that is not an input embedding). llama.cpp offloads from the top:
  with N layers, indices n+1-N..n are on the GPU, so the output layer goes first and
  `n_gpu_layers = n_layers + 1` is everything. The input layer (`token_embd`, `pos_embd`,
  `token_types`) always stays on the CPU ("very little benefit to offloading the input layer").
- Tied embeddings. A model without `output.weight` (gemma 3) uses `token_embd` as its output
  matrix too; llama.cpp loads it a second time into the output layer's buffer when that is a GPU
  buffer, so the GPU holds a copy while the CPU keeps the input copy. On the CPU the two share
  one buffer.
- KV cache (f16 K and V, `offload_kqv` on): a layer's cache lives where the layer lives, so the
  KV counted on the GPU grows with gpu_layers and the rest is host memory. Per layer and cell:
  2 bytes x (n_embd_k_gqa + n_embd_v_gqa), with n_embd_k_gqa = key_length x head_count_kv
  (key_length defaulting to embedding_length / head_count; per-layer arrays are honoured).
  Cells: `--parallel` streams (kv_unified off) of n_ctx_seq cells, padded to 256 as llama.cpp
  does. Sliding-window layers have min(n_ctx_seq, window + n_ubatch) cells per stream (padded to
  256) only when swa_full is off; llama.cpp's default, which the engine keeps, is swa_full on:
  every layer gets full-size cells (its load log says "using full-size SWA cache"). Which layers
  are SWA comes from `{arch}.attention.sliding_window_pattern` or, as in llama.cpp, a per-arch
  period (gemma 3: every 6th layer is global); an unknown arch counts all layers as global,
  which can only overestimate. Recurrent state (Mamba-like layers) is not counted.
- Compute buffer: when any layer is on the GPU, 4 bytes x n_ubatch x (n_vocab + n_embd + n_ff).
  llama.cpp reserves its graph for a full ubatch with every token's logits, so the n_vocab term
  (the f32 logits of the output matmul) dominates for big vocabularies; n_embd + n_ff stands for
  the live activations of one layer, since the allocator reuses buffers between layers. This
  assumes flash attention (llama.cpp's `auto` turns it on for CUDA); without it add
  4 x n_ubatch x n_head x n_kv for the attention scores. Check: the CPU build here reports a
  compute buffer of 514.5 MiB for gemma 3 270M at n_ubatch 512; this estimate gives 517.3 MiB.
- The margin covers what the estimate leaves out: the CUDA context itself (often 100-300 MiB,
  created after NVML measured the free memory), cuBLAS workspaces, fragmentation, other programs.

Greedy: the largest gpu_layers with weights_gpu + kv_gpu + compute + margin <= free VRAM. Every
term only grows with gpu_layers, so the answer is monotonic in the VRAM size.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
KV_CELL_PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache size to this
F16_BYTES = 2
F32_BYTES = 4
# llama.cpp's SWA layer period per architecture when the GGUF has no
# `{arch}.attention.sliding_window_pattern` (load_swa_pattern calls in src/models/*.cpp).
SWA_PERIODS = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6, "gemma3n": 5, "cohere2": 4}
INPUT_TENSORS = ("token_embd.", "token_embd_norm.", "pos_embd.", "token_types.")
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


class FitError(Exception):
    """The model file cannot be read as a GGUF model; the message is one line."""


@dataclass(frozen=True)
class ModelLayout:
    """What the planner needs from one GGUF file: bytes per layer and the shape of its KV."""

    path: str
    arch: str
    n_layers: int
    block_bytes: tuple[int, ...]  # tensors blk.N.* of each block
    input_bytes: int  # token embeddings: always on the CPU
    output_gpu_bytes: int  # the output layer's bytes on a GPU (a copy of tied embeddings)
    output_cpu_bytes: int  # on the CPU, where tied embeddings share the input's buffer
    kv_bytes_per_cell: tuple[int, ...]  # per block: f16 K and V of one token
    swa_layers: tuple[bool, ...]
    sliding_window: int  # 0: no sliding-window attention
    n_embd: int
    n_ff: int
    n_vocab: int


@dataclass(frozen=True)
class SplitPlan:
    """Where a model's weights, KV cache and compute buffer go for one VRAM size.

    `gpu_layers` is llama.cpp's n_gpu_layers: 0..n_layers + 1, the last being every block plus
    the output layer. Byte counts are what the GPU holds with that many layers, except
    `weights_cpu_bytes` and `kv_cache_cpu_bytes` (host memory).
    """

    model: str
    n_layers: int
    gpu_layers: int
    weights_gpu_bytes: int
    weights_cpu_bytes: int
    kv_cache_bytes: int
    kv_cache_cpu_bytes: int
    compute_buffer_bytes: int
    margin_bytes: int
    vram_bytes: int
    parallel: int
    ctx_size: int
    batch_size: int

    @property
    def offloadable_layers(self) -> int:
        return self.n_layers + 1

    @property
    def gpu_bytes(self) -> int:
        """What the plan puts in VRAM, the margin excluded."""
        return self.weights_gpu_bytes + self.kv_cache_bytes + self.compute_buffer_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "offloadable_layers": self.offloadable_layers,
            "gpu_bytes": self.gpu_bytes,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    def mib_fields(self) -> dict[str, Any]:
        """The plan in MiB, for a log line."""

        def mib(value: int) -> float:
            return round(value / MIB, 1)

        return {
            "gpu_layers": self.gpu_layers,
            "of": self.offloadable_layers,
            "vram_free_mb": mib(self.vram_bytes),
            "weights_gpu_mb": mib(self.weights_gpu_bytes),
            "weights_cpu_mb": mib(self.weights_cpu_bytes),
            "kv_gpu_mb": mib(self.kv_cache_bytes),
            "kv_cpu_mb": mib(self.kv_cache_cpu_bytes),
            "compute_mb": mib(self.compute_buffer_bytes),
            "margin_mb": mib(self.margin_bytes),
        }


def _pad(value: int, to: int = KV_CELL_PAD) -> int:
    return (value + to - 1) // to * to


def _per_layer(value: Any, n_layers: int, default: int) -> list[int]:
    """A metadata value that may be one number for all layers or an array with one per layer."""
    if value is None:
        return [default] * n_layers
    if isinstance(value, list):
        if len(value) != n_layers:
            raise FitError(f"a per-layer array has {len(value)} entries for {n_layers} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layers


def _swa_layers(arch: str, pattern: Any, n_layers: int, window: int) -> tuple[bool, ...]:
    if window <= 0:
        return (False,) * n_layers
    if isinstance(pattern, list):
        flags = [bool(v) for v in pattern[:n_layers]]
        return tuple(flags + [False] * (n_layers - len(flags)))
    period = int(pattern) if pattern is not None else SWA_PERIODS.get(arch)
    if period is None:
        return (False,) * n_layers  # unknown pattern: count every layer with full cells
    # llama_hparams::set_swa_pattern: the last layer of every period is global; 0 = all SWA.
    return tuple(period == 0 or il % period < period - 1 for il in range(n_layers))


# GGUF value types (the format's numbering) -> struct format of a scalar.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                12: "d"}  # fmt: skip
GGUF_STRING, GGUF_ARRAY = 8, 9
# Arrays longer than this (a vocabulary, its scores) are skipped: only their length is kept.
GGUF_SMALL_ARRAY = 4096


class GGUFHeader:
    """The metadata and tensor table of a GGUF file (v2 or v3), read from its header alone.

    gguf.GGUFReader parses every value with numpy, the tokenizer's vocabulary included: about
    8 s for gemma 3's 262,144 tokens on this machine, and the daemon plans each load. This
    reads scalars and short arrays, skips long arrays keeping their length, and sizes tensors
    from gguf's table of block sizes: a fraction of a second.
    """

    def __init__(self, path: str) -> None:
        with (
            open(path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            self.data, self.offset = data, 0
            if data[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported")
            self.offset = 24
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = self.string()
                self.metadata[key] = self.value(self.unpack("<I"))
            self.tensors: list[tuple[str, int]] = []
            for _ in range(n_tensors):
                name = self.string()
                dims = [self.unpack("<Q") for _ in range(self.unpack("<I"))]
                kind = self.unpack("<I")
                self.unpack("<Q")  # offset of the data
                self.tensors.append((name, tensor_bytes(dims, kind)))
            del self.data

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.data[self.offset : self.offset + length]).decode("utf-8", "replace")
        self.offset += length
        return text

    def value(self, kind: int) -> Any:
        if kind == GGUF_STRING:
            return self.string()
        if kind in GGUF_SCALARS:
            return self.unpack("<" + GGUF_SCALARS[kind])
        if kind != GGUF_ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if count <= GGUF_SMALL_ARRAY:
            return [self.value(item) for _ in range(count)]
        if item in GGUF_SCALARS:
            self.offset += count * struct.calcsize(GGUF_SCALARS[item])
        else:
            for _ in range(count):
                self.skip(item)
        return range(count)  # its length, not its contents

    def skip(self, kind: int) -> None:
        if kind == GGUF_STRING:
            self.offset += 8 + struct.unpack_from("<Q", self.data, self.offset)[0]
        else:
            self.value(kind)


def tensor_bytes(dims: list[int], kind: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    elements = 1
    for dim in dims:
        elements *= dim
    return elements * size // block


def read_layout(model_path: str | Path) -> ModelLayout:
    """Read the tensor table and metadata of a GGUF file (GGUFHeader: its header only)."""
    path = str(model_path)
    try:
        header = GGUFHeader(path)
    except Exception as exc:  # a truncated or foreign file fails in many ways
        raise FitError(f"cannot read {path} as GGUF: {exc}") from None

    def meta(key: str) -> Any:
        return header.metadata.get(key)

    arch = meta("general.architecture")
    if not isinstance(arch, str):
        raise FitError(f"{path} has no general.architecture")
    n_layers = meta(f"{arch}.block_count")
    n_embd = meta(f"{arch}.embedding_length")
    if not isinstance(n_layers, int) or not isinstance(n_embd, int):
        raise FitError(f"{path} lacks {arch}.block_count or {arch}.embedding_length")

    block_bytes = [0] * n_layers
    input_bytes = output_bytes = tied_output_bytes = 0
    names: set[str] = set()
    for name, size in header.tensors:
        names.add(name)
        block = BLOCK_TENSOR.match(name)
        if block and int(block.group(1)) < n_layers:
            block_bytes[int(block.group(1))] += size
        elif name.startswith(INPUT_TENSORS):
            input_bytes += size
            if name == "token_embd.weight":
                tied_output_bytes = size
        else:
            output_bytes += size
    tied = "output.weight" not in names

    head_count = _per_layer(meta(f"{arch}.attention.head_count"), n_layers, 0)
    head_count_kv = _per_layer(meta(f"{arch}.attention.head_count_kv"), n_layers, -1)
    key_length = meta(f"{arch}.attention.key_length")
    value_length = meta(f"{arch}.attention.value_length")
    kv_bytes_per_cell = []
    for heads, heads_kv in zip(head_count, head_count_kv, strict=True):
        head_dim = n_embd // heads if heads else 0
        k_dim = int(key_length or head_dim)
        v_dim = int(value_length or head_dim)
        kv_heads = heads if heads_kv < 0 else heads_kv
        kv_bytes_per_cell.append(F16_BYTES * kv_heads * (k_dim + v_dim))

    window = int(meta(f"{arch}.attention.sliding_window") or 0)
    pattern = meta(f"{arch}.attention.sliding_window_pattern")
    n_ff = _per_layer(meta(f"{arch}.feed_forward_length"), n_layers, 0)
    n_vocab = meta(f"{arch}.vocab_size")
    if n_vocab is None:
        n_vocab = len(meta("tokenizer.ggml.tokens") or ())
    return ModelLayout(
        path=path,
        arch=arch,
        n_layers=n_layers,
        block_bytes=tuple(block_bytes),
        input_bytes=input_bytes,
        output_gpu_bytes=output_bytes + (tied_output_bytes if tied else 0),
        output_cpu_bytes=output_bytes,
        kv_bytes_per_cell=tuple(kv_bytes_per_cell),
        swa_layers=_swa_layers(arch, pattern, n_layers, window),
        sliding_window=window,
        n_embd=n_embd,
        n_ff=max(n_ff, default=0),
        n_vocab=int(n_vocab),
    )


def kv_cells_per_layer(
    layout: ModelLayout, parallel: int, ctx_size: int, batch_size: int, swa_full: bool
) -> list[int]:
    """KV cells (all streams together) each block's cache holds, as llama.cpp sizes them."""
    n_ctx = _pad(parallel * ctx_size)
    n_ctx_seq = _pad(n_ctx // parallel)
    swa_cells = n_ctx_seq
    if layout.sliding_window and not swa_full:
        swa_cells = _pad(min(n_ctx_seq, layout.sliding_window + batch_size))
    return [parallel * (swa_cells if is_swa else n_ctx_seq) for is_swa in layout.swa_layers]


def plan_split(
    model_path: str | Path | ModelLayout,
    vram_free_mb: int,
    parallel: int,
    ctx_size: int,
    margin_mb: int = 500,
    *,
    batch_size: int = 512,
    swa_full: bool = True,
) -> SplitPlan:
    """The most layers that fit in `vram_free_mb` MiB with `margin_mb` MiB kept free.

    `batch_size` is n_batch = n_ubatch, as the engine sets them; `swa_full` as the engine's
    context (llama.cpp's default, on). Pass a ModelLayout from read_layout to plan many times
    without reading the file again.
    """
    if parallel < 1 or ctx_size < 1 or batch_size < 1:
        raise ValueError("parallel, ctx_size and batch_size must be positive")
    if margin_mb < 0:
        raise ValueError("margin_mb must be >= 0")
    layout = model_path if isinstance(model_path, ModelLayout) else read_layout(model_path)
    n = layout.n_layers
    cells = kv_cells_per_layer(layout, parallel, ctx_size, batch_size, swa_full)
    block_kv = [c * per_cell for c, per_cell in zip(cells, layout.kv_bytes_per_cell, strict=True)]
    compute = F32_BYTES * batch_size * (layout.n_vocab + layout.n_embd + layout.n_ff)
    vram = max(vram_free_mb, 0) * MIB
    margin = margin_mb * MIB

    def plan(gpu_layers: int) -> SplitPlan:
        first_gpu = n + 1 - gpu_layers  # offloadable index of the lowest layer on the GPU
        on_gpu = [il >= first_gpu for il in range(n)]
        output_on_gpu = gpu_layers > 0
        weights_gpu = sum(b for b, g in zip(layout.block_bytes, on_gpu, strict=True) if g)
        weights_cpu = layout.input_bytes + sum(layout.block_bytes) - weights_gpu
        if output_on_gpu:
            weights_gpu += layout.output_gpu_bytes
        else:
            weights_cpu += layout.output_cpu_bytes
        kv_gpu = sum(kv for kv, g in zip(block_kv, on_gpu, strict=True) if g)
        return SplitPlan(
            model=layout.path,
            n_layers=n,
            gpu_layers=gpu_layers,
            weights_gpu_bytes=weights_gpu,
            weights_cpu_bytes=weights_cpu,
            kv_cache_bytes=kv_gpu,
            kv_cache_cpu_bytes=sum(block_kv) - kv_gpu,
            compute_buffer_bytes=compute if output_on_gpu else 0,
            margin_bytes=margin,
            vram_bytes=vram,
            parallel=parallel,
            ctx_size=ctx_size,
            batch_size=batch_size,
        )

    for gpu_layers in range(n + 1, 0, -1):
        candidate = plan(gpu_layers)
        if candidate.gpu_bytes + margin <= vram:
            return candidate
    return plan(0)


def gpu_vram_free_mb() -> int | None:
    """Free memory of the first NVIDIA GPU in MiB, from NVML; None without a GPU or driver.

    One GPU is the design point. With several, llama.cpp spreads the layers over all of them,
    so a plan made for the first one's memory is on the safe side.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: no GPU
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free) // MIB
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def format_plan(plan: SplitPlan, source: str) -> str:
    def mib(value: int) -> str:
        return f"{value / MIB:8.1f} MiB"

    if plan.gpu_layers == plan.offloadable_layers:
        which = f"all {plan.n_layers} blocks and the output layer"
    elif plan.gpu_layers:
        which = f"the output layer and the last {plan.gpu_layers - 1} of {plan.n_layers} blocks"
    else:
        which = "everything on the CPU"
    total = plan.gpu_bytes + plan.margin_bytes
    used = f"{total / MIB:.1f} MiB with the margin" if plan.gpu_layers else "nothing offloaded"
    lines = [
        f"model            {plan.model}",
        f"free vram        {mib(plan.vram_bytes)}  ({source})",
        f"sequences        {plan.parallel} x {plan.ctx_size} tokens, batch {plan.batch_size}",
        f"n_layers         {plan.n_layers} blocks + 1 output layer",
        f"gpu_layers       {plan.gpu_layers} of {plan.offloadable_layers}: {which}",
        f"weights on GPU   {mib(plan.weights_gpu_bytes)}",
        f"weights on CPU   {mib(plan.weights_cpu_bytes)}  (token embeddings always stay there)",
        f"KV cache on GPU  {mib(plan.kv_cache_bytes)}",
        f"KV cache on CPU  {mib(plan.kv_cache_cpu_bytes)}  (the layers left on the CPU)",
        f"compute buffer   {mib(plan.compute_buffer_bytes)}",
        f"margin           {mib(plan.margin_bytes)}",
        f"GPU use          {mib(plan.gpu_bytes)}  ({used})",
    ]
    return "\n".join(lines)


def fit(args: argparse.Namespace) -> int:
    from ..config import default_model_path

    for name, value, least in (
        ("--parallel", args.parallel, 1),
        ("--ctx-size", args.ctx_size, 1),
        ("--batch-size", args.batch_size, 1),
        ("--margin-mb", args.margin_mb, 0),
        ("--vram-mb", 0 if args.vram_mb is None else args.vram_mb, 0),
    ):
        if value < least:
            print(f"inferencecenter fit: {name} must be >= {least} (got {value})", file=sys.stderr)
            return 2
    model = args.model or default_model_path()
    if not os.path.isfile(model):
        print(f"inferencecenter fit: model file {model} does not exist", file=sys.stderr)
        return 2
    if args.vram_mb is not None:
        vram_mb, source = args.vram_mb, "--vram-mb"
    else:
        free = gpu_vram_free_mb()
        vram_mb, source = (free, "NVML, GPU 0") if free is not None else (0, "no GPU")
    try:
        plan = plan_split(
            model,
            vram_mb,
            args.parallel,
            args.ctx_size,
            args.margin_mb,
            batch_size=args.batch_size,
        )
    except FitError as exc:
        print(f"inferencecenter fit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**plan.as_dict(), "vram_source": source}))
    else:
        if source == "no GPU":
            print("no GPU (NVML finds no NVIDIA GPU or driver): gpu_layers 0, all on the CPU")
        print(format_plan(plan, source))
    return 0


def add_fit_command(commands: Any) -> None:
    parser = commands.add_parser(
        "fit", help="plan how many layers fit on the GPU (what --gpu-layers -1 would choose)"
    )
    parser.add_argument("--model", help="GGUF model (default: the gemma package's)")
    parser.add_argument(
        "--vram-mb", type=int, help="free VRAM in MiB to plan for (default: NVML's reading)"
    )
    parser.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    parser.add_argument("--ctx-size", type=int, default=2048, help="tokens per session")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per decode step")
    parser.add_argument(
        "--margin-mb",
        "--vram-margin-mb",
        dest="margin_mb",
        type=int,
        default=500,
        help="VRAM in MiB left free",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=fit)

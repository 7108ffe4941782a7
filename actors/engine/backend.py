"""One GGUF model and one multi-sequence llama.cpp context, via llama-cpp-python's low-level API."""

from __future__ import annotations

import ctypes
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from ...protocol.messages import SamplingParams

GGUF_MAGIC = b"GGUF"
LOG_ENV = "INFERENCECENTER_LLAMA_LOG"
# A GGUF types a model's markers (`<start_of_image>`, `[multimodal]`) and text it keeps whole
# (runs of spaces and newlines, `<table>`) alike, as user-defined tokens that llama.cpp always
# renders. Markers are told apart by their shape: words joined by `_` in angle brackets, or one
# word in square brackets; HTML tags have no `_`.
USER_DEFINED = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
MARKER = re.compile(rb"<[a-z]+(?:_[a-z]+)+>|\[[a-z]+\]")
# Tokens whose history the repeat penalty looks at.
PENALTY_LAST_N = 64


class ModelLoadError(Exception):
    """The model file is missing, unreadable, not GGUF, or llama.cpp refused it."""


class DecodeError(Exception):
    """llama_decode failed; `code` is its return value (1 no KV slot, 2 aborted, < 0 error)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode failed with code {code}")
        self.code = code


@dataclass(frozen=True)
class BatchEntry:
    """One token of a batch: where it goes and whether its logits are wanted for sampling."""

    token: int
    pos: int
    seq_id: int
    logits: bool


def _ignore_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


# Module level, so ctypes never frees the C callback while llama.cpp may still call it.
_discard_log: Any = llama_cpp.llama_log_callback(_ignore_log)


_backend_ready = False


def _init_process() -> None:
    """llama_backend_init and the log setting, once per process."""
    global _backend_ready
    if _backend_ready:
        return
    if os.environ.get(LOG_ENV) == "1":
        # A NULL callback (ctypes rejects None here) restores llama.cpp's own stderr logger;
        # llama_cpp's import had installed a Python one that depends on `logging` levels.
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(), ctypes.c_void_p(0))
    else:
        llama_cpp.llama_log_set(_discard_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _backend_ready = True


def _usable_cpus() -> int:
    # os.cpu_count() counts the machine; a container or taskset may give this process fewer,
    # and more llama.cpp threads than cores makes decoding much slower.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _check_gguf(path: Path) -> None:
    """Fail with one clear line before llama.cpp does with many."""
    where = f"cannot load model {path}"
    if not path.exists():
        raise ModelLoadError(f"{where}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{where}: not a regular file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(f"{where}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{where}: not a GGUF file")


class LlamaBackend:
    """One llama_model and one llama_context of `n_seq_max` sequences of `n_ctx_seq` tokens each.

    Not thread-safe: one thread at a time may use it (a worker thread may run `decode` while the
    caller waits, since ctypes releases the GIL during llama_decode).
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_seq_max: int,
        n_ctx_seq: int,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
    ) -> None:
        most = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= n_seq_max <= most:
            raise ValueError(f"n_seq_max must be in 1..{most}, not {n_seq_max}")
        if n_ctx_seq < 1 or n_batch < 1:
            raise ValueError(f"n_ctx_seq and n_batch must be positive (got {n_ctx_seq}, {n_batch})")
        path = Path(model_path)
        _check_gguf(path)
        _init_process()
        self.model_path = str(path)
        self._model: Any = None
        self._ctx: Any = None
        self._batch: llama_cpp.llama_batch | None = None
        self._piece_cache: dict[int, bytes] = {}
        # The entries of the last successful decode: which batch positions have logits to sample.
        self._outputs: Sequence[BatchEntry] = ()
        self._eog_tokens: tuple[int, ...] | None = None
        self._marker_tokens: tuple[int, ...] | None = None

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), model_params)
        if not self._model:
            self._model = None
            raise ModelLoadError(
                f"cannot load model {path}: llama.cpp rejected it (set {LOG_ENV}=1 to see why)"
            )
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            threads = n_threads or _usable_cpus()
            ctx_params = llama_cpp.llama_context_default_params()
            ctx_params.n_ctx = n_seq_max * n_ctx_seq
            ctx_params.n_batch = n_batch
            # One physical batch per llama_decode call: splitting would only add overhead here.
            ctx_params.n_ubatch = n_batch
            ctx_params.n_seq_max = n_seq_max
            ctx_params.n_threads = threads
            ctx_params.n_threads_batch = threads
            # Separate streams per sequence: one long session cannot take another's cells.
            ctx_params.kv_unified = False
            self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
            if not self._ctx:
                self._ctx = None
                raise ModelLoadError(
                    f"cannot load model {path}: llama.cpp could not create a context of "
                    f"{n_seq_max} x {n_ctx_seq} tokens (set {LOG_ENV}=1 to see why)"
                )
            self._memory = llama_cpp.llama_get_memory(self._ctx)
            self.n_ctx_seq: int = llama_cpp.llama_n_ctx_seq(self._ctx)
            self.n_batch: int = llama_cpp.llama_n_batch(self._ctx)
            self.n_seq_max: int = llama_cpp.llama_n_seq_max(self._ctx)
            self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
            self.model_name: str = self._meta("general.name") or path.stem
            template = llama_cpp.llama_model_chat_template(self._model, None)
            self.chat_template: str | None = (
                template.decode("utf-8", "replace") if template else None
            )
            self.bos_text: str = self._token_text(llama_cpp.llama_vocab_bos(self._vocab))
            self.eos_text: str = self._token_text(llama_cpp.llama_vocab_eos(self._vocab))
            if llama_cpp.llama_supports_gpu_offload():
                # llama.cpp offloads the output layer as one more layer; -1 means all of them.
                all_layers = llama_cpp.llama_model_n_layer(self._model) + 1
                self.gpu_layers_used: int = (
                    all_layers if n_gpu_layers < 0 else min(n_gpu_layers, all_layers)
                )
            else:
                self.gpu_layers_used = 0

            self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
            batch = self._batch
            # Pointers fetched once: each struct attribute access builds a new ctypes object.
            self._b_token = batch.token
            self._b_pos = batch.pos
            self._b_logits = batch.logits
            self._b_seq = [batch.seq_id[i] for i in range(self.n_batch)]
            for i in range(self.n_batch):
                batch.n_seq_id[i] = 1
        except BaseException:
            self.close()
            raise

    # ---- text ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """Token ids of text; special-token text like `<start_of_turn>` becomes its one token."""
        self._require_open()
        data = text.encode("utf-8")
        capacity = len(data) + 2
        while True:
            buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, add_bos, True
            )
            if n >= 0:
                return buffer[:n]
            capacity = -n

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens (e.g. `<end_of_turn>`) and markers
        typed as user-defined (gemma's `<start_of_image>`) give b""."""
        piece = self._piece_cache.get(token)
        if piece is not None:
            return piece
        self._require_open()
        size = 32
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
            if n >= 0:
                break
            size = -n
        piece = buffer.raw[:n]
        if llama_cpp.llama_vocab_get_attr(self._vocab, token) & USER_DEFINED and (
            MARKER.fullmatch(piece)
        ):
            piece = b""
        self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        self._require_open()
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ---- decoding -----------------------------------------------------------------------

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """Evaluate entries in one llama_decode; entries with logits=True can then be sampled."""
        n = len(entries)
        if not 1 <= n <= self.n_batch:
            # More than n_batch is a GGML_ASSERT in llama.cpp: it would kill the process.
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens, not {n}")
        self._require_open()
        batch = self._batch
        assert batch is not None
        tokens, positions, logits, seqs = self._b_token, self._b_pos, self._b_logits, self._b_seq
        for i, entry in enumerate(entries):
            tokens[i] = entry.token
            positions[i] = entry.pos
            seqs[i][0] = entry.seq_id
            logits[i] = entry.logits
        batch.n_tokens = n
        self._outputs = ()
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            raise DecodeError(code)
        self._outputs = entries

    def has_logits(self, batch_index: int) -> bool:
        """Whether the last decode kept logits for this batch position."""
        outputs = self._outputs
        return 0 <= batch_index < len(outputs) and outputs[batch_index].logits

    # ---- sequences ----------------------------------------------------------------------

    def seq_clear(self, seq_id: int) -> None:
        self._require_open()
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def seq_trim(self, seq_id: int, from_pos: int) -> bool:
        """Drop the sequence's positions from `from_pos` on; False if llama.cpp refuses."""
        self._require_open()
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, from_pos, -1))

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position held for the sequence, -1 when it is empty."""
        self._require_open()
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id))

    def seq_save(self, seq_id: int) -> bytes:
        """The sequence's KV state, to swap it out and restore it later (into any seq id)."""
        self._require_open()
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq_id)
        return ctypes.string_at(buffer, written)

    def seq_restore(self, seq_id: int, data: bytes) -> None:
        """Replace the sequence's state with one from seq_save."""
        self._require_open()
        self.seq_clear(seq_id)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(data), seq_id) == 0:
            raise RuntimeError(
                f"llama.cpp refused the saved state for seq {seq_id} ({len(data)} bytes)"
            )

    # ---- sampling -----------------------------------------------------------------------

    def new_sampler(self, params: SamplingParams, history: Sequence[int]) -> Sampler:
        """A sampler chain for one generation; `history` primes the repeat penalty."""
        self._require_open()
        return Sampler(self, params, history)

    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (gemma has three: <eos>, <end_of_turn>, </s>)."""
        if self._eog_tokens is None:
            self._scan_vocab()
            assert self._eog_tokens is not None
        return self._eog_tokens

    def marker_tokens(self) -> tuple[int, ...]:
        """Markers that are no text (see MARKER): never sampled, never rendered. Greedy gemma
        270M answers "Rivers flow" with nothing but <start_of_image>, an empty reply."""
        if self._marker_tokens is None:
            self._scan_vocab()
            assert self._marker_tokens is not None
        return self._marker_tokens

    def _scan_vocab(self) -> None:
        # One pass over the vocabulary (~0.1 s), done at start, not mid-request.
        self._require_open()
        vocab, attr_of = self._vocab, llama_cpp.llama_vocab_get_attr
        self._eog_tokens = tuple(
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )
        user_defined = [t for t in range(self.n_vocab) if attr_of(vocab, t) & USER_DEFINED]
        self._marker_tokens = tuple(t for t in user_defined if self.token_bytes(t) == b"")

    # ---- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Free the batch, context and model; safe to call twice."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
            self._b_seq = []
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def _require_open(self) -> None:
        # A call on a freed context would be a segfault, not an exception.
        if self._ctx is None:
            raise RuntimeError("the backend is closed")

    def _meta(self, key: str) -> str | None:
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buffer, size)
            if n < 0:
                return None
            if n < size:
                return buffer.value.decode("utf-8", "replace") or None
            size = n + 1

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""


class Sampler:
    """One llama.cpp sampler chain, for one generation of one sequence."""

    def __init__(
        self, backend: LlamaBackend, params: SamplingParams, history: Sequence[int]
    ) -> None:
        self._backend = backend
        self._chain: Any = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        # Arrays handed to C stay referenced for the chain's lifetime.
        self._keep: list[Any] = []
        try:
            self._build(params, history)
        except BaseException:
            self.free()
            raise

    def _build(self, params: SamplingParams, history: Sequence[int]) -> None:
        backend, chain = self._backend, self._chain
        banned = backend.marker_tokens() + (backend.eog_tokens() if params.ignore_eos else ())
        if banned:
            biases = (llama_cpp.llama_logit_bias * len(banned))(
                *(llama_cpp.llama_logit_bias(token, float("-inf")) for token in banned)
            )
            self._keep.append(biases)
            llama_cpp.llama_sampler_chain_add(
                chain,
                llama_cpp.llama_sampler_init_logit_bias(backend.n_vocab, len(banned), biases),
            )
        if params.repeat_penalty != 1.0:
            penalties = llama_cpp.llama_sampler_init_penalties(
                backend.n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0
            )
            llama_cpp.llama_sampler_chain_add(chain, penalties)
            # Only the penalty sampler needs the history; priming it alone leaves the rest as new.
            for token in list(history)[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(penalties, token)
        if params.temp <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                llama_cpp.llama_sampler_chain_add(
                    chain, llama_cpp.llama_sampler_init_top_k(params.top_k)
                )
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1)
            )
            if params.min_p > 0:
                llama_cpp.llama_sampler_chain_add(
                    chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1)
                )
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temp))
            seed = params.seed if params.seed is not None else secrets.randbits(32)
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)
            )

    def sample(self, batch_index: int) -> int:
        """Sample (and accept) a token from batch position `batch_index` of the last decode."""
        backend = self._backend
        if self._chain is None or backend._ctx is None:
            raise RuntimeError("the sampler or its backend is closed")
        if not backend.has_logits(batch_index):
            # llama.cpp would GGML_ASSERT on missing logits and kill the process.
            raise ValueError(f"batch position {batch_index} has no logits from the last decode")
        return int(llama_cpp.llama_sampler_sample(self._chain, backend._ctx, batch_index))

    def free(self) -> None:
        """Free the chain (and the samplers it owns); safe to call twice."""
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
            self._keep.clear()

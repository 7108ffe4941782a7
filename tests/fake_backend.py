"""A fake model for the engine core's unit tests: words are tokens, the KV is a list per sequence.

It keeps llama.cpp's rules that the core must respect (no gap in a sequence's positions, no
more than n_batch tokens a decode, logits only where asked for) and records every batch, so a
test can see what the core decoded. Its "model" continues a sequence with a scripted token.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence

from inferencecenter.actors.engine.backend import BatchEntry, DecodeError
from inferencecenter.protocol.messages import SamplingParams

BOS = 1
EOG = 2
FIRST_WORD = 10


def next_word(history: Sequence[int]) -> int:
    """The fake model's continuation: a word chosen by the last token (never end of text)."""
    last = history[-1] if history else 0
    return FIRST_WORD + (last * 7 + 3) % 40


class FakeSampler:
    def __init__(self, backend: FakeBackend, params: SamplingParams | None = None) -> None:
        self.backend = backend
        self.params = params or SamplingParams()
        self.freed = False

    def sample(self, batch_index: int) -> int:
        assert not self.freed, "a freed sampler was used"
        seq_id = self.backend.logits[batch_index]
        return self.backend.continuation(self.backend.kv[seq_id])

    def logprobs(
        self, batch_index: int, token: int
    ) -> tuple[float, tuple[tuple[int, float], ...]] | None:
        """When asked for: the sampled token certain, and after it `logprobs` tokens of -9."""
        top = self.params.logprobs
        if top is None:
            return None
        return 0.0, ((token, 0.0), *((EOG, -9.0) for _ in range(top - 1)))[:top]

    def free(self) -> None:
        self.freed = True


class FakeBackend:
    """Implements the engine core's Backend protocol in memory."""

    chat_template: str | None = None
    bos_text = "<bos>"
    eos_text = "<eos>"

    def __init__(self, n_seq_max: int = 4, n_ctx_seq: int = 256, n_batch: int = 64) -> None:
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self.kv: dict[int, list[int]] = {seq: [] for seq in range(n_seq_max)}
        self.words: dict[str, int] = {}
        self.batches: list[list[BatchEntry]] = []
        self.logits: dict[int, int] = {}  # batch index -> sequence, of the last decode
        self.continuation: Callable[[Sequence[int]], int] = next_word
        self.fail_next_decode = 0
        self.restores = 0
        self.longest_word = 1 << 16

    # ---- text ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        ids = [self.word(word) for word in text.split()]
        return [BOS, *ids] if add_bos else ids

    def token_bytes(self, token: int) -> bytes:
        for word, known in self.words.items():
            if known == token:
                return f" {word}".encode()
        return f" w{token}".encode()

    def max_token_bytes(self) -> int:
        return self.longest_word  # a fake word may be any length: tests set a bound they keep

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def word(self, text: str) -> int:
        return self.words.setdefault(text, FIRST_WORD + 40 + len(self.words))

    # ---- decoding -----------------------------------------------------------------------

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        if self.fail_next_decode:
            code, self.fail_next_decode = self.fail_next_decode, 0
            raise DecodeError(code)
        assert 0 < len(entries) <= self.n_batch, f"{len(entries)} tokens in one decode"
        self.logits = {}
        for index, entry in enumerate(entries):
            held = self.kv[entry.seq_id]
            assert entry.pos == len(held), (
                f"gap in seq {entry.seq_id}: {entry.pos} after {len(held)}"
            )
            held.append(entry.token)
            if entry.logits:
                self.logits[index] = entry.seq_id
        self.batches.append(list(entries))

    # ---- KV -----------------------------------------------------------------------------

    def seq_clear(self, seq_id: int) -> None:
        self.kv[seq_id] = []

    def seq_trim(self, seq_id: int, from_pos: int) -> bool:
        del self.kv[seq_id][from_pos:]
        return True

    def seq_pos_max(self, seq_id: int) -> int:
        return len(self.kv[seq_id]) - 1

    def seq_save(self, seq_id: int) -> bytes:
        return pickle.dumps(self.kv[seq_id])

    def seq_restore(self, seq_id: int, data: bytes) -> None:
        self.kv[seq_id] = list(pickle.loads(data))
        self.restores += 1

    def new_sampler(self, params: SamplingParams, history: Sequence[int]) -> FakeSampler:
        return FakeSampler(self, params)

    def check_grammar(self, grammar: str) -> None:
        """The fake llama.cpp refuses a grammar without a `root` rule."""
        if "root ::=" not in grammar:
            raise ValueError("no root rule")

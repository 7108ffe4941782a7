"""The decode thread: every step's llama_decode and sampling run here, and a step of generating
streams goes on by itself to the next one while the engine's loop streams its tokens.

Handing each step to a worker thread and back cost 0.7 ms between two decodes at one stream (a
10.7 ms token): trio's wake-up, the loop's own work, the hand-over. So when the loop submits a
decode-only step it also says how many more tokens each row may take (max_tokens, context); the
thread then feeds each row the token it has just sampled and decodes again at once, as long as
no row must stop (an end-of-generation token, a row out of tokens) and the loop does not `hold`
it back (an arrival, an abort, a job that ended; nor does it go on while prompts wait for their
steps). The loop checks every such step against the
sessions' histories: a row whose job ended meanwhile (a stop string) or was aborted has a token
in the KV that it must not keep, which the loop trims once the thread stops.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .backend import BatchEntry, Logprobs

if TYPE_CHECKING:
    from .jobs import Backend, Sampler

Pads = list[tuple[int, int]]  # (slot, position) of throw-away rows


@dataclass
class Step:
    entries: list[BatchEntry]
    sample_at: list[tuple[Sampler, int]]  # (sampler, batch index)
    pads: Pads
    # Decode-only steps that may go on: per row, how many more steps it may take, and whether
    # an end-of-generation token ends it. None: the thread stops after this step.
    rows_left: list[int] | None = None
    eog_stops: list[bool] = field(default_factory=list)
    # Called just before llama_decode (which lets go of the GIL): the previous step's result
    # is handed to the loop then, so that the loop's work runs during the decode, not before.
    on_decode: Callable[[], None] | None = None

    def decoding(self) -> None:
        if self.on_decode is not None:
            announce, self.on_decode = self.on_decode, None
            announce()

    def following(self, tokens: list[int]) -> Step:
        """The same rows, one position on, fed the tokens just sampled."""
        assert self.rows_left is not None
        entries = [
            BatchEntry(token, entry.pos + 1, entry.seq_id, True)
            for entry, token in zip(self.entries, tokens, strict=True)
        ]
        left = [count - 1 for count in self.rows_left]
        return Step(entries, self.sample_at, self.pads, left, self.eog_stops)


@dataclass
class StepResult:
    step: Step
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Logprobs | None] = field(default_factory=list)  # per token, when asked
    spoilt: list[int] = field(default_factory=list)  # slots whose padding could not be removed
    pads_used: int = 0
    ms: float = 0.0  # decode and sampling
    error: BaseException | None = None
    continued: bool = False  # the thread went on to the step after this one


RunStep = Callable[[Step], tuple[list[int], list[Logprobs | None], list[int], int]]


def run_step(run: RunStep, step: Step) -> StepResult:
    """Run one step and time it; an error is handed to the loop in the result, which decides."""
    result = StepResult(step)
    started = time.perf_counter()
    try:
        result.tokens, result.logprobs, result.spoilt, result.pads_used = run(step)
    except BaseException as exc:
        result.error = exc
    step.decoding()  # the previous result, if the step failed before its decode
    result.ms = (time.perf_counter() - started) * 1000
    return result


class Mailbox:
    """Results from the decode thread to the trio loop, handed over without letting go of the
    GIL: trio's run_sync_soon writes to a socket, which does, and the woken loop then held the
    GIL for all its work on the result (0.3 ms at one stream) before the thread could start its
    next decode. Here the thread writes its wake-up byte through a ctypes call that keeps the
    GIL, and lets go of it only in llama_decode."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._items: deque[StepResult] = deque()
        write = ctypes.PyDLL(None).write  # PyDLL: the GIL is kept during the call
        write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
        write.restype = ctypes.c_ssize_t
        self._write = write

    def put(self, item: StepResult) -> None:
        self._items.append(item)
        self._write(self._write_fd, b"!", 1)  # a full pipe is readable already: no matter

    async def get(self) -> StepResult:
        while not self._items:
            await trio.lowlevel.wait_readable(self._read_fd)
            try:
                while os.read(self._read_fd, 4096):
                    pass
            except BlockingIOError:
                pass
        return self._items.popleft()


class DecodeThread:
    """Runs steps in order; results come back through `results` in the same order."""

    def __init__(self, run_step: RunStep, is_eog: Callable[[int], bool]) -> None:
        self.run_step = run_step
        self.is_eog = is_eog
        self.hold = threading.Event()  # set: no going on by itself
        self.requests: queue.SimpleQueue[Step | None] = queue.SimpleQueue()
        self.results = Mailbox()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="decode", daemon=True)
        self._thread.start()

    def submit(self, step: Step) -> None:
        self.requests.put(step)

    def stop(self, wait_s: float = 0.0) -> None:
        """End the thread after the step it is on (waiting up to `wait_s` for it)."""
        self.hold.set()
        self.requests.put(None)
        if wait_s and self._thread is not None:
            self._thread.join(wait_s)

    def _serve(self) -> None:
        while True:
            step = self.requests.get()
            if step is None:
                return
            while step is not None:
                result = self._run(step)
                following = self._following(step, result)
                result.continued = following is not None
                if following is None:
                    self._deliver(result)
                else:
                    following.on_decode = functools.partial(self._deliver, result)
                step = following

    def _deliver(self, result: StepResult) -> None:
        self.results.put(result)

    def _run(self, step: Step) -> StepResult:
        return run_step(self.run_step, step)

    def _following(self, step: Step, result: StepResult) -> Step | None:
        if result.error is not None or step.rows_left is None or self.hold.is_set():
            return None
        if min(step.rows_left, default=0) <= 0 or len(result.tokens) != len(step.entries):
            return None
        for token, stops in zip(result.tokens, step.eog_stops, strict=True):
            if stops and self.is_eog(token):
                return None
        return step.following(result.tokens)


def execute_step(
    backend: Backend, step: Step
) -> tuple[list[int], list[Logprobs | None], list[int], int]:
    """The decode and sampling of a step, in the decode thread (ctypes releases the GIL, so
    the actor's socket tasks keep running meanwhile). Padding rows go after the KV of idle
    slots and are removed after. Returns the tokens, their log-probabilities (None for rows
    that do not ask; taken here, while the step's logits exist), the slots whose padding could
    not be removed (their KV must be rebuilt) and the padding rows used."""
    entries = step.entries
    used = []
    for slot, pos in step.pads:
        if pos == 0:
            backend.seq_clear(slot)
        if backend.seq_pos_max(slot) == pos - 1:  # never a gap: llama.cpp would refuse
            used.append((slot, pos))
    if used:
        token = entries[0].token
        entries = entries + [BatchEntry(token, pos, slot, True) for slot, pos in used]
    spoilt = []
    step.decoding()
    try:
        backend.decode(entries)
    finally:
        for slot, pos in used:
            if not backend.seq_trim(slot, pos):
                spoilt.append(slot)
    tokens = [sampler.sample(index) for sampler, index in step.sample_at]
    logprobs = [
        sampler.logprobs(index, token)
        for (sampler, index), token in zip(step.sample_at, tokens, strict=True)
    ]
    return tokens, logprobs, spoilt, len(used)

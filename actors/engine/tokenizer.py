"""The tokenizer thread: long inputs are tokenized here, one at a time, beside the engine's loop
and at a lower CPU priority than the decode, so that streams go on while a prompt is tokenized.

llama.cpp's decode threads wait for each other at every layer: a core taken from one of them
slows the whole step, so the tokenizer must yield its core to them rather than share it. The
tokenizer reads only the vocabulary (the Backend protocol allows it at any time).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

from ..logs import EventLog

log = EventLog("engine")

# Added to the process's niceness for this thread alone (Linux: a thread has its own).
NICENESS = 10

Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class TokenizerThread:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.serve, name="tokenizer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, wait_s: float = 10.0) -> None:
        """The thread ends after the job it is doing (the backend may be closed then)."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(wait_s)

    def serve(self) -> None:
        try:
            mine = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, mine, os.getpriority(os.PRIO_PROCESS, mine) + NICENESS)
        except (AttributeError, OSError) as exc:  # not Linux, or not allowed: full priority
            log.debug("tokenizer priority unchanged", reason=str(exc))
        while True:
            job = self.jobs.get()
            if job is None:
                return
            work, deliver = job
            deliver(outcome.capture(work))

    async def run(self, work: Callable[[], Any]) -> Any:
        """`work()` in the thread, after the jobs before it. Waited for even when cancelled: the
        backend it reads must not be closed under it (bounded: an input is at most as long as
        a message, ~0.6 s for 1 MiB)."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[Any]] = []

        def deliver(value: outcome.Outcome[Any]) -> None:
            result.append(value)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the engine stopped meanwhile

        self.jobs.put((work, deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        return result[0].unwrap()

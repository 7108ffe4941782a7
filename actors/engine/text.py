"""Turn a generation's token bytes into text a client may see: whole characters, no stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Token bytes in, safe text out.

    UTF-8 is never split, and stop strings are held back until they can no longer match.

    One stream per generation. `push` each sampled token's bytes and send what it returns;
    at the end of a generation that did not stop, send `flush()`.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        # An empty stop string would match everywhere and end every generation at once.
        self._stops: tuple[str, ...] = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; return (text to send now, stopped)."""
        if self._stopped:
            return "", True
        # The incremental decoder keeps an incomplete multibyte character until its last byte.
        held = self._held + self._decoder.decode(piece)
        if not self._stops:
            self._held = ""
            return held, False
        cut = self._first_stop(held)
        if cut >= 0:
            self._stopped = True
            self._held = ""
            return held[:cut], True
        keep = self._partial_stop_length(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """Everything still held, for the end of a generation that did not stop."""
        if self._stopped:
            return ""
        # final=True turns a character cut short by the end of generation into U+FFFD.
        held = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        cut = self._first_stop(held)
        if cut >= 0:
            self._stopped = True
            return held[:cut]
        return held

    def _first_stop(self, text: str) -> int:
        """Index of the earliest complete stop string in text, or -1."""
        first = -1
        for stop in self._stops:
            index = text.find(stop)
            if index >= 0 and (first < 0 or index < first):
                first = index
        return first

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of text that some stop string starts with."""
        longest = 0
        for stop in self._stops:
            # A complete match was ruled out by _first_stop, so only proper prefixes remain.
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

"""One log line per event, as key=value text or JSON; never an api key, and never a control
character from a client (an ANSI escape in a client_id must not repaint the operator's
terminal, a newline must not forge a line)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FORMAT = {"value": "text"}


class EventFormatter(logging.Formatter):
    def __init__(self, fmt_kind: str) -> None:
        super().__init__()
        self.kind = fmt_kind

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        base = {
            "time": stamp,
            "level": record.levelname.lower(),
            "actor": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            fields = {**fields, "error": self.formatException(record.exc_info)}
        if self.kind == "json":
            return json.dumps({**base, **fields}, default=str)
        parts = [f"{key}={_text(value)}" for key, value in {**base, **fields}.items()]
        return " ".join(parts)


def _text(value: Any) -> str:
    """A value as is when it is printable and has no space, quote, `=` or backslash; else quoted,
    with every character that is not printable (C0 and C1 controls, DEL, bidi overrides, line
    separators) escaped as JSON escapes it, so `json.loads` reads the value back."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return '"' + "".join(_escaped(c) for c in text) + '"'


def _escaped(char: str) -> str:
    if char == " " or (char.isprintable() and char not in '"\\'):
        return char
    return json.dumps(char)[1:-1]  # \" \\ \n \u001b \u009b \u202e, surrogate pairs beyond


class EventLog:
    """`log.info("session created", session_id=...)` writes one line with the fields."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc: bool = False) -> None:
        self.logger.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc=True)


def setup_logging(kind: str = "text", level: str = "info") -> None:
    _FORMAT["value"] = kind
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(kind))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

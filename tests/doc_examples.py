"""The Python examples of the README and docs, as written there: tests run them, so they stay
true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def doc_example(doc: str, after: str) -> str:
    """The first Python example after the text `after` in `doc` (README.md, docs/protocol.md)."""
    text = (REPOSITORY / doc).read_text()
    return text.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def run_example(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `code` with `args` as a user would, in a fresh interpreter; what it printed (stdout,
    then stderr). Fails the test when it exits with an error."""
    ran = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout + ran.stderr

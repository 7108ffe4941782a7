"""The actor processes the supervisor runs: starting one, its restart backoff, an engine's health,
stopping one."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..actors.logs import EventLog

log = EventLog("supervisor")

RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5
STABLE_S = 30.0  # an actor up this long has its backoff reset
MAX_BACKOFF_S = 15.0


@dataclass
class EngineHealth:
    """The engine's heartbeat: its step counter and how much work waits. No progress while work
    is pending, or no heartbeat at all, for --engine-hang-s means it is hung."""

    steps: int = -1
    pending: int = 0
    progress_at: float = field(default_factory=time.monotonic)
    heard_at: float = field(default_factory=time.monotonic)
    sessions: int = 0

    def beat(self, steps: int, pending: int, now: float) -> None:
        if steps != self.steps or pending == 0:
            self.progress_at = now
        self.steps, self.pending, self.heard_at = steps, pending, now

    def hung(self, now: float, limit_s: float) -> bool:
        silent = now - self.heard_at > limit_s
        stuck = self.pending > 0 and now - self.progress_at > limit_s
        return silent or stuck


@dataclass
class ActorProcess:
    """One actor's process: `name` is what it reports as (ready, fatal, alive)."""

    name: str
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: list[float] = field(default_factory=list)
    crashes_in_a_row: int = 0
    started: float = 0.0
    restart_at: float | None = None  # when a crashed actor is due to start again
    # `ps` shows this; the entry point maps it to the actor's module.
    process_name: str = ""
    config_path: Path | None = None

    def backoff(self) -> float:
        """Exponential with jitter, so actors that crashed together do not restart in step."""
        base = min(MAX_BACKOFF_S, 0.5 * 2.0 ** max(0, self.crashes_in_a_row - 1))
        return base * random.uniform(1.0, 1.25)

    def spawn(self, config_path: Path) -> None:
        command = [
            sys.executable,
            "-m",
            "inferencecenter.actors.run",
            self.process_name or f"inferencecenter-{self.name}",
            "--config",
            str(self.config_path or config_path),
        ]
        # A session of their own: a Ctrl-C in the terminal reaches only the supervisor, which
        # then stops the actors in order.
        self.process = subprocess.Popen(command, start_new_session=True)
        self.ready = False
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def crashed(self, now: float) -> bool:
        """Count a crash; False when it is one too many within the window (a crash loop)."""
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
        if len(self.restarts) >= MAX_RESTARTS_IN_WINDOW:
            return False
        self.restarts.append(now)
        self.ready = False
        self.crashes_in_a_row += 1
        return True

    def stop(self, deadline_s: float) -> None:
        """SIGTERM, then SIGKILL after `deadline_s`; waits for the end."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(deadline_s)
        except subprocess.TimeoutExpired:
            log.warning("actor did not stop in time, killing", actor=self.name)
            process.kill()
            process.wait()

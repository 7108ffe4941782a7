"""The supervisor: starts one OS process per actor, waits until all are ready, restarts the ones
that crash, and stops them in order (the engine first, so running streams get their `end`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq

from ..protocol import internal
from .config import Config
from .logs import EventLog

log = EventLog("supervisor")

READY_DEADLINE_S = 600.0  # loading a large model from a slow disk can take minutes
STOP_DEADLINE_S = 10.0
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5


class StartupError(Exception):
    """An actor could not start; the message is the one line to show."""


@dataclass
class ActorProcess:
    name: str
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: list[float] = field(default_factory=list)


def make_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = None
    return Path(tempfile.mkdtemp(prefix="inferencecenter-", dir=base))  # mode 0700


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.runtime_dir = make_runtime_dir()
        self.config = replace(config, runtime_dir=str(self.runtime_dir))
        self.config_path = self.runtime_dir / "config.json"
        self.config_path.write_text(self.config.to_json())
        self.actors = {name: ActorProcess(name) for name in internal.ACTORS}
        self.inbox: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(internal.endpoint(self.runtime_dir, internal.SUPERVISOR))
        self.stopping = False
        self.fatal: dict[str, str] = {}

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def spawn(self, actor: ActorProcess) -> None:
        command = [
            sys.executable,
            "-m",
            "inferencecenter.actors.run",
            f"inferencecenter-{actor.name}",
            "--config",
            str(self.config_path),
        ]
        # A session of their own: a Ctrl-C in the terminal reaches only the supervisor, which
        # then stops the actors in order.
        actor.process = subprocess.Popen(command, start_new_session=True)
        actor.ready = False

    def poll_inbox(self, timeout_ms: int) -> None:
        if not self.inbox.poll(timeout_ms):
            return
        while True:
            try:
                body = internal.unpack(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except ValueError:
                continue
            actor = self.actors.get(str(body.get("actor")))
            if actor is None:
                continue
            if body.get("op") == "ready":
                actor.ready = True
            elif body.get("op") == "fatal":
                self.fatal[actor.name] = str(body.get("message", ""))

    def wait_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while not all(self.actors[n].ready for n in names):
            if self.stopping:
                raise StartupError("stopped while starting")
            for name in names:
                process = self.actors[name].process
                assert process is not None
                if process.poll() is not None:
                    self.poll_inbox(0)
                    reason = self.fatal.get(name) or f"exited with code {process.returncode}"
                    raise StartupError(f"{name} failed to start: {reason}")
            if time.monotonic() > deadline:
                raise StartupError(f"actors not ready after {READY_DEADLINE_S:.0f} s: {names}")
            self.poll_inbox(200)

    def start(self) -> None:
        first = [n for n in internal.ACTORS if n != internal.GATEWAY]
        for name in first:
            self.spawn(self.actors[name])
        self.wait_ready(first)
        self.spawn(self.actors[internal.GATEWAY])
        self.wait_ready([internal.GATEWAY])

    def watch(self) -> int:
        """Restart crashed actors until asked to stop; give up on a crash loop."""
        while not self.stopping:
            self.poll_inbox(200)
            for actor in self.actors.values():
                assert actor.process is not None
                code = actor.process.poll()
                if code is None or self.stopping:
                    continue
                now = time.monotonic()
                actor.restarts = [t for t in actor.restarts if now - t < RESTART_WINDOW_S]
                if len(actor.restarts) >= MAX_RESTARTS_IN_WINDOW:
                    log.error("actor keeps crashing, giving up", actor=actor.name, code=code)
                    return 1
                actor.restarts.append(now)
                delay = 0.5 * 2 ** (len(actor.restarts) - 1)
                log.warning("actor exited, restarting", actor=actor.name, code=code, delay_s=delay)
                time.sleep(delay)
                self.spawn(actor)
        return 0

    def stop_actor(self, actor: ActorProcess, deadline_s: float) -> None:
        process = actor.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(deadline_s)
        except subprocess.TimeoutExpired:
            log.warning("actor did not stop in time, killing", actor=actor.name)
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Engine first (it ends running generations with `end`), then the gateway (which
        delivers them), then the rest."""
        order = [
            internal.ENGINE,
            internal.GATEWAY,
            internal.SESSIONS,
            internal.AUTH,
            internal.MONITOR,
        ]
        for name in order:
            self.stop_actor(self.actors[name], STOP_DEADLINE_S)
        self.inbox.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        code = 0
        try:
            started = time.monotonic()
            self.start()
            log.info(
                "daemon ready",
                endpoint=f"tcp://{self.config.bind}:{self.config.port}",
                metrics=f"tcp://{self.config.bind}:{self.config.metrics_port}",
                model=self.config.model,
                clients=self.config.clients,
                seconds=round(time.monotonic() - started, 2),
            )
            code = self.watch()
        except StartupError as exc:
            if not self.stopping:
                print(f"inferencecenter: {exc}", file=sys.stderr)
                code = 1
        finally:
            self.stop()
        log.info("daemon stopped", code=code)
        return code

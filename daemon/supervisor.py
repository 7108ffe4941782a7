"""The supervisor: starts one OS process per actor, waits until all are ready, restarts the ones
that crash, and stops them in order (the engine first, so running streams get their `end`)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq

from ..actors.config import Config
from ..actors.logs import EventLog
from ..protocol import internal

log = EventLog("supervisor")

READY_DEADLINE_S = 600.0  # loading a large model from a slow disk can take minutes
STOP_DEADLINE_S = 10.0
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5
STABLE_S = 30.0  # an actor up this long has its backoff reset
MAX_BACKOFF_S = 15.0


class SystemdNotifier:
    """sd_notify without a dependency: a datagram to $NOTIFY_SOCKET when systemd set one."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address

    def send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError:
            pass


class StartupError(Exception):
    """An actor could not start; the message is the one line to show."""


@dataclass
class ActorProcess:
    name: str
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: list[float] = field(default_factory=list)
    crashes_in_a_row: int = 0
    started: float = 0.0
    restart_at: float | None = None  # when a crashed actor is due to start again

    def backoff(self) -> float:
        """Exponential with jitter, so actors that crashed together do not restart in step."""
        base = min(MAX_BACKOFF_S, 0.5 * 2.0 ** max(0, self.crashes_in_a_row - 1))
        return base * random.uniform(1.0, 1.25)


@dataclass
class EngineHealth:
    """The engine's heartbeat: its step counter and how much work waits. No progress while work
    is pending, or no heartbeat at all, for --engine-hang-s means it is hung."""

    steps: int = -1
    pending: int = 0
    progress_at: float = field(default_factory=time.monotonic)
    heard_at: float = field(default_factory=time.monotonic)

    def beat(self, steps: int, pending: int, now: float) -> None:
        if steps != self.steps or pending == 0:
            self.progress_at = now
        self.steps, self.pending, self.heard_at = steps, pending, now

    def hung(self, now: float, limit_s: float) -> bool:
        silent = now - self.heard_at > limit_s
        stuck = self.pending > 0 and now - self.progress_at > limit_s
        return silent or stuck


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
        self.actors = {
            name: ActorProcess(name)
            for name in internal.ACTORS
            if name != internal.HTTP or self.config.http_port
        }
        self.inbox: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(internal.endpoint(self.runtime_dir, internal.SUPERVISOR))
        # The HTTP actor learns from here whether every actor is ready (GET /health).
        self.http_link: zmq.Socket[bytes] | None = None
        self.http_told: bool | None = None
        if internal.HTTP in self.actors:
            self.http_link = zmq.Context.instance().socket(zmq.DEALER)
            self.http_link.setsockopt(zmq.LINGER, 0)
            self.http_link.connect(internal.endpoint(self.runtime_dir, internal.HTTP))
        self.stopping = False
        self.fatal: dict[str, str] = {}
        self.engine_health = EngineHealth()
        self.notify = SystemdNotifier()

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
        actor.started = time.monotonic()
        if actor.name == internal.HTTP:
            self.http_told = None  # a new HTTP actor knows nothing yet

    def http_url(self) -> str:
        if not self.config.http_port:
            return "off"
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.config.bind}:{self.config.http_port}"

    def tell_http(self) -> None:
        """Tell the HTTP actor whether every actor is ready, when that changed."""
        ready = all(actor.ready for actor in self.actors.values())
        if self.http_link is None or ready == self.http_told:
            return
        try:
            body = {"op": "daemon_state", "ref": 0, "ready": ready}
            self.http_link.send(internal.pack(body), zmq.NOBLOCK)
        except zmq.Again:
            return
        self.http_told = ready

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
                if actor.name == internal.ENGINE:
                    self.engine_health = EngineHealth()
            elif body.get("op") == "alive" and actor.name == internal.ENGINE:
                steps, pending = int(body.get("steps", 0)), int(body.get("pending", 0))
                self.engine_health.beat(steps, pending, time.monotonic())
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
        first = [n for n in self.actors if n != internal.GATEWAY]
        for name in first:
            self.spawn(self.actors[name])
        self.wait_ready(first)
        self.spawn(self.actors[internal.GATEWAY])
        self.wait_ready([internal.GATEWAY])
        self.tell_http()

    def watch(self) -> int:
        """Restart crashed actors (backoff with jitter) until asked to stop; kill a hung engine;
        give up on a crash loop with one clear line and exit code 1."""
        while not self.stopping:
            self.poll_inbox(200)
            now = time.monotonic()
            for actor in self.actors.values():
                assert actor.process is not None
                if actor.restart_at is not None:
                    if now >= actor.restart_at and not self.stopping:
                        actor.restart_at = None
                        self.spawn(actor)
                    continue
                code = actor.process.poll()
                if code is None:
                    if actor.ready and now - actor.started > STABLE_S:
                        actor.crashes_in_a_row = 0
                    continue
                if self.stopping:
                    break
                actor.restarts = [t for t in actor.restarts if now - t < RESTART_WINDOW_S]
                if len(actor.restarts) >= MAX_RESTARTS_IN_WINDOW:
                    log.error(
                        "actor keeps crashing, giving up",
                        actor=actor.name,
                        code=code,
                        crashes=len(actor.restarts) + 1,
                        window_s=RESTART_WINDOW_S,
                    )
                    return 1
                actor.restarts.append(now)
                actor.ready = False
                actor.crashes_in_a_row += 1
                delay = actor.backoff()
                actor.restart_at = now + delay
                log.warning(
                    "actor exited, restarting", actor=actor.name, code=code, delay_s=round(delay, 2)
                )
            self.check_engine(now)
            self.tell_http()
        return 0

    def check_engine(self, now: float) -> None:
        engine = self.actors[internal.ENGINE]
        if engine.process is None or engine.restart_at is not None or not engine.ready:
            return
        hung = self.engine_health.hung(now, self.config.engine_hang_s)
        if engine.process.poll() is None and hung:
            log.error(
                "engine hung, killing it",
                pending=self.engine_health.pending,
                seconds=round(now - self.engine_health.progress_at, 1),
            )
            engine.process.kill()
            engine.ready = False
            return
        if self.engine_health.heard_at > now - 5.0:
            self.notify.send("WATCHDOG=1")  # only while the engine loop is alive

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
        self.notify.send("STOPPING=1")
        order = [
            internal.ENGINE,
            internal.GATEWAY,
            internal.HTTP,
            internal.SESSIONS,
            internal.AUTH,
            internal.MONITOR,
        ]
        for name in order:
            if name in self.actors:
                self.stop_actor(self.actors[name], STOP_DEADLINE_S)
        self.inbox.close()
        if self.http_link is not None:
            self.http_link.close()
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
                http=self.http_url(),
                model=self.config.model,
                clients=self.config.clients,
                seconds=round(time.monotonic() - started, 2),
            )
            self.notify.send(f"READY=1\nSTATUS=serving on {self.config.bind}:{self.config.port}")
            code = self.watch()
        except StartupError as exc:
            if not self.stopping:
                print(f"inferencecenter: {exc}", file=sys.stderr)
                code = 1
        finally:
            self.stop()
        log.info("daemon stopped", code=code)
        return code

"""The supervisor: starts one OS process per actor, waits until all are ready, restarts the ones
that crash, and stops them in order (the engine first, so running streams get their `end`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import zmq

from ..actors.config import Config
from ..actors.logs import EventLog
from ..protocol import internal
from .models import LOADED, LOADING, ModelEntry, ModelRegistry
from .processes import MAX_BACKOFF_S, STABLE_S, ActorProcess, EngineHealth

__all__ = ["MAX_BACKOFF_S", "ActorProcess", "EngineHealth", "StartupError", "Supervisor"]

log = EventLog("supervisor")

READY_DEADLINE_S = 600.0  # loading a large model from a slow disk can take minutes
STOP_DEADLINE_S = 10.0


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
        # The actors other than the engines (those are the model registry's, one per model).
        self.actors = {
            name: ActorProcess(name)
            for name in internal.ACTORS
            if name != internal.ENGINE and (name != internal.HTTP or self.config.http_port)
        }
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.inbox: zmq.Socket[bytes] = context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(internal.endpoint(self.runtime_dir, internal.SUPERVISOR))
        # The model registry's op table: the front actors and the sessions actor ask here.
        self.models_socket: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.models_socket.setsockopt(zmq.LINGER, 0)
        self.models_socket.bind(internal.endpoint(self.runtime_dir, internal.MODELS))
        # Model events and figures for the monitor.
        self.monitor_link: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        self.monitor_link.setsockopt(zmq.LINGER, 0)
        self.monitor_link.setsockopt(zmq.SNDHWM, 1000)
        self.monitor_link.connect(internal.endpoint(self.runtime_dir, internal.MONITOR))
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(self.models_socket, zmq.POLLIN)
        # The HTTP actor learns from here whether every actor is ready (GET /health).
        self.http_link: zmq.Socket[bytes] | None = None
        self.http_told: bool | None = None
        if internal.HTTP in self.actors:
            self.http_link = context.socket(zmq.DEALER)
            self.http_link.setsockopt(zmq.LINGER, 0)
            self.http_link.connect(internal.endpoint(self.runtime_dir, internal.HTTP))
        # SIGHUP (`systemctl reload`) makes the auth actor read the clients file again.
        self.auth_link: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        self.auth_link.setsockopt(zmq.LINGER, 0)
        self.auth_link.connect(internal.endpoint(self.runtime_dir, internal.AUTH))
        self.reload_asked = False
        # Signals also wake the poll at once (their handlers only set flags).
        self.wakeup, self.wakeup_writer = socket.socketpair()
        for end in (self.wakeup, self.wakeup_writer):
            end.setblocking(False)
        self.poller.register(self.wakeup, zmq.POLLIN)
        self.registry = ModelRegistry(self.config, self.send_to_peer, self.send_to_monitor)
        self.stopping = False
        self.started = False
        self.fatal: dict[str, str] = {}
        self.notify = SystemdNotifier()

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def on_reload_signal(self, signum: int, frame: object) -> None:
        self.reload_asked = True

    def reload_clients(self) -> None:
        """Tell the auth actor to read the clients file again (asked with SIGHUP)."""
        self.reload_asked = False
        log.info("reload asked: the clients file is read again")
        try:
            self.auth_link.send(internal.pack({"op": "reload", "ref": 0}), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reload not passed on: the auth actor is not reachable")

    def spawn(self, actor: ActorProcess) -> None:
        actor.spawn(self.config_path)
        if actor.name == internal.HTTP:
            self.http_told = None  # a new HTTP actor knows nothing yet

    def send_to_peer(self, peer: bytes, body: internal.Body) -> None:
        try:
            self.models_socket.send_multipart([peer, internal.pack(body)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone (a restarted actor asks again)
            log.debug("models reply not sent", reason=str(exc))

    def send_to_monitor(self, body: internal.Body) -> None:
        try:
            self.monitor_link.send(internal.pack(body), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the monitor is restarting: figures come again within a second

    def http_url(self) -> str:
        if not self.config.http_port:
            return "off"
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.config.bind}:{self.config.http_port}"

    def tell_http(self) -> None:
        """Tell the HTTP actor whether every actor is ready, when that changed."""
        ready = (
            self.started
            and all(actor.ready for actor in self.actors.values())
            and self.registry.serving()
        )
        if self.http_link is None or ready == self.http_told:
            return
        try:
            body = {"op": "daemon_state", "ref": 0, "ready": ready}
            self.http_link.send(internal.pack(body), zmq.NOBLOCK)
        except zmq.Again:
            return
        self.http_told = ready

    def poll_inbox(self, timeout_ms: int) -> None:
        """Reports of the actors (ready, fatal, heartbeats) and the model registry's ops."""
        if not self.poller.poll(timeout_ms):
            return
        try:
            while self.wakeup.recv(64):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                body = internal.unpack(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            except ValueError:
                continue
            actor = self.actors.get(str(body.get("actor")))
            if actor is None:
                self.registry.on_report(body)
            elif body.get("op") == "ready":
                actor.ready = True
            elif body.get("op") == "fatal":
                self.fatal[actor.name] = str(body.get("message", ""))
        while True:
            try:
                frames = self.models_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                continue
            try:
                request = internal.unpack(frames[1])
            except ValueError:
                continue
            self.registry.handle(frames[0], request)

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

    def wait_loaded(self, entry: ModelEntry) -> None:
        """A model loaded at start: the default one must load; another that cannot is left
        available, with a warning."""
        deadline = time.monotonic() + READY_DEADLINE_S
        while entry.state == LOADING:
            if self.stopping:
                raise StartupError("stopped while starting")
            if time.monotonic() > deadline:
                raise StartupError(f"model {entry.name} not loaded after {READY_DEADLINE_S:.0f} s")
            self.poll_inbox(200)
            self.registry.poll(time.monotonic())
        if entry.state == LOADED:
            return
        if entry.name == self.registry.default:
            raise StartupError(entry.error or f"model {entry.name} failed to load")
        log.warning("model not loaded at start", model=entry.name, reason=entry.error)

    def start(self) -> None:
        """The actors but the gateway; then the models given with --model, one after the other
        (each engine times its decode steps at start, alone); then the gateway, which binds the
        frontend: the first `pong` means the daemon serves."""
        first = [n for n in self.actors if n != internal.GATEWAY]
        for name in first:
            self.spawn(self.actors[name])
        self.wait_ready(first)
        for name in self.registry.start_at_launch():
            entry = self.registry.models[name]
            if entry.state != LOADED:
                self.registry.start_load(entry)
                self.wait_loaded(entry)
        self.spawn(self.actors[internal.GATEWAY])
        self.wait_ready([internal.GATEWAY])
        self.started = True
        self.tell_http()

    def watch(self) -> int:
        """Restart crashed actors (backoff with jitter) until asked to stop; the registry does
        the same for engines (and kills a hung one); give up on a crash loop of an actor with
        one clear line and exit code 1."""
        while not self.stopping:
            self.poll_inbox(200)
            now = time.monotonic()
            self.registry.poll(now)
            if self.reload_asked:
                self.reload_clients()
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
                if not actor.crashed(now):
                    log.error(
                        "actor keeps crashing, giving up",
                        actor=actor.name,
                        code=code,
                        crashes=len(actor.restarts) + 1,
                    )
                    return 1
                delay = actor.backoff()
                actor.restart_at = now + delay
                log.warning(
                    "actor exited, restarting", actor=actor.name, code=code, delay_s=round(delay, 2)
                )
            if self.registry.heartbeats_fresh(now):
                self.notify.send("WATCHDOG=1")  # only while the engines' loops are alive
            self.tell_http()
        return 0

    def stop(self) -> None:
        """Engines first (each ends its running generations with `end`), then the gateway
        (which delivers them), then the rest."""
        self.notify.send("STOPPING=1")
        self.registry.stop_all(STOP_DEADLINE_S)
        order = [
            internal.GATEWAY,
            internal.HTTP,
            internal.SESSIONS,
            internal.AUTH,
            internal.MONITOR,
        ]
        for name in order:
            if name in self.actors:
                self.actors[name].stop(STOP_DEADLINE_S)
        links = (self.monitor_link, self.http_link, self.auth_link)
        for sock in (self.inbox, self.models_socket, *links):
            if sock is not None:
                sock.close()
        signal.set_wakeup_fd(-1)
        self.wakeup.close()
        self.wakeup_writer.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGHUP, self.on_reload_signal)
        signal.set_wakeup_fd(self.wakeup_writer.fileno(), warn_on_full_buffer=False)
        code = 0
        try:
            started = time.monotonic()
            self.start()
            log.info(
                "daemon ready",
                endpoint=f"tcp://{self.config.bind}:{self.config.port}",
                metrics=f"tcp://{self.config.bind}:{self.config.metrics_port}",
                http=self.http_url(),
                models=",".join(
                    name for name, e in self.registry.models.items() if e.state == LOADED
                ),
                default=self.registry.default,
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

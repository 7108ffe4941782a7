"""Who may subscribe to metrics under --curve: a ZAP handler in the monitor's process.

PROTOCOL.md: a client "uses any keypair of its own", so by default any CURVE peer that knows the
server's public key subscribes (the stream is encrypted; a plaintext peer gets nothing). With
--metrics-clients-only only the CURVE keys of clients-file entries that carry a
`curve_public_key` do: the clients file is re-read when it changes, as the auth actor does, so a
new entry needs no restart.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from ..protocol import clientsfile, curve
from .config import Config
from .logs import EventLog
from .zap import Handshake, Verdict, ZapHandler

log = EventLog("monitor")

ZAP_DOMAIN = "metrics"


def any_curve_key(handshake: Handshake) -> Verdict:
    """PROTOCOL.md's rule: any keypair (CURVE itself has checked the peer knows the server key)."""
    if handshake.mechanism == "CURVE" and handshake.curve_key:
        return Verdict(True, user_id=handshake.curve_key)
    return Verdict(False, "metrics need CURVE")


class MetricsKeys:
    """The CURVE public keys allowed to subscribe, from the clients file (last good version)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = -1
        self.keys: frozenset[str] = frozenset()
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            mtime_ns = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime_ns == self._mtime_ns:
            return
        self._mtime_ns = mtime_ns
        try:
            entries = clientsfile.load(self.path)
        except clientsfile.ClientsFileError as exc:
            log.error("clients file not reloaded for metrics access", reason=str(exc))
            return
        self.keys = frozenset(e.curve_public_key for e in entries if e.curve_public_key)

    def decide(self, handshake: Handshake) -> Verdict:
        self.reload_if_changed()
        if handshake.curve_key and handshake.curve_key in self.keys:
            return Verdict(True, user_id=handshake.curve_key)
        return Verdict(False, "this CURVE key may not subscribe to metrics")


def open_metrics_socket(config: Config) -> tuple[zmq.Socket[bytes], ZapHandler | None]:
    """The PUB socket, bound; under --curve a CURVE server whose subscribers the returned ZAP
    handler (bound first, to be run by the caller) checks."""
    zap = None
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    if config.curve:
        zap = ZapHandler(
            MetricsKeys(Path(config.clients)).decide
            if config.metrics_clients_only
            else any_curve_key
        )
        public, secret = curve.load_server_cert(Path(config.server_cert))
        curve.apply_server(sock, public, secret, ZAP_DOMAIN)
    return sock, zap

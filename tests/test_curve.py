"""--curve: the frontend and metrics under CurveZMQ, the server's identity, keys bound to clients,
and the refusal to serve a network in clear."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import zmq
import zmq.utils.z85

from inferencecenter.actors.config import ConfigError, _check_curve
from inferencecenter.actors.metrics_access import MetricsKeys, any_curve_key
from inferencecenter.actors.zap import Handshake, Verdict
from inferencecenter.actors.zap import parse_request as parse_zap
from inferencecenter.actors.zap import reply_frames as zap_reply
from inferencecenter.clients import AsyncClient, AuthFailed, Client
from inferencecenter.clients.metrics import MetricsSubscriber
from inferencecenter.daemon.testing import (
    TEST_CLIENTS,
    Daemon,
    RawClient,
    free_ports,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import clientsfile, curve

NOTHING_WITHIN_MS = 3_000  # a refused peer must get nothing in this long (replies take ~10 ms)
PROMPT = "The zebra-quartz-marmalade password is"


def _bound_entry() -> tuple[clientsfile.ClientEntry, tuple[bytes, bytes]]:
    public, secret = zmq.curve_keypair()
    entry = clientsfile.ClientEntry(
        "dave", "dave-key-0123456789-abcdefghijklmnopq", 2, curve_public_key=public.decode()
    )
    return entry, (public, secret)


@pytest.fixture(scope="module")
def bound() -> tuple[clientsfile.ClientEntry, tuple[bytes, bytes]]:
    return _bound_entry()


@pytest.fixture(scope="module")
def curved(
    tmp_path_factory: pytest.TempPathFactory,
    bound: tuple[clientsfile.ClientEntry, tuple[bytes, bytes]],
) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("curve"), "--curve")
    # dave is bound to its own CURVE key; the daemon re-reads the file.
    clientsfile.save(running.clients_path, [*TEST_CLIENTS, bound[0]])
    yield running
    assert stop_daemon(running.process) == 0, running.log()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("plain"))
    yield running
    assert stop_daemon(running.process) == 0, running.log()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _auth_and_infer(daemon: Daemon, **keys: object) -> str:
    with Client(daemon.endpoint, daemon.client_id, daemon.api_key, **keys) as client:  # type: ignore[arg-type]
        with client.create_session() as session:
            return session.infer(PROMPT, max_tokens=4, temp=0).wait()


def _capture(daemon: Daemon, tmp: Path, **keys: object) -> bytes:
    """Loopback packets to and from the daemon's frontend during one auth + infer."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        return _capture_raw(daemon, **keys)
    pcap = tmp / f"{_port(daemon.endpoint)}.pcap"
    process = subprocess.Popen(
        [
            tcpdump,
            "-i",
            "lo",
            "-U",
            "--immediate-mode",  # each packet at once, not in blocks that SIGINT would lose
            "-Z",
            "root",  # keep writing to the test's private folder
            "-s",
            "0",
            "-w",
            str(pcap),
            f"tcp port {_port(daemon.endpoint)}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # "listening on lo, ..." once it captures
        if "listening" not in line:
            process.wait(10)
            pytest.skip(f"tcpdump cannot capture here: {line.strip()}")
        _auth_and_infer(daemon, **keys)
    finally:
        process.send_signal(signal.SIGINT)  # tcpdump writes what it holds and exits
        process.wait(20)
    data = pcap.read_bytes()
    assert len(data) > 1000, "the capture holds no traffic"
    return data


ETH_P_ALL = 0x0003


def _capture_raw(daemon: Daemon, **keys: object) -> bytes:
    """The same capture where tcpdump is not installed: a packet socket on `lo` (root only),
    keeping the TCP segments to and from the daemon's frontend."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind(("lo", 0))
    except (AttributeError, OSError) as exc:
        pytest.skip(f"neither tcpdump nor a packet socket to capture with: {exc}")
    port = _port(daemon.endpoint).to_bytes(2, "big")
    kept: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                frame = sock.recv(1 << 16)
            except TimeoutError:
                continue
            ip = frame[14:]  # lo's frames: a 14-byte Ethernet header of zeros, then IPv4
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
                continue
            tcp = ip[(ip[0] & 0x0F) * 4 :]
            if port in (tcp[0:2], tcp[2:4]):
                kept.append(frame)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _auth_and_infer(daemon, **keys)
    finally:
        stop.set()
        reader.join(5)
        sock.close()
    data = b"".join(kept)
    assert len(data) > 1000, "the capture holds no traffic"
    return data


def test_a_sniffer_reads_key_and_prompt_in_clear_but_not_under_curve(
    curved: Daemon, plain: Daemon, tmp_path: Path
) -> None:
    clear = _capture(plain, tmp_path)
    assert plain.api_key.encode() in clear
    assert PROMPT.encode() in clear
    hidden = _capture(curved, tmp_path, curve_serverkey=curved.server_key)
    assert curved.api_key.encode() not in hidden
    assert PROMPT.encode() not in hidden
    assert b"auth_success" not in hidden


def test_plaintext_and_wrong_server_key_get_nothing(curved: Daemon) -> None:
    impostor_key, _ = zmq.curve_keypair()  # a daemon we do not hold the secret of
    for keys in (None, curve.client_curve(impostor_key)):
        stranger = RawClient(curved.endpoint, keys)
        try:
            stranger.send({"op": "ping", "id": 1})
            stranger.send({"op": "auth", "client_id": "alice", "api_key": curved.api_key})
            with pytest.raises(TimeoutError):
                stranger.recv(NOTHING_WITHIN_MS)
        finally:
            stranger.close()
    right = RawClient(curved.endpoint, curved.client_keys())
    try:
        assert right.request({"op": "ping"})["op"] == "pong"
        right.auth(curved.client_id, curved.api_key)
    finally:
        right.close()


def test_a_client_with_the_wrong_server_key_times_out_in_the_library(curved: Daemon) -> None:
    impostor_key, _ = zmq.curve_keypair()
    with pytest.raises(TimeoutError):
        Client(
            curved.endpoint,
            curved.client_id,
            curved.api_key,
            connect_timeout=NOTHING_WITHIN_MS / 1000,
            curve_serverkey=impostor_key,
        )


def test_a_bound_client_authenticates_only_with_its_own_key(
    curved: Daemon, bound: tuple[clientsfile.ClientEntry, tuple[bytes, bytes]]
) -> None:
    entry, keypair = bound
    with Client(
        curved.endpoint,
        entry.client_id,
        entry.api_key,
        curve_serverkey=curved.server_key,
        curve_keypair=keypair,
    ) as client:
        assert client.client_id == "dave"
    with pytest.raises(AuthFailed):
        Client(curved.endpoint, entry.client_id, entry.api_key, curve_serverkey=curved.server_key)
    other = zmq.curve_keypair()
    with pytest.raises(AuthFailed):
        Client(
            curved.endpoint,
            entry.client_id,
            entry.api_key,
            curve_serverkey=curved.server_key,
            curve_keypair=other,
        )


def _metrics_seen_by(daemon: Daemon, keypair: tuple[bytes, bytes] | None) -> bool:
    """Whether a subscriber with `keypair` (None: in plaintext) gets the `metrics` topic, which
    goes out once a second, within NOTHING_WITHIN_MS."""
    subscriber = MetricsSubscriber(
        daemon.metrics_endpoint,
        timeout=NOTHING_WITHIN_MS / 1000,
        curve_serverkey=None if keypair is None else daemon.server_key,
        curve_keypair=keypair,
    )
    try:
        topic, body = subscriber.receive()
    except TimeoutError:
        return False
    finally:
        subscriber.close()
    assert topic == "metrics" and "inference" in body
    return True


def test_metrics_reach_any_curve_keypair_and_no_plaintext_peer(curved: Daemon) -> None:
    assert _metrics_seen_by(curved, zmq.curve_keypair())  # PROTOCOL.md: any keypair of its own
    assert not _metrics_seen_by(curved, None)


def test_metrics_clients_only_admits_only_the_clients_files_keys(tmp_path: Path) -> None:
    entry, keypair = _bound_entry()
    daemon = start_daemon(tmp_path, "--curve", "--metrics-clients-only")
    try:
        clientsfile.save(daemon.clients_path, [*TEST_CLIENTS, entry])  # re-read at once
        assert _metrics_seen_by(daemon, keypair)
        assert not _metrics_seen_by(daemon, zmq.curve_keypair())
        assert not _metrics_seen_by(daemon, None)
    finally:
        assert stop_daemon(daemon.process) == 0, daemon.log()


def test_the_cli_on_the_daemons_host_finds_the_server_key(curved: Daemon) -> None:
    env = {
        **os.environ,
        "INFERENCECENTER_CLIENTS": str(curved.clients_path),
        "INFERENCECENTER_CLIENT_ID": curved.client_id,
        "INFERENCECENTER_API_KEY": curved.api_key,
    }
    env.pop("INFERENCECENTER_SERVER_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "sessions", "--endpoint", curved.endpoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert curved.api_key not in done.stdout + done.stderr


def test_binding_a_network_address_in_clear_is_refused_in_one_line(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clientsfile.save(clients, list(TEST_CLIENTS))
    port, metrics_port = free_ports(2)
    command = [
        sys.executable,
        "-m",
        "inferencecenter.daemon",
        "serve",
        "--bind",
        "0.0.0.0",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--http-port",
        "0",
        "--clients",
        str(clients),
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--curve" in lines[0] and "--insecure-plaintext" in lines[0]
    assert time.monotonic() - started < 60


def _curve_args(tmp: Path, **given: object) -> argparse.Namespace:
    values = {
        "curve": True,
        "server_cert": None,
        "metrics_clients_only": False,
        "bind": "127.0.0.1",
        "insecure_plaintext": False,
    }
    values.update(given)
    return argparse.Namespace(**values)


def test_the_server_certificate_is_made_once_private_and_kept(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    path = Path(_check_curve(_curve_args(tmp_path), clients))
    assert path == (tmp_path / "server.key_secret").resolve()
    assert path.stat().st_mode & 0o777 == 0o600
    public, _ = curve.load_server_cert(path)
    assert curve.read_public_key(str(tmp_path / "server.key")) == public
    assert "secret-key" not in (tmp_path / "server.key").read_text()
    _check_curve(_curve_args(tmp_path), clients)  # a second start keeps the same identity
    assert curve.load_server_cert(path)[0] == public
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        _check_curve(_curve_args(tmp_path), clients)


def test_loopback_binds_need_no_flag_and_others_do(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    for bind in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert _check_curve(_curve_args(tmp_path, curve=False, bind=bind), clients) == ""
    for bind in ("0.0.0.0", "192.168.1.10", "*", "eth0"):
        with pytest.raises(ConfigError, match="--insecure-plaintext"):
            _check_curve(_curve_args(tmp_path, curve=False, bind=bind), clients)
        assert (
            _check_curve(
                _curve_args(tmp_path, curve=False, bind=bind, insecure_plaintext=True), clients
            )
            == ""
        )


def test_the_trio_client_speaks_curve(curved: Daemon) -> None:
    async def main() -> str:
        async with AsyncClient(
            curved.endpoint,
            curved.client_id,
            curved.api_key,
            curve_serverkey=curved.server_key.decode(),
        ) as client:
            session = await client.create_session()
            try:
                return await session.infer(PROMPT, max_tokens=2, temp=0).wait()
            finally:
                await session.close()

    assert isinstance(trio.run(main), str)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keygen_binds_a_new_client_to_its_own_certificate(curved: Daemon, tmp_path: Path) -> None:
    made = _cli(
        "keygen", "erin", "--clients", str(curved.clients_path), "--curve-cert-dir", str(tmp_path)
    )
    assert made.returncode == 0, made.stderr
    api_key = next(
        line.split(": ", 1)[1] for line in made.stdout.splitlines() if line.startswith("api_key:")
    )
    cert = tmp_path / "erin.key_secret"
    assert cert.stat().st_mode & 0o777 == 0o600
    env = {"INFERENCECENTER_CLIENT_ID": "erin", "INFERENCECENTER_API_KEY": api_key}
    # `=`: a Z85 key may start with "-", which argparse would take for an option.
    common = [
        "sessions",
        "--endpoint",
        curved.endpoint,
        f"--server-key={curved.server_key.decode()}",
    ]
    with_cert = _cli(*common, "--curve-cert", str(cert), env=env)
    assert with_cert.returncode == 0, with_cert.stderr
    without = _cli(*common, env=env)
    assert without.returncode != 0 and "auth_failed" in without.stderr, without.stderr
    assert api_key not in without.stderr + with_cert.stderr


def test_a_zap_request_gives_the_peers_address_and_curve_key() -> None:
    public, _ = zmq.curve_keypair()
    raw = zmq.utils.z85.decode(public)
    frames = [b"1.0", b"7", b"frontend", b"10.0.0.5", b"", b"CURVE", raw]
    request_id, handshake = parse_zap(frames)
    assert request_id == b"7"
    assert handshake == Handshake("frontend", "10.0.0.5", "CURVE", public.decode())
    assert zap_reply(b"7", Verdict(True, user_id=public.decode()))[2:5] == [b"200", b"OK", public]
    assert zap_reply(b"7", Verdict(False, "no"))[2] == b"400"
    with pytest.raises(ValueError):
        parse_zap([b"2.0", b"7", b"frontend", b"10.0.0.5", b"", b"NULL"])


def test_metrics_keys_are_the_entries_curve_keys(tmp_path: Path) -> None:
    entry, (public, _) = _bound_entry()
    clients = tmp_path / "clients.json"
    clientsfile.save(clients, [*TEST_CLIENTS, entry])
    keys = MetricsKeys(clients)
    assert keys.decide(Handshake("metrics", "10.0.0.5", "CURVE", public.decode())).ok
    other, _ = zmq.curve_keypair()
    assert not keys.decide(Handshake("metrics", "10.0.0.5", "CURVE", other.decode())).ok
    assert not keys.decide(Handshake("metrics", "10.0.0.5", "NULL", "")).ok
    assert any_curve_key(Handshake("metrics", "10.0.0.5", "CURVE", other.decode())).ok
    assert not any_curve_key(Handshake("metrics", "10.0.0.5", "NULL", "")).ok


def test_a_clients_file_entry_with_a_malformed_curve_key_is_refused(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    entry, _ = _bound_entry()
    clientsfile.save(clients, [entry])
    text = clients.read_text().replace(entry.curve_public_key, "not-a-key")
    clients.write_text(text)
    with pytest.raises(clientsfile.ClientsFileError, match="curve_public_key"):
        clientsfile.load(clients)

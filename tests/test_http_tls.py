"""HTTPS: --tls-cert/--tls-key make the HTTP port serve TLS (hypercorn's), checked against the
certificate by curl, the openai package and a wss:// WebSocket; bad TLS flags stop `serve` with
one line."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from websockets.sync.client import connect

from inferencecenter.daemon.testing import Daemon, start_daemon, stop_daemon


def self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp)
    daemon = start_daemon(
        tmp,
        "--batch-padding",
        "off",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        http=True,
    )
    daemon.extra["cert"] = cert
    yield daemon
    code = stop_daemon(daemon.process)
    assert code == 0, daemon.log()


def test_https_serves_the_api_checked_against_the_certificate(tls_daemon: Daemon) -> None:
    cert = str(tls_daemon.extra["cert"])
    assert tls_daemon.http_url.startswith("https://")
    result = subprocess.run(
        ["curl", "-s", "--cacert", cert, f"{tls_daemon.http_url}/health"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(result.stdout) == {"status": "ok"}, result.stderr
    client = openai.OpenAI(
        base_url=f"{tls_daemon.http_url}/v1",
        api_key=tls_daemon.api_key,
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert)),
        max_retries=0,
    )
    reply = client.completions.create(model="gemma-3-270m-q4_k_m", prompt="Hi", max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    plain = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://127.0.0.1:{tls_daemon.http_port}/health",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.stdout != "200"  # no plain HTTP on a TLS port


def test_wss_runs_the_websocket_protocol(tls_daemon: Daemon) -> None:
    context = ssl.create_default_context(cafile=str(tls_daemon.extra["cert"]))
    with connect(f"wss://127.0.0.1:{tls_daemon.http_port}/ws", ssl=context) as ws:
        ws.send(json.dumps({"op": "auth", "client_id": "alice", "api_key": tls_daemon.api_key}))
        assert json.loads(ws.recv(timeout=30))["op"] == "auth_success"


@pytest.mark.parametrize(
    "flags",
    [
        ["--tls-cert", "{cert}"],
        ["--tls-cert", "{cert}", "--tls-key", "{missing}"],
        ["--tls-cert", "{key}", "--tls-key", "{key}"],
        ["--tls-cert", "{cert}", "--tls-key", "{key}", "--http-port", "0"],
    ],
)
def test_bad_tls_flags_stop_serve_with_one_line(tmp_path: Path, flags: list[str]) -> None:
    cert, key = self_signed(tmp_path)
    paths = {"cert": cert, "key": key, "missing": tmp_path / "nope.pem"}
    args = [flag.format(**paths) for flag in flags]
    result = subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls" in lines[0], result.stderr

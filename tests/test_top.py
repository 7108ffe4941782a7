"""`inferencecenter top`: the dashboard's drawing from hand-made bodies, then the real command."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rich.console import Console

from inferencecenter.clients import MetricsSubscriber
from inferencecenter.clients.top import EVENTS_SHOWN, DashboardState, render, sparkline
from inferencecenter.daemon.testing import Daemon

ENDPOINT = "tcp://192.0.2.7:5556"
T0 = 1_795_323_400.0
DEADLINE_S = 60.0
COLUMNS, LINES = 100, 40
# What a terminal shows once escape sequences (colours, cursor moves, screen switches) are gone.
ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>])")
CPU_FIGURE = re.compile(r"CPU [█▏▎▍▌▋▊▉░]+ +\d+\.\d%")


def screen(state: DashboardState, now: float) -> str:
    console = Console(file=io.StringIO(), record=True, width=COLUMNS, color_system=None)
    console.print(render(state, now=now))
    return console.export_text()


def metrics_body(second: int, tps: float, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """A hand-made `metrics` body as the monitor publishes it, `second` after T0."""
    return {
        "timestamp": T0 + second,
        "gpu": gpu,
        "host": {"cpu_percent": 37.5, "ram_total_mb": 7936.0, "ram_used_mb": 3210.4},
        "inference": {
            "active_generations": 3,
            "queued": 1,
            "total_sessions": 5,
            "last_tps": 21.4,
            "last_ttft_ms": 48.2,
            "total_tokens_generated": 12345,
            "tokens_per_second": tps,
        },
    }


GTX_1060: dict[str, Any] = {
    "name": "NVIDIA GeForce GTX 1060 3GB",
    "temp": 71,
    "vram_total_mb": 3072.0,
    "vram_used_mb": 2500.5,
    "vram_free_mb": 571.5,
    "power_watts": 88.123,
    "fan_percent": 45,
    "utilization_percent": 97,
    "throttling": True,
}


# ---- unit: DashboardState and render on hand-made bodies (pure logic, no daemon) ---------


def test_unit_dashboard_shows_host_and_inference_figures_without_a_gpu() -> None:
    state = DashboardState(ENDPOINT, started=T0)
    for second in range(5):
        state.ingest("metrics", metrics_body(second, tps=10.0 * second), received=T0 + second)
    text = screen(state, now=T0 + 4.5)

    last = time.strftime("%H:%M:%S", time.localtime(T0 + 4))
    assert f"{ENDPOINT}  last metrics {last}" in text
    assert "no NVIDIA GPU" in text
    assert re.search(r"CPU [█▏▎▍▌▋▊▉░]+ +37\.5%", text)
    assert "3.1 / 7.8 GiB" in text
    for figure in (
        "active generations 3",
        "queued 1",
        "sessions 5",
        "total tokens 12,345",
        "tokens/s now 40.0",
        "last tps 21.4",
        "last TTFT 48 ms",
        "peak 40.0",
    ):
        assert figure in text, figure
    assert "▁▃▅▆█" in text  # 0, 10, 20, 30, 40 tokens/s, scaled to the peak
    assert "none yet" in text  # no events


def test_unit_dashboard_shows_a_gpu() -> None:
    state = DashboardState(ENDPOINT, started=T0)
    state.ingest("metrics", metrics_body(0, tps=5.0, gpu=GTX_1060), received=T0)
    text = screen(state, now=T0 + 0.5)

    assert "GPU NVIDIA GeForce GTX 1060 3GB" in text
    assert re.search(r"VRAM [█▏▎▍▌▋▊▉░]+ +2\.4 / 3\.0 GiB", text)
    assert re.search(r"util [█▏▎▍▌▋▊▉░]+ +97%", text)
    assert "temp 71 °C" in text
    assert "power 88.1 W" in text
    assert "fan 45%" in text
    assert "throttling YES" in text
    assert "no NVIDIA GPU" not in text


def test_unit_fields_a_gpu_does_not_report_show_as_dashes() -> None:
    gpu = {key: None for key in GTX_1060}
    body = metrics_body(0, tps=0.0, gpu=gpu)
    body["host"] = {"cpu_percent": "high"}  # a wrong type is not a figure either
    state = DashboardState(ENDPOINT, started=T0)
    state.ingest("metrics", body, received=T0)
    text = screen(state, now=T0)
    assert "temp - " in text and "power -" in text and "fan -" in text
    assert "throttling -" in text
    assert re.search(r"CPU ░+ +- ", text)


def test_unit_recent_events_keep_the_last_few_and_other_topics_are_ignored() -> None:
    state = DashboardState(ENDPOINT, started=T0)
    state.ingest("metrics", metrics_body(0, tps=0.0), received=T0)
    for n in range(EVENTS_SHOWN + 2):
        state.ingest(
            "event.session",
            {
                "timestamp": T0 + n,
                "kind": "created",
                "session_id": f"s-{n:02d}",
                "client_id": "alice",
                "model": "gemma-3-270m-q4_k_m",
            },
        )
    state.ingest(
        "event.alert",
        {"timestamp": T0 + 20, "kind": "gpu_hot", "message": "GPU at 86 °C", "level": "warning"},
    )
    state.ingest("gossip", {"timestamp": T0 + 21, "kind": "ignored"})
    text = screen(state, now=T0 + 0.5)

    assert "s-00" not in text and "s-01" not in text and "s-02" not in text  # scrolled away
    at = time.strftime("%H:%M:%S", time.localtime(T0 + 9))
    assert re.search(
        at + r" +event\.session +created session_id=s-09 client_id=alice model=gemma-3-270m", text
    )
    at = time.strftime("%H:%M:%S", time.localtime(T0 + 20))
    assert re.search(at + r" +event\.alert +warning gpu_hot: GPU at 86 °C", text)
    assert "gossip" not in text and "ignored" not in text


def test_unit_header_waits_then_says_when_the_stream_stops() -> None:
    state = DashboardState(ENDPOINT, started=T0)
    assert f"waiting for metrics from {ENDPOINT} (7 s)" in screen(state, now=T0 + 7)
    assert "tokens/s" not in screen(state, now=T0 + 7)  # no figures before there are any

    state.ingest("metrics", metrics_body(0, tps=1.0), received=T0 + 8)
    assert "last metrics" in screen(state, now=T0 + 9)
    last = time.strftime("%H:%M:%S", time.localtime(T0))
    assert f"no metrics for 12 s (last at {last})" in screen(state, now=T0 + 20)


def test_unit_throughput_history_covers_the_last_minute() -> None:
    state = DashboardState(ENDPOINT, started=T0)
    for second in range(90):
        state.ingest("metrics", metrics_body(second, tps=float(second)), received=T0 + second)
    assert [tps for _, tps in state.throughput] == [float(s) for s in range(30, 90)]
    assert sparkline([0.0, 7.0, 3.5], 5) == "  ▁█▅"
    assert sparkline([0.0, 0.0], 2) == "▁▁"
    assert sparkline([], 3) == "   "


# ---- the command against the real daemon ------------------------------------------------


def top_command(daemon: Daemon, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "inferencecenter.daemon",
        "top",
        "--metrics-endpoint",
        daemon.metrics_endpoint,
        *extra,
    ]


@pytest.fixture(scope="module")
def published(daemon: Daemon) -> dict[str, Any]:
    """One metrics body straight from the stream, to know what top should draw."""
    with MetricsSubscriber(daemon.metrics_endpoint, timeout=DEADLINE_S) as subscriber:
        return subscriber.receive()[1]


def take_terminal() -> None:
    """In the child: make the pty (already its stdin) the controlling terminal, so that ^C
    typed on it is SIGINT; and let SIGINT interrupt, which a shell without job control
    (a background job, some CI runners) may have set to be ignored."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A process on a pseudo-terminal of COLUMNS x LINES, and everything it has drawn."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm-256color"},
            start_new_session=True,
            preexec_fn=take_terminal,
        )
        os.close(slave)
        self.master = master
        self.drawn = b""

    def read(self, timeout: float) -> bool:
        """Take what is there within `timeout` seconds; False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0.0))
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 1 << 16)
        except OSError:  # EIO: the process closed its side
            return False
        self.drawn += chunk
        return bool(chunk)

    def frames(self) -> list[str]:
        """The screens drawn completely so far, escape sequences removed. Each redraw starts
        at home, so a screen is complete once the next one has begun."""
        text = self.drawn.decode("utf-8", errors="replace")
        return [ESCAPE.sub("", frame) for frame in text.split("\x1b[H")[:-1]]

    def wait_for_frame(self, check: Callable[[str], bool], deadline_s: float) -> str:
        end = time.monotonic() + deadline_s
        while True:
            for frame in self.frames():
                if check(frame):
                    return frame
            remaining = end - time.monotonic()
            if remaining <= 0 or not self.read(remaining):
                last = (self.frames() or ["(none)"])[-1]
                pytest.fail(f"no such frame within {deadline_s:g}s; the last one:\n{last}")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_exit(self, deadline_s: float) -> int:
        end = time.monotonic() + deadline_s
        while self.read(end - time.monotonic()) and time.monotonic() < end:
            pass  # keep draining, so the process never blocks on a full terminal
        return self.process.wait(max(end - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal(daemon: Daemon) -> Iterator[Terminal]:
    term = Terminal(top_command(daemon))
    yield term
    term.close()


def test_top_draws_the_live_stream_in_a_terminal_and_leaves_on_ctrl_c(
    terminal: Terminal, published: dict[str, Any]
) -> None:
    gpu = published["gpu"]
    gpu_text = "no NVIDIA GPU" if gpu is None else f"GPU {gpu['name']}"
    ram_total = f"/ {published['host']['ram_total_mb'] / 1024:.1f} GiB"

    frame = terminal.wait_for_frame(
        lambda f: "tokens/s now" in f and gpu_text in f and ram_total in f, DEADLINE_S
    )
    assert CPU_FIGURE.search(frame), frame
    assert "last metrics" in frame
    assert "recent events" in frame
    assert any("waiting for metrics from" in f for f in terminal.frames())  # the first frame

    terminal.type(b"\x03")  # Ctrl-C
    assert terminal.wait_exit(DEADLINE_S) == 0
    assert terminal.drawn.endswith(b"\x1b[?1049l")  # the user's screen is given back


def test_top_once_prints_one_frame_and_exits(daemon: Daemon) -> None:
    done = subprocess.run(
        top_command(daemon, "--once", "--no-color"),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("inferencecenter top") == 1
    assert "\x1b" not in done.stdout
    assert "tokens/s now" in done.stdout
    assert CPU_FIGURE.search(done.stdout), done.stdout

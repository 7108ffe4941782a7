"""`inferencecenter top`: a live terminal dashboard drawn from the daemon's metrics stream."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from .metrics import DEFAULT_TIMEOUT, MetricsSubscriber

# `event.` is a prefix: it takes every event topic, those the daemon adds later included.
TOPICS = ("metrics", "event.")
HISTORY_S = 60.0
EVENTS_SHOWN = 8
# Metrics come once a second: after three missed beats the header says the stream stopped.
STALE_S = 3.0
# Redraw at least this often while nothing arrives, so the "no metrics for N s" count moves.
REDRAW_S = 1.0

SPARK_CHARS = "▁▂▃▄▅▆▇█"
BAR_FULL = "█"
BAR_EMPTY = "░"
BAR_EIGHTHS = " ▏▎▍▌▋▊▉"
BAR_WIDTH = (8, 30)


class Event(NamedTuple):
    when: float
    topic: str
    body: dict[str, Any]


class DashboardState:
    """What the dashboard shows, built from (topic, body) messages; `render` draws it.

    Bodies come from the network: nothing here trusts a field to be there or to have a type.
    """

    def __init__(self, endpoint: str, started: float | None = None) -> None:
        self.endpoint = endpoint
        self.started = time.time() if started is None else started
        self.metrics: dict[str, Any] | None = None
        self.metrics_received: float | None = None
        # (daemon timestamp, tokens per second), the last HISTORY_S seconds of them.
        self.throughput: deque[tuple[float, float]] = deque()
        self.events: deque[Event] = deque(maxlen=EVENTS_SHOWN)

    def ingest(self, topic: str, body: dict[str, Any], received: float | None = None) -> None:
        """Take one message; `received` is when it arrived (default: now)."""
        received = time.time() if received is None else received
        stamp = number(body.get("timestamp"))
        when = received if stamp is None else stamp
        if topic == "metrics":
            self.metrics = body
            self.metrics_received = received
            tps = number(section(body, "inference").get("tokens_per_second"))
            if self.throughput and when < self.throughput[-1][0]:
                self.throughput.clear()  # the daemon's clock went back (a restart, a new host)
            if tps is not None:
                self.throughput.append((when, tps))
            while self.throughput and self.throughput[0][0] <= when - HISTORY_S:
                self.throughput.popleft()
        elif topic.startswith("event."):
            self.events.append(Event(when, topic, body))
        # Any other topic is ignored, as the protocol asks of subscribers.


# ---- reading bodies ----


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def section(body: dict[str, Any], name: str) -> dict[str, Any]:
    part = body.get(name)
    return part if isinstance(part, dict) else {}


def show(value: Any, unit: str = "", digits: int = 1) -> str:
    """A figure with its unit, `-` when the daemon did not report it."""
    figure = number(value)
    if figure is None:
        return "-"
    if digits == 0 or isinstance(value, int):
        return f"{round(figure):,}{unit}"
    return f"{figure:,.{digits}f}{unit}"


def show_memory(used_mb: Any, total_mb: Any) -> str:
    """`used / total` in the unit that suits the total (MiB as the daemon reports, or GiB)."""
    used, total = number(used_mb), number(total_mb)
    if total is not None and total >= 1024:
        return f"{show(None if used is None else used / 1024, digits=1)} / {total / 1024:.1f} GiB"
    return f"{show(used, digits=0)} / {show(total, digits=0)} MiB"


def show_size(mb: float | None) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def clock(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp))


def level_style(fraction: float | None) -> str:
    if fraction is None:
        return "dim"
    return "green" if fraction < 0.6 else "yellow" if fraction < 0.85 else "red"


def fraction(part: Any, whole: Any) -> float | None:
    p, w = number(part), number(whole)
    if p is None or w is None or w <= 0:
        return None
    return min(max(p / w, 0.0), 1.0)


# ---- pieces ----


class Bar:
    """A horizontal bar filled to `fraction` (None: unknown), as wide as its column allows."""

    def __init__(self, value: float | None) -> None:
        self.value = value

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(BAR_WIDTH[0], min(BAR_WIDTH[1], options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, min(BAR_WIDTH[1], options.max_width))
        if self.value is None:
            yield Segment(BAR_EMPTY * width, Style.parse("dim"))
            yield Segment.line()
            return
        eighths = round(self.value * width * 8)
        full, rest = divmod(eighths, 8)
        filled = BAR_FULL * full + (BAR_EIGHTHS[rest] if rest else "")
        yield Segment(filled, Style.parse(level_style(self.value)))
        yield Segment(BAR_EMPTY * (width - len(filled)), Style.parse("dim"))
        yield Segment.line()


def sparkline(values: list[float], width: int) -> str:
    """The last `width` values as block characters, scaled to their peak; newest on the right."""
    shown = values[-width:] if width > 0 else []
    peak = max(shown, default=0.0)
    top = len(SPARK_CHARS) - 1
    chars = [
        SPARK_CHARS[round(min(max(v, 0.0) / peak, 1.0) * top)] if peak > 0 else SPARK_CHARS[0]
        for v in shown
    ]
    return " " * (width - len(chars)) + "".join(chars)


class Sparkline:
    """Throughput over the last minute, one character a sample, filling its column."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(10, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = min(options.max_width, max(len(self.values), 1), int(HISTORY_S))
        yield Segment(sparkline(self.values, width), Style.parse("cyan"))
        yield Segment.line()


def labelled_grid() -> Table:
    """Rows of label, bar (or text), figure."""
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(ratio=1, no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    return grid


def pair(label: str, value: str, style: str = "bold") -> Text:
    return Text.assemble((label + " ", "dim"), (value, style))


def gpu_panel(gpu: Any) -> tuple[RenderableType, int, str]:
    """The GPU box's content, its number of lines and its title (which names the GPU)."""
    if not isinstance(gpu, dict):
        return Text("no NVIDIA GPU", style="dim"), 1, "GPU"
    grid = labelled_grid()
    vram = fraction(gpu.get("vram_used_mb"), gpu.get("vram_total_mb"))
    grid.add_row("VRAM", Bar(vram), show_memory(gpu.get("vram_used_mb"), gpu.get("vram_total_mb")))
    util = number(gpu.get("utilization_percent"))
    grid.add_row(
        "util",
        Bar(None if util is None else min(max(util / 100, 0.0), 1.0)),
        show(gpu.get("utilization_percent"), "%", 0),
    )
    temp = number(gpu.get("temp"))
    temp_style = "bold" if temp is None or temp < 70 else "bold yellow" if temp < 80 else "bold red"
    throttling = gpu.get("throttling")
    figures = Text("  ").join(
        [
            pair("temp", show(temp, " °C", 0), temp_style),
            pair("power", show(gpu.get("power_watts"), " W")),
            pair("fan", show(gpu.get("fan_percent"), "%", 0)),
        ]
    )
    throttled = pair(
        "throttling",
        "-" if throttling is None else "YES" if throttling else "no",
        "bold red" if throttling else "bold",
    )
    name = gpu.get("name")
    title = f"GPU {name}" if isinstance(name, str) and name else "GPU"
    return Group(grid, figures, throttled), grid.row_count + 2, title


def host_panel(host: dict[str, Any]) -> Table:
    grid = labelled_grid()
    cpu = number(host.get("cpu_percent"))
    grid.add_row(
        "CPU",
        Bar(None if cpu is None else min(max(cpu / 100, 0.0), 1.0)),
        show(host.get("cpu_percent"), "%"),
    )
    grid.add_row(
        "RAM",
        Bar(fraction(host.get("ram_used_mb"), host.get("ram_total_mb"))),
        show_memory(host.get("ram_used_mb"), host.get("ram_total_mb")),
    )
    return grid


def inference_panel(state: DashboardState, inference: dict[str, Any]) -> Group:
    counts = Text("   ").join(
        [
            pair("active generations", show(inference.get("active_generations"), digits=0)),
            pair("queued", show(inference.get("queued"), digits=0)),
            pair("sessions", show(inference.get("total_sessions"), digits=0)),
            pair("total tokens", show(inference.get("total_tokens_generated"), digits=0)),
        ]
    )
    rates = Text("   ").join(
        [
            pair("tokens/s now", show(inference.get("tokens_per_second")), "bold cyan"),
            pair("last tps", show(inference.get("last_tps"))),
            pair("last TTFT", show(inference.get("last_ttft_ms"), " ms", 0)),
        ]
    )
    values = [tps for _, tps in state.throughput]
    trend = Table.grid(padding=(0, 1), expand=True)
    trend.add_column(no_wrap=True, style="dim")
    trend.add_column(ratio=1, no_wrap=True)
    trend.add_row(
        f"tokens/s over {HISTORY_S:.0f} s, peak {max(values, default=0.0):.1f}", Sparkline(values)
    )
    return Group(counts, rates, trend)


STATE_STYLES = {"loaded": "green", "loading": "yellow", "unloading": "yellow"}


def models_panel(models: dict[str, Any]) -> Panel | None:
    """One row per model the daemon knows: its state, sessions, generations, rate, memory."""
    rows = [(str(name), figures) for name, figures in models.items() if isinstance(figures, dict)]
    if not rows:
        return None
    table = Table(expand=True, box=None, padding=(0, 1), show_edge=False)
    table.add_column("model", style="bold", no_wrap=True, overflow="ellipsis")
    table.add_column("state", no_wrap=True)
    for title in ("sessions", "active", "queued", "tokens/s", "memory"):
        table.add_column(title, justify="right", no_wrap=True)
    for name, figures in rows:
        state = str(figures.get("state", "-"))
        memory = number(figures.get("memory_mb"))
        table.add_row(
            name,
            Text(state, style=STATE_STYLES.get(state, "dim")),
            show(figures.get("sessions"), digits=0),
            show(figures.get("active_generations"), digits=0),
            show(figures.get("queued"), digits=0),
            show(figures.get("tokens_per_second")),
            show_size(memory),
        )
    return Panel(table, title="models", title_align="left")


def summarize_event(topic: str, body: dict[str, Any]) -> Text:
    """`kind: message` first, then the other plain fields as key=value, on one line."""
    text = Text(no_wrap=True, overflow="ellipsis")
    level = body.get("level")
    if isinstance(level, str):
        style = {"warning": "yellow", "error": "bold red", "critical": "bold red"}.get(level, "")
        text.append(level + " ", style=style or "dim")
    kind = body.get("kind")
    if kind is not None:
        kind_style = "yellow" if kind == "evicted" else "bold"
        text.append(str(kind), style=kind_style)
    message = body.get("message")
    if message is not None:
        text.append((": " if kind is not None else "") + str(message))
    for key, value in body.items():
        if key in ("timestamp", "level", "kind", "message"):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            text.append(f" {key}=", style="dim")
            text.append(str(value))
    return text


def events_panel(state: DashboardState) -> Panel:
    if not state.events:
        content: RenderableType = Text("none yet", style="dim")
    else:
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(no_wrap=True, style="magenta")
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        for event in state.events:
            grid.add_row(clock(event.when), event.topic, summarize_event(event.topic, event.body))
        content = grid
    return Panel(content, title="recent events", title_align="left")


def header(state: DashboardState, now: float) -> Text:
    text = Text("inferencecenter top  ", style="bold")
    if state.metrics is None or state.metrics_received is None:
        waited = max(0.0, now - state.started)
        text.append(f"waiting for metrics from {state.endpoint} ({waited:.0f} s)", style="yellow")
        return text
    text.append(state.endpoint + "  ", style="cyan")
    stamp = number(state.metrics.get("timestamp"))
    last = clock(stamp if stamp is not None else state.metrics_received)
    silent = now - state.metrics_received
    if silent > STALE_S:
        text.append(f"no metrics for {silent:.0f} s (last at {last})", style="bold red")
    else:
        text.append(f"last metrics {last}", style="green")
    return text


def render(state: DashboardState, now: float | None = None) -> RenderableType:
    """One frame of the dashboard; `now` (default: the clock) only ages the header."""
    now = time.time() if now is None else now
    if state.metrics is None:
        if state.events:
            return Group(header(state, now), events_panel(state))
        return header(state, now)
    body = state.metrics
    gpu, gpu_rows, gpu_title = gpu_panel(body.get("gpu"))
    host = host_panel(section(body, "host"))
    height = max(gpu_rows, host.row_count) + 2  # side by side, so the boxes end level
    row = Table.grid(padding=(0, 1), expand=True)
    row.add_column(ratio=1)
    row.add_column(ratio=1)
    row.add_row(
        Panel(gpu, title=gpu_title, title_align="left", height=height),
        Panel(host, title="host", title_align="left", height=height),
    )
    inference = section(body, "inference")
    parts: list[RenderableType] = [
        header(state, now),
        row,
        Panel(inference_panel(state, inference), title="inference", title_align="left"),
    ]
    models = models_panel(section(inference, "models"))
    if models is not None:
        parts.append(models)
    parts.append(events_panel(state))
    return Group(*parts)


# ---- the command ----


def run_top(endpoint: str, *, once: bool = False, color: bool = True, **curve_keys: Any) -> int:
    """Draw the dashboard until Ctrl-C (exit 0); with `once`, print one frame and return.

    `once` waits for the first `metrics` message, at most DEFAULT_TIMEOUT seconds between
    messages (TimeoutError after that: the daemon is not there).
    """
    console = Console(no_color=not color, highlight=False)
    state = DashboardState(endpoint)
    try:
        with MetricsSubscriber(
            endpoint, TOPICS, timeout=DEFAULT_TIMEOUT, **curve_keys
        ) as subscriber:
            if once:
                while state.metrics is None:
                    state.ingest(*subscriber.receive())
                console.print(render(state))
                return 0
            subscriber.timeout = REDRAW_S
            with Live(render(state), console=console, screen=True, auto_refresh=False) as live:
                while True:
                    try:
                        topic, body = subscriber.receive()
                    except TimeoutError:
                        pass  # nothing new: redraw anyway, the header counts the silence
                    else:
                        state.ingest(topic, body)
                    live.update(render(state), refresh=True)
    except KeyboardInterrupt:
        return 0  # the way to leave a dashboard, not an error

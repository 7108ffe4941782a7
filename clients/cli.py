"""The client commands (infer, chat, sessions, models, load, unload, metrics, top, keygen,
keys) for the daemon's parser."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from inferencecenter.protocol import clientsfile, credentialsfile, curve
from inferencecenter.protocol.errors import ProtocolError
from inferencecenter.protocol.messages import MAX_NAME_BYTES, parse_params

from .client import DEFAULT_ENDPOINT, DEFAULT_TIMEOUT, Client, EndpointError, Generation
from .core import DEFAULT_LOAD_TIMEOUT
from .credentials import (
    ENV_API_KEY,
    ENV_CLIENT_ID,
    ENV_CLIENTS,
    ENV_CURVE_CERT,
    ENV_SERVER_KEY,
    CredentialsError,
    clients_path,
)
from .keys import add_keys_command
from .metrics import DEFAULT_METRICS_ENDPOINT, MetricsSubscriber

PROG = "inferencecenter"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the client commands; each sets `func(args) -> exit code`."""
    p = subparsers.add_parser(
        "infer",
        help="generate from a prompt, streaming the text to stdout",
        description="Open a session, generate from PROMPT, print the text as it arrives.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt; '-' or none reads it from stdin")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn through the model's chat template (default: raw text)",
    )
    p.add_argument("--system", help="system prompt of the session")
    p.add_argument("--stats", action="store_true", help="print the generation's stats to stderr")
    _model_option(p)
    _sampling_options(p)
    _connection_options(p)
    p.set_defaults(func=_guarded(_infer))

    p = subparsers.add_parser(
        "chat",
        help="chat with the model in one session",
        description="A chat REPL in one session: /reset starts over, /quit or Ctrl-D leaves, "
        "Ctrl-C stops the answer being generated.",
    )
    p.add_argument("--system", help="system prompt of the session (kept across /reset)")
    _model_option(p)
    _sampling_options(p)
    _connection_options(p)
    p.set_defaults(func=_guarded(_chat))

    p = subparsers.add_parser("sessions", help="list this client's sessions")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--all", action="store_true", help="every client's sessions (admin only)")
    _connection_options(p)
    p.set_defaults(func=_guarded(_sessions))

    p = subparsers.add_parser(
        "models",
        help="list the daemon's models and their state",
        description="Every model the daemon knows (the default marked *): loaded, loading, "
        "unloading, or available (loaded on demand).",
    )
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    _connection_options(p)
    p.set_defaults(func=_guarded(_models))

    p = subparsers.add_parser(
        "load",
        help="load a model (admin only)",
        description="Load the model NAME, or the GGUF file PATH (on the daemon's host) under "
        "the name NAME; returns once it serves. Loading another file under a loaded name "
        "swaps it: running generations finish, then the new file serves the same sessions.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("path", metavar="PATH", nargs="?", help="a GGUF file on the daemon's host")
    p.add_argument("--parallel", type=_positive_int, help="sequences decoded together")
    p.add_argument("--ctx-size", type=_positive_int, help="tokens per session")
    p.add_argument("--gpu-layers", type=int, help="-1 all that fit, 0 CPU, N")
    _connection_options(p, timeout=DEFAULT_LOAD_TIMEOUT)
    p.set_defaults(func=_guarded(_load))

    p = subparsers.add_parser(
        "unload",
        help="unload a model (admin only)",
        description="Unload the model NAME: its running generations end, its sessions stay "
        "and go on when it is loaded again.",
    )
    p.add_argument("name", metavar="NAME")
    _connection_options(p)
    p.set_defaults(func=_guarded(_unload))

    p = subparsers.add_parser(
        "metrics",
        help="print the daemon's metrics stream",
        description="Subscribe to the metrics stream and print one line per message.",
    )
    p.add_argument(
        "--endpoint",
        default=DEFAULT_METRICS_ENDPOINT,
        help=f"the daemon's metrics endpoint (default {DEFAULT_METRICS_ENDPOINT})",
    )
    p.add_argument("--json", action="store_true", help="print each message body as a JSON line")
    p.add_argument("--count", type=_positive_int, help="stop after N messages")
    _curve_options(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="give up when nothing arrives for this many seconds (default 10)",
    )
    p.set_defaults(func=_guarded(_metrics))

    p = subparsers.add_parser(
        "top",
        help="a live dashboard of the daemon's metrics and events",
        description="Draw GPU, host and inference figures and recent events from the metrics "
        "stream, redrawn as each message arrives. Ctrl-C leaves.",
    )
    p.add_argument(
        "--metrics-endpoint",
        default=DEFAULT_METRICS_ENDPOINT,
        help=f"the daemon's metrics endpoint (default {DEFAULT_METRICS_ENDPOINT})",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame once the first metrics message arrives, then exit",
    )
    p.add_argument("--no-color", action="store_true", help="draw without colours")
    _curve_options(p)
    p.set_defaults(func=_guarded(_top))

    p = subparsers.add_parser(
        "keygen",
        help="add a client with a random api key to the clients file",
        description="Add CLIENT_ID with a new random api key to the clients file (mode 0600, "
        "only the key's SHA-256) and print the key once; with --save, also store it in this "
        "user's credentials file, for the CLI on this machine. A running daemon re-reads the "
        "clients file; --replace cuts the connections made with the old key at once.",
    )
    p.add_argument("client_id", metavar="CLIENT_ID")
    p.add_argument(
        "--clients",
        type=Path,
        default=None,
        help=f"clients file (default {clientsfile.default_path()})",
    )
    p.add_argument("--max-sessions", type=_positive_int, help="sessions this client may hold")
    p.add_argument("--priority", choices=clientsfile.PRIORITIES, help="scheduling priority")
    p.add_argument("--description", help="a note on who this client is")
    p.add_argument("--replace", action="store_true", help="give an existing client a new key")
    p.add_argument(
        "--admin",
        action="store_true",
        help="an admin: may load and unload models and act on every client's sessions",
    )
    p.add_argument(
        "--save",
        action="store_true",
        help="also store the key in this user's credentials file (mode 0600)",
    )
    p.add_argument(
        "--credentials",
        type=Path,
        default=None,
        help=f"where --save stores the key (default {credentialsfile.default_path()})",
    )
    p.add_argument(
        "--curve-cert-dir",
        type=Path,
        help="also write the client's own CURVE certificate (CLIENT_ID.key_secret, mode 0600) "
        "here and bind the client to it (curve_public_key): under --curve it then "
        "authenticates only with that certificate (--curve-cert), and may read metrics under "
        "--metrics-clients-only",
    )
    p.set_defaults(func=_guarded(_keygen))

    add_keys_command(subparsers)


# ---- options ----


def _connection_options(p: argparse.ArgumentParser, timeout: float = DEFAULT_TIMEOUT) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"the daemon's frontend endpoint (default {DEFAULT_ENDPOINT})",
    )
    g.add_argument(
        "--client-id", help=f"client id (default: ${ENV_CLIENT_ID}, or the clients file)"
    )
    g.add_argument(
        "--api-key",
        help=f"api key (default: ${ENV_API_KEY}, or the clients file; prefer those: "
        "arguments are visible to other users of this machine)",
    )
    g.add_argument(
        "--clients",
        help=f"clients file to take credentials from (default: ${ENV_CLIENTS}, "
        f"else {clientsfile.default_path()})",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"seconds to wait for each reply (default {timeout:g})",
    )
    _curve_options(p)


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model to use (default: the daemon's first)")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, help="most tokens to generate (daemon default 256)")
    g.add_argument("--temp", type=float, help="temperature, 0 for greedy (daemon default 0.8)")
    g.add_argument("--seed", type=int, help="sampling seed (default random)")
    g.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop at this text (repeatable, up to 8)"
    )


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling params the user set, checked before we connect."""
    params: dict[str, Any] = {}
    for name in ("max_tokens", "temp", "seed", "stop"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    parse_params(params)
    return params


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _connect(args: argparse.Namespace) -> Client:
    return Client(
        args.endpoint,
        args.client_id,
        args.api_key,
        clients_file=args.clients,
        timeout=args.timeout,
        **_curve_keys(args),
    )


def _curve_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CURVE (a daemon started with --curve)")
    g.add_argument(
        "--server-key",
        help=f"the daemon's public key: Z85 text (write --server-key=KEY: a key may start with "
        f"'-') or its server.key file; `none` for plaintext (default: ${ENV_SERVER_KEY}, else "
        f"the server.key beside the clients file, if any)",
    )
    g.add_argument(
        "--curve-cert",
        help=f"this client's own CURVE secret certificate (.key_secret), for a clients-file "
        f"entry bound by curve_public_key, or metrics under --metrics-clients-only (default: "
        f"${ENV_CURVE_CERT})",
    )


def _curve_keys(args: argparse.Namespace) -> dict[str, Any]:
    """curve_serverkey and curve_keypair for the client library. Without a key given, the
    daemon's own server.key is used when this machine has one beside the clients file (the CLI
    on the daemon's host needs no flag)."""
    given = args.server_key or os.environ.get(ENV_SERVER_KEY) or ""
    if given.lower() == "none":
        return {}
    if not given:
        local = clients_path(getattr(args, "clients", None)).with_name(curve.SERVER_PUBLIC_FILE)
        if not local.exists():
            return {}
        given = str(local)
    keys: dict[str, Any] = {"curve_serverkey": curve.read_public_key(given)}
    cert = args.curve_cert or os.environ.get(ENV_CURVE_CERT)
    if cert:
        keys["curve_keypair"] = curve.client_keypair_from_file(cert)
    return keys


def _guarded(command: Command) -> Command:
    """Turn the errors a user can cause or meet into one line on stderr and an exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ProtocolError as exc:
            _fail(f"{exc.code}: {exc.message}")
        except (
            CredentialsError,
            clientsfile.ClientsFileError,
            credentialsfile.CredentialsFileError,
            EndpointError,
            TimeoutError,
            curve.CurveError,
        ) as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`| head`); stop quietly, and keep Python from complaining
            # again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR

    return run


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# ---- commands ----


def _infer(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    params = _params(args)
    with _connect(args) as client:
        with client.create_session(model=args.model, system_prompt=args.system) as session:
            if args.chat:
                gen = session.infer(messages=[{"role": "user", "content": prompt}], **params)
            else:
                gen = session.infer(prompt, **params)
            interrupted = _stream(gen, sys.stdout)
            if args.stats:
                print(_format_stats(gen), file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0


def _stream(gen: Generation, out: TextIO) -> bool:
    """Print pieces as they arrive; Ctrl-C aborts the generation. True when interrupted."""
    interrupted = False
    try:
        for piece in gen:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
        gen.abort()
        gen.wait()
    if gen.text and not gen.text.endswith("\n"):
        out.write("\n")
    out.flush()
    return interrupted


def _format_stats(gen: Generation) -> str:
    stats = gen.stats or {}
    fields = [f"finish_reason={gen.finish_reason}"]
    for key in ("prompt_tokens", "cached_tokens", "tokens", "ttft_ms", "total_ms", "tps"):
        value = stats.get(key)
        fields.append(f"{key}={_number(value)}")
    return " ".join(fields)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return "-" if value is None else str(value)


HELP_CHAT = "/reset starts the conversation over, /quit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def _chat(args: argparse.Namespace) -> int:
    params = _params(args)
    interactive = sys.stdin.isatty()
    with _connect(args) as client:
        # The daemon puts the system prompt at the start of an empty context, /reset included.
        with client.create_session(model=args.model, system_prompt=args.system) as session:
            if interactive:
                print(f"chat with {session.model} ({HELP_CHAT})", file=sys.stderr)
            start_over = False
            while True:
                try:
                    line = input("> " if interactive else "")
                except EOFError:
                    if interactive:
                        print(file=sys.stderr)
                    return 0
                except KeyboardInterrupt:
                    print(file=sys.stderr)
                    continue
                line = line.strip()
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    return 0
                if line == "/reset":
                    start_over = True
                    print("(conversation cleared)", file=sys.stderr)
                    continue
                if line.startswith("/"):
                    print(HELP_CHAT, file=sys.stderr)
                    continue
                turns = [{"role": "user", "content": line}]
                gen = session.infer(messages=turns, reset=start_over, **params)
                start_over = False
                if _stream(gen, sys.stdout):
                    print("(stopped)", file=sys.stderr)
                elif gen.finish_reason == "context":
                    print("(the conversation fills the context: /reset to go on)", file=sys.stderr)
                elif gen.finish_reason == "length":
                    print("(cut at --max-tokens)", file=sys.stderr)


def _sessions(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        rows = client.list_sessions(all_clients=args.all)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        whose = "on the daemon" if args.all else f"for client {client.client_id}"
        print(f"no sessions {whose}", file=sys.stderr)
        return 0
    table: list[tuple[str, ...]] = [("SESSION_ID", "MODEL", "STATE", "TOKENS", "CREATED")]
    if args.all:
        table = [(*table[0], "CLIENT")]
    for row in rows:
        created = row.get("created")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
            if isinstance(created, (int, float))
            else "-"
        )
        cells = (
            str(row.get("session_id", "-")),
            str(row.get("model", "-")),
            str(row.get("state", "-")),
            str(row.get("tokens", "-")),
            when,
        )
        table.append((*cells, str(row.get("client_id", "-"))) if args.all else cells)
    _print_table(table)
    return 0


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _models(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        listed = client.list_models()
    if args.json:
        print(json.dumps(listed))
        return 0
    default = listed.get("default")
    table: list[tuple[str, ...]] = [
        ("MODEL", "STATE", "PARALLEL", "CTX_SIZE", "SESSIONS", "MEMORY")
    ]
    for row in listed["models"]:
        memory = row.get("memory_mb")
        name = str(row.get("model", "-"))
        table.append(
            (
                name + (" *" if name == default else ""),
                str(row.get("state", "-")),
                str(row.get("parallel", "-")),
                str(row.get("ctx_size", "-")),
                str(row.get("sessions", "-")),
                f"{memory:.0f} MiB" if isinstance(memory, (int, float)) else "-",
            )
        )
    _print_table(table)
    return 0


def _load(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path) if args.path else None  # the daemon's host is this one
    with _connect(args) as client:
        loaded = client.load_model(
            args.name,
            path,
            parallel=args.parallel,
            ctx_size=args.ctx_size,
            gpu_layers=args.gpu_layers,
        )
    print(f"{loaded.get('model', args.name)} loaded in {loaded.get('seconds', 0.0):.1f} s")
    return 0


def _unload(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        unloaded = client.unload_model(args.name)
    print(f"{unloaded.get('model', args.name)} unloaded")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    with MetricsSubscriber(args.endpoint, timeout=args.timeout, **_curve_keys(args)) as subscriber:
        seen = 0
        try:
            for topic, body in subscriber:
                print(json.dumps(body) if args.json else format_metrics(topic, body), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass  # the usual way to stop watching, not an error
    return 0


def _top(args: argparse.Namespace) -> int:
    from .top import run_top  # rich is loaded by the one command that draws with it

    return run_top(
        args.metrics_endpoint, once=args.once, color=not args.no_color, **_curve_keys(args)
    )


def format_metrics(topic: str, body: dict[str, Any]) -> str:
    """One compact key=value line; missing or null fields show as `-`."""
    stamp = body.get("timestamp")
    when = (
        time.strftime("%H:%M:%S", time.localtime(stamp)) if isinstance(stamp, (int, float)) else "-"
    )
    if topic != "metrics":
        return f"{when} {topic} {json.dumps(body, separators=(',', ':'))}"

    def get(section: str, key: str) -> Any:
        part = body.get(section)
        return part.get(key) if isinstance(part, dict) else None

    def show(value: Any, unit: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}{unit}"
        return f"{value}{unit}"

    fields = [when]
    if isinstance(body.get("gpu"), dict):
        fields += [
            f"gpu={show(get('gpu', 'utilization_percent'), '%')}",
            f"temp={show(get('gpu', 'temp'), 'C')}",
            f"vram={show(get('gpu', 'vram_used_mb'))}/{show(get('gpu', 'vram_total_mb'))}MB",
            f"power={show(get('gpu', 'power_watts'), 'W')}",
        ]
        if get("gpu", "throttling"):
            fields.append(f"throttling={get('gpu', 'throttling')}")
    else:
        fields.append("gpu=none")
    fields += [
        f"cpu={show(get('host', 'cpu_percent'), '%')}",
        f"ram={show(get('host', 'ram_used_mb'))}/{show(get('host', 'ram_total_mb'))}MB",
        f"active={show(get('inference', 'active_generations'))}",
        f"queued={show(get('inference', 'queued'))}",
        f"sessions={show(get('inference', 'total_sessions'))}",
        f"tps={show(get('inference', 'tokens_per_second'))}",
        f"last_tps={show(get('inference', 'last_tps'))}",
        f"ttft={show(get('inference', 'last_ttft_ms'), 'ms')}",
        f"tokens={show(get('inference', 'total_tokens_generated'))}",
    ]
    return " ".join(fields)


def _keygen(args: argparse.Namespace) -> int:
    client_id: str = args.client_id
    if not client_id or client_id != client_id.strip() or len(client_id.encode()) > MAX_NAME_BYTES:
        _fail(f"a client id is 1 to {MAX_NAME_BYTES} bytes without surrounding spaces")
        return EXIT_ERROR
    path: Path = args.clients if args.clients is not None else clientsfile.default_path()
    existing = clientsfile.load(path) if path.exists() else []
    replacing = any(e.client_id == client_id for e in existing)
    if replacing and not args.replace:
        _fail(f"client {client_id!r} is already in {path}; --replace gives it a new key")
        return EXIT_ERROR
    fields: dict[str, Any] = {}
    if args.max_sessions is not None:
        fields["max_sessions"] = args.max_sessions
    if args.priority is not None:
        fields["priority"] = args.priority
    if args.description is not None:
        fields["description"] = args.description
    if args.admin:
        fields["role"] = "admin"
    stored: Path = args.credentials or credentialsfile.default_path()
    if args.save:
        credentialsfile.load(stored)  # a broken credentials file stops us before any change
    cert = None
    if args.curve_cert_dir is not None:
        cert, public = curve.create_client_cert(args.curve_cert_dir, client_id)
        fields["curve_public_key"] = public.decode()
    entry = clientsfile.add_client(path, client_id, hash_only=True, **fields)
    saved = ""
    if args.save:
        credentialsfile.store(stored, entry.client_id, entry.api_key)
        saved = f" The key is stored in {stored} (mode 0600)."
    if cert is not None:
        print(f"curve_cert: {cert}")
    print(f"client_id: {entry.client_id}")
    if entry.role != "user":
        print(f"role: {entry.role}")
    print(f"api_key: {entry.api_key}")
    sys.stdout.flush()
    print(
        f"{'gave a new key to' if replacing else 'added'} client "
        f"{entry.client_id!r} in {path} (mode 0600, only the key's hash); a running daemon "
        f"re-reads the file. The key is shown only this once.{saved}",
        file=sys.stderr,
    )
    return 0

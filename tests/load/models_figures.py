"""What loading models costs: the time to load and to unload the default model, each engine's
memory, and the first token of a session whose model is loaded on demand (medians of --runs).

    python -m tests.load.models_figures [--runs 5]

A daemon of its own serves the default model under two names, `a` and `b`; each run unloads
`b`, loads it (admin `load_model`), unloads it again and creates a session of `b`, which loads
it on demand, then times that session's first token from the create.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from inferencecenter.actors.config import default_model_path
from inferencecenter.daemon.testing import (
    TEST_CLIENTS,
    Daemon,
    RawClient,
    new_session,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import clientsfile
from inferencecenter.protocol.clientsfile import ClientEntry

ADMIN = ClientEntry("root", "root-key-0123456789-abcdefghijklmnop", 8, "normal", "", role="admin")


def engine_rss_mib(daemon: Daemon) -> dict[str, float]:
    found = {}
    for child in psutil.Process(daemon.process.pid).children():
        for part in child.cmdline():
            if part.startswith("inferencecenter-engine-"):
                found[part] = round(child.memory_info().rss / 2**20, 1)
    return found


def first_token_after_load(client: RawClient, model: str) -> float:
    started = time.monotonic()
    session_id = new_session(client, model=model)  # answered once the model serves
    params = {"temp": 0, "max_tokens": 4}
    client.send(
        {"op": "infer", "id": "f", "session_id": session_id, "prompt": "Paris is", "params": params}
    )
    first = 0.0
    while True:
        reply = client.recv_for("f")
        if reply["op"] == "token" and not first:
            first = time.monotonic() - started
        if reply["op"] != "token":
            break
    client.request({"op": "close_session", "session_id": session_id})
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="models-figures-"))
    clients = tmp / "models-clients.json"
    clientsfile.save(clients, [*TEST_CLIENTS, ADMIN])
    model = default_model_path()
    daemon = start_daemon(
        tmp, "--clients", str(clients), "--model", f"a={model}", "--model", f"b={model}"
    )
    try:
        client = RawClient(daemon.endpoint)
        client.auth(ADMIN.client_id, ADMIN.api_key)
        print("engine RSS (MiB):", engine_rss_mib(daemon))
        loads, unloads, firsts = [], [], []
        for _ in range(args.runs):
            started = time.monotonic()
            assert client.request({"op": "unload_model", "model": "b"})["op"] == "model_unloaded"
            unloads.append(time.monotonic() - started)
            started = time.monotonic()
            assert client.request({"op": "load_model", "model": "b"})["op"] == "model_loaded"
            loads.append(time.monotonic() - started)
            client.request({"op": "unload_model", "model": "b"})
            firsts.append(first_token_after_load(client, "b"))
        median = statistics.median
        print(
            f"load {median(loads):.2f} s, unload {median(unloads):.2f} s, first token of a "
            f"session whose model was loaded on demand {median(firsts):.2f} s "
            f"(medians of {args.runs})"
        )
        print("engine RSS after (MiB):", engine_rss_mib(daemon))
    finally:
        stop_daemon(daemon.process)


if __name__ == "__main__":
    main()

"""A hypothesis fuzzer of the frontend, against the session's real daemon.

Two generators of single messages, 1500 examples each, and one of concurrent batches:

- `test_fuzz_frames`: arbitrary multipart messages: 0 to 4 frames of random bytes, the real tag
  `ICP1` or near misses, msgpack bodies of random structures (maps with keys of any type, nested
  lists, ints up to the 64-bit limits, floats with nan and inf, float32, bin, ext types), and
  crafted bodies (nesting thousands deep, length headers far beyond the body, truncated bodies,
  trailing data, invalid UTF-8, bodies just at and just over the size limit).
- `test_fuzz_ops`: bodies with a valid (or almost valid) op and random field values, on an
  unauthenticated and on an authenticated connection: infers with random params (every key,
  values in range, at the edges and of the wrong type) on a real session, another client's
  session or a made-up one, auths with real and wrong credentials, and so on.
- `test_fuzz_concurrent_batches`: 2 to 8 requests sent at once (tiny infers, aborts, closes,
  lists, stats, pings) over six sessions, more than the daemon's four slots; every request must
  get its final reply within a deadline. `test_no_stall_when_slot_holders_queue_behind_a_session_
  without_a_slot` is the scheduling deadlock these batches found, made deterministic.

In the first two, every example is one message, and the fuzzer waits for everything it causes:
the daemon must answer with well-formed replies (two frames, the tag, a msgpack map with a str
`op` of the protocol; an `error` with a code from the protocol's list and a str `message`; the
request's `id` echoed exactly when it was valid), one reply per request, or a stream of `token`s
with `seq` 0, 1, 2, … and one `end`. A stream is aborted after a few tokens to keep examples
short. Then a `ping` on the same connection must get its `pong` first (nothing left over), the
daemon process must be alive and its actors must keep their pids (no crash, no restart). Codes a
careful serial client never sees (`internal`, `busy`, `overloaded`) and generations ending with
`finish_reason: "error"` fail the fuzzer: they mean the daemon broke on some input.

Zero frames cannot go over ZeroMQ (there is no empty message): such an example sends nothing and
checks that the daemon stays silent.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from inferencecenter.daemon.testing import Daemon

from .test_protocol_unit import PROTOCOL_ERROR_CODES

TAG = b"ICP1"
LIMIT = 1 << 20  # the daemon's default --max-message-bytes
REPLY_DEADLINE_S = 30.0
TOKENS_BEFORE_ABORT = 3
ACTORS = ("gateway", "auth", "sessions", "engine", "monitor")

NEVER_SEEN_BY_A_SERIAL_CLIENT = frozenset({"internal", "busy", "overloaded"})
FINISH_REASONS = frozenset({"stop", "length", "aborted", "context", "error"})
STATS_KEYS = frozenset({"prompt_tokens", "cached_tokens", "tokens", "ttft_ms", "total_ms", "tps"})
REPLIES_TO = {
    "ping": {"pong"},
    "auth": {"auth_success", "auth_failed"},
    "create_session": {"session_created"},
    "close_session": {"session_closed"},
    "list_sessions": {"session_list"},
    "infer": {"token", "end"},
    "abort": {"aborted"},
    "stats": {"stats"},
}
OPS = tuple(REPLIES_TO)
NUMBER = (int, float)
# Reply op -> the fields it must carry, with their types.
REPLY_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "pong": {"time": float},
    "auth_success": {"client_id": str, "max_sessions": int, "priority": str, "server": dict},
    "auth_failed": {"reason": str},
    "session_created": {"session_id": str, "model": str, "ctx_size": int},
    "session_closed": {"session_id": str},
    "session_list": {"sessions": list},
    "token": {"session_id": str, "seq": int, "content": str},
    "end": {"session_id": str, "finish_reason": str, "stats": dict},
    "aborted": {"session_id": str},
    "stats": {"inference": dict, "sessions": int},
    "error": {"code": str, "message": str},
}
SESSION_KEYS = frozenset({"session_id", "model", "state", "tokens", "created"})

REPLY_OF_SIMPLE_OP = {"list_sessions": "session_list", "stats": "stats", "ping": "pong"}
POOL_SIZE = 6  # sessions used by the concurrent batches; the test daemon has 4 slots
BATCH_DEADLINE_S = 10.0

# Placeholders the harness replaces with live values when it sends a body.
REAL_SESSION = "<alice's live session>"
OTHER_SESSION = "<bob's live session>"
REAL_MODEL = "<the served model>"
HARNESS = "harness-"  # prefix of the ids the harness uses itself; never generated

KEYS = {
    "alice": "alice-key-0123456789-abcdefghijklmnop",
    "bob": "bob-key-0123456789-abcdefghijklmnopqr",
    "carol": "carol-key-0123456789-abcdefghijklmnop",
}

# FUZZ_EXAMPLES=100 for a quick run while working on the fuzzer itself.
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1500")),
    deadline=None,
    database=None,  # no .hypothesis/ in the repository; a failure prints its example and blob
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


# ---- strategies: msgpack values -----------------------------------------------------------

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

texts = st.text(max_size=40)  # hypothesis never draws surrogates, which msgpack cannot encode
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-300, max_value=300),
    st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=17)),
    st.builds(
        msgpack.Timestamp,
        st.integers(min_value=INT64_MIN, max_value=2**63 - 1),
        st.integers(min_value=0, max_value=999_999_999),
    ),
)
map_keys = st.one_of(
    texts,
    st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
    st.binary(max_size=8),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(map_keys, children, max_size=5),
        st.dictionaries(texts, children, max_size=5),
    ),
    max_leaves=12,
)


def pack(value: Any, single_float: bool = False) -> bytes:
    """msgpack as a client sends it; float32 when asked and the floats fit."""
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True, use_single_float=single_float)
    except OverflowError:
        data = msgpack.packb(value, use_bin_type=True)
    return data


def ext(code: int, data: bytes) -> bytes:
    """An ext value of any type code, the negative (reserved) ones included, which msgpack's
    ExtType refuses to build: fixext 1/2/4/8/16 where the length fits, else ext 8."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    kind = code.to_bytes(1, "big", signed=True)
    if len(data) in fixed:
        return bytes([fixed[len(data)]]) + kind + data
    return b"\xc7" + bytes([len(data)]) + kind + data


random_maps = st.one_of(
    st.dictionaries(map_keys, values, max_size=6),
    st.dictionaries(texts, values, max_size=6),
    st.builds(
        lambda op, rest: {**rest, "op": op},
        st.one_of(st.sampled_from(OPS), values),
        st.dictionaries(texts, values, max_size=6),
    ),
)
packed_values = st.builds(pack, st.one_of(random_maps, values), st.booleans())


# ---- strategies: crafted bodies and frames -----------------------------------------------

# Headers that declare far more than the body holds: a decoder must not trust them.
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff",  # array 32 of 4G items
    b"\xdf\xff\xff\xff\xff",  # map 32 of 4G pairs
    b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext 32 of 4 GiB
    b"\xdc\xff\xff",  # array 16
    b"\xde\xff\xff",  # map 16
    b"\x81\xa2op\xdd\x7f\xff\xff\xff",  # {"op": array of 2G items}
    b"\x82\xa2op\xa4ping\xa1x\xdf\x7f\xff\xff\xff",  # ping with a field declaring 2G pairs
    b"\xc1",  # the one byte msgpack never uses
    b"\xd4\xff",  # fixext 1 cut short
    b"\xd7\xff" + b"\xff" * 8,  # timestamp 64 with nanoseconds out of range
    b"\xc7\x05\xff" + b"\x00" * 5,  # timestamp of an impossible length
    b"\x81\xa2op\xd6\xff\x00\x00\x00\x00",  # op is a timestamp
    b"",  # no body at all
]


def padded_ping(size: int) -> bytes:
    """A valid ping body of exactly `size` bytes (a str field pads it)."""
    head = b"\x82\xa2op\xa4ping\xa3pad\xdb"
    pad = size - len(head) - 4
    return head + pad.to_bytes(4, "big") + b"x" * pad


def truncate(data: bytes, cut: int) -> bytes:
    return data[: max(0, len(data) - 1 - cut)]


crafted_bodies = st.one_of(
    st.integers(min_value=1, max_value=5000).map(lambda n: b"\x91" * n + b"\xc0"),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"\x81\xa1k" * n + b"\xc0"),
    st.integers(min_value=1, max_value=3000).map(
        lambda n: b"\x82\xa2op\xa4ping\xa1x" + b"\x91" * n + b"\xc0"
    ),
    st.sampled_from(HUGE_HEADERS),
    st.builds(ext, st.integers(min_value=-128, max_value=127), st.binary(max_size=20)),
    st.builds(
        lambda code, data: b"\x82\xa2op\xa4ping\xa1x" + ext(code, data),
        st.integers(min_value=-128, max_value=-1),
        st.binary(max_size=20),
    ),
    st.builds(truncate, st.builds(pack, random_maps), st.integers(min_value=0, max_value=40)),
    st.builds(lambda extra: pack({"op": "ping"}) + extra, st.binary(min_size=1, max_size=16)),
    st.binary(min_size=1, max_size=8).map(lambda b: b"\x81\xa2op" + bytes([0xA0 | len(b)]) + b),
    st.builds(lambda key: b"\x81" + pack(key) + b"\xa4ping", st.binary(max_size=4)),  # bin key
    st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 4096]).map(padded_ping),
)
junk = st.binary(max_size=64)
tags = st.one_of(
    st.just(TAG),
    st.just(TAG),
    st.sampled_from([b"ICP2", b"icp1", b"ICP1\x00", b"ICP", b"", b"\x00ICP1"]),
    junk,
)
bodies = st.one_of(packed_values, crafted_bodies, junk)
frame_lists = st.one_of(
    st.lists(junk, max_size=4),
    st.lists(st.one_of(tags, bodies), max_size=4),
    st.tuples(tags, bodies).map(list),
    st.tuples(tags, bodies).map(list),
    st.tuples(tags, bodies, st.lists(st.one_of(junk, bodies), min_size=1, max_size=2)).map(
        lambda t: [t[0], t[1], *t[2]]
    ),
)
connections = st.sampled_from(["anon", "authed"])


# ---- strategies: ops with random fields --------------------------------------------------

huge_ints = st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
any_floats = st.floats(allow_nan=True, allow_infinity=True)
PARAM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "temp": st.one_of(st.floats(0, 2), st.just(0), st.integers(-2, 3), any_floats),
    "top_k": st.one_of(st.integers(-3, 100), huge_ints),
    "top_p": st.one_of(st.floats(0, 1), st.sampled_from([0, 1, 1.0000001, -0.0]), any_floats),
    "min_p": st.one_of(st.floats(0, 1), st.sampled_from([0, 1, -1e-300]), any_floats),
    "repeat_penalty": st.one_of(st.floats(0.5, 2), st.sampled_from([0, 1e-300, 1e300]), any_floats),
    "max_tokens": st.one_of(st.integers(-2, 6), huge_ints),
    "seed": st.one_of(st.integers(-3, 2**32 + 3), huge_ints),
    "stop": st.lists(st.text(max_size=4), max_size=10),
    "ignore_eos": st.booleans(),
}
PARAM_KEYS = [*PARAM_VALUES, "temperature", "n_predict", "", "TEMP", "stop "]


@st.composite
def params(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(PARAM_KEYS), unique=True, max_size=6))
    result: dict[str, Any] = {}
    for key in keys:
        plausible = PARAM_VALUES.get(key, values)
        result[key] = draw(plausible if draw(st.integers(0, 9)) else values)
    return result


turns = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["user", "assistant", "system", "model"]), texts),
        "content": st.text(max_size=60),
    }
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "client_id": st.one_of(st.sampled_from(sorted(KEYS)), texts),
    "api_key": st.one_of(st.sampled_from(sorted(KEYS.values())), st.text(max_size=1100)),
    "model": st.one_of(st.just(REAL_MODEL), texts, st.text(min_size=250, max_size=300)),
    "system_prompt": st.text(max_size=80),
    "session_id": st.one_of(
        st.just(REAL_SESSION),
        st.just(REAL_SESSION),
        st.just(OTHER_SESSION),
        texts,
        st.just("s-" + "A" * 24),
    ),
    "prompt": st.text(max_size=120),
    "messages": st.lists(st.one_of(turns, turns, values), max_size=3),
    "params": st.one_of(params(), params(), values),
    "reset": st.booleans(),
}
OP_FIELDS = {
    "ping": [],
    "auth": ["client_id", "api_key"],
    "create_session": ["model", "system_prompt"],
    "close_session": ["session_id"],
    "list_sessions": [],
    "infer": ["session_id", "prompt", "messages", "params", "reset"],
    "abort": ["session_id"],
    "stats": [],
}
ids = st.one_of(
    st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
    st.integers(min_value=-5, max_value=5),
    texts.filter(lambda s: not s.startswith(HARNESS)),
    st.text(min_size=17, max_size=80).filter(lambda s: len(s.encode()) > 64),
    st.booleans(),
    any_floats,
    st.none(),
    st.lists(st.integers(-5, 5), max_size=2),
)


# Values that are in range, edges included: a valid infer then gets at most one field spoilt.
VALID_PARAM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "temp": st.one_of(st.just(0), st.floats(0, 2), st.floats(min_value=0, allow_infinity=False)),
    "top_k": st.one_of(st.integers(0, 100), st.integers(0, UINT64_MAX)),
    "top_p": st.one_of(st.just(1), st.floats(0, 1, exclude_min=True)),
    "min_p": st.one_of(st.sampled_from([0, 1]), st.floats(0, 1)),
    "repeat_penalty": st.one_of(
        st.floats(0.5, 2), st.floats(min_value=0, exclude_min=True, allow_infinity=False)
    ),
    "max_tokens": st.one_of(st.integers(1, 4), st.integers(1, UINT64_MAX)),
    "seed": st.integers(0, 2**32 - 2),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=8),
    "ignore_eos": st.booleans(),
}
valid_turns = st.fixed_dictionaries(
    {
        "role": st.one_of(
            st.sampled_from(["user", "assistant", "system", "model"]),
            st.text(min_size=1, max_size=8),
        ),
        "content": st.text(max_size=60),
    }
)
valid_ids = st.one_of(st.integers(INT64_MIN, UINT64_MAX), st.text(max_size=16))


@st.composite
def valid_infers(draw: st.DrawFn) -> dict[str, Any]:
    """An infer on alice's live session that is valid, or valid but for one spoilt field."""
    body: dict[str, Any] = {"op": "infer", "session_id": REAL_SESSION}
    if draw(st.booleans()):
        body["prompt"] = draw(st.text(max_size=80))
    else:
        body["messages"] = draw(st.lists(valid_turns, min_size=1, max_size=3))
    keys = draw(st.lists(st.sampled_from(sorted(VALID_PARAM_VALUES)), unique=True, max_size=5))
    if keys or draw(st.booleans()):
        body["params"] = {key: draw(VALID_PARAM_VALUES[key]) for key in keys}
    if draw(st.booleans()):
        body["reset"] = draw(st.booleans())
    if draw(st.integers(0, 3)):
        body["id"] = draw(valid_ids.filter(lambda i: not str(i).startswith(HARNESS)))
    if not draw(st.integers(0, 2)):  # spoil one field, or one param
        spoilt = draw(st.sampled_from(sorted(body) + [f"params.{k}" for k in keys]))
        if spoilt.startswith("params."):
            key = spoilt.removeprefix("params.")
            body["params"][key] = draw(st.one_of(PARAM_VALUES[key], values))
        else:
            body[spoilt] = draw(st.one_of(FIELD_VALUES.get(spoilt, values), values))
    return body


@st.composite
def op_bodies(draw: st.DrawFn) -> dict[str, Any]:
    op_kind = draw(st.integers(0, 19))
    op: Any
    if op_kind < 3:
        return draw(valid_infers())
    if op_kind < 6:
        op = "infer"
    elif op_kind < 17:
        op = draw(st.sampled_from(OPS))
    elif op_kind < 18:
        op = draw(st.sampled_from(["PING", "infer ", "", "pong", "error", "token", "Auth"]))
    else:
        op = draw(values)
    fields = OP_FIELDS.get(op, []) if isinstance(op, str) else []
    if not fields and draw(st.booleans()):
        fields = OP_FIELDS[draw(st.sampled_from(["auth", "infer", "create_session"]))]
    body: dict[str, Any] = {}
    if draw(st.integers(0, 29)):
        body["op"] = op
    for name in fields:
        choice = draw(st.integers(0, 9))
        if choice < 7:
            body[name] = draw(FIELD_VALUES[name])
        elif choice < 9 and name not in ("session_id", "client_id", "api_key"):
            continue  # absent
        else:
            body[name] = draw(values)
    if draw(st.integers(0, 3)):
        body["id"] = draw(ids)
    if not draw(st.integers(0, 5)):
        extra = draw(st.dictionaries(texts, values, max_size=2))
        body = {**extra, **body}
    return body


# ---- the harness -------------------------------------------------------------------------


def valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and len(value.encode("utf-8")) <= 64


def readable(value: Any) -> bool:
    """Whether the daemon can decode this body at all: its decoder takes map keys of str or bin
    only, at every depth (msgpack's strict_map_key)."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, bytes)) and readable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(readable(item) for item in value)
    return True


class Connection:
    """One DEALER; every receive waits on a deadline."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self) -> tuple[list[bytes], dict[str, Any]]:
        if not self.sock.poll(int(REPLY_DEADLINE_S * 1000)):
            raise AssertionError(f"no reply within {REPLY_DEADLINE_S} s")
        frames = self.sock.recv_multipart()
        return frames, check_reply(frames)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A harness request: nothing else is in flight, so the next reply is its reply."""
        self.send([TAG, pack(body)])
        _, reply = self.recv()
        assert reply.get("id") == body["id"], (body, reply)
        return reply

    def close(self) -> None:
        self.sock.close()


def check_reply(frames: list[bytes]) -> dict[str, Any]:
    """A well-formed reply: two frames, the tag, a msgpack map of the protocol."""
    assert len(frames) == 2, f"a reply of {len(frames)} frames"
    assert frames[0] == TAG, f"a reply with tag {frames[0]!r}"
    for key in KEYS.values():
        assert key.encode() not in frames[1], "a reply echoes an api key"
    body = msgpack.unpackb(frames[1], raw=False)
    assert isinstance(body, dict) and all(isinstance(k, str) for k in body), body
    op = body.get("op")
    assert op in REPLY_FIELDS, f"unknown reply op in {body}"
    for name, kind in REPLY_FIELDS[op].items():
        assert isinstance(body.get(name), kind), f"{op}.{name} is not {kind}: {body}"
    if "id" in body:
        assert valid_id(body["id"]), body
    if op == "error":
        assert body["code"] in PROTOCOL_ERROR_CODES, body
    elif op == "end":
        assert body["finish_reason"] in FINISH_REASONS, body
        assert set(body["stats"]) >= STATS_KEYS, body
        assert all(isinstance(body["stats"][k], NUMBER) for k in STATS_KEYS), body
    elif op == "token":
        assert body["seq"] >= 0, body
    elif op == "pong":
        assert math.isfinite(body["time"]), body
    elif op == "auth_success":
        assert body["server"].get("protocol") == 1.1, body
    elif op == "session_list":
        for session in body["sessions"]:
            assert isinstance(session, dict) and set(session) >= SESSION_KEYS, body
    return body


class Harness:
    """Two long-lived connections (one never authenticated, one authenticated as alice), alice's
    live session, bob's live session, and the checks run after every example."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.endpoint = daemon.endpoint
        self.serial = 0
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()
        supervisor = psutil.Process(daemon.process.pid)
        self.actors = {self.actor_name(child): child.pid for child in supervisor.children()}
        assert set(self.actors) == set(ACTORS), self.actors
        self.log_offset = len(daemon.log())
        self.conns = {"anon": Connection(self.endpoint), "authed": Connection(self.endpoint)}
        self.bob = Connection(self.endpoint)
        auth = self.auth(self.conns["authed"], "alice")
        self.model = auth["server"]["models"][0]
        self.auth(self.bob, "bob")
        self.other_session = self.create(self.bob)
        self.session = self.create(self.conns["authed"])
        self.bob_pool: list[str] = []  # bob's extra sessions for the concurrent batches
        self.examples: Counter[str] = Counter()  # examples run, by test

    @staticmethod
    def actor_name(process: psutil.Process) -> str:
        for name in ACTORS:
            if f"inferencecenter-{name}" in " ".join(process.cmdline()):
                return name
        return f"unknown {process.pid}"

    def next_id(self, what: str) -> str:
        self.serial += 1
        return f"{HARNESS}{what}-{self.serial}"

    def auth(self, conn: Connection, client_id: str) -> dict[str, Any]:
        body = {"op": "auth", "id": self.next_id("auth"), "client_id": client_id}
        reply = conn.request({**body, "api_key": KEYS[client_id]})
        assert reply["op"] == "auth_success", reply
        return reply

    def create(self, conn: Connection) -> str:
        reply = conn.request({"op": "create_session", "id": self.next_id("create")})
        assert reply["op"] == "session_created", reply
        return str(reply["session_id"])

    def close_session(self, conn: Connection, session_id: str) -> None:
        body = {"op": "close_session", "id": self.next_id("close"), "session_id": session_id}
        assert conn.request(body)["op"] == "session_closed"

    def resolve(self, body: dict[str, Any]) -> dict[str, Any]:
        live = {REAL_SESSION: self.session, OTHER_SESSION: self.other_session}
        live[REAL_MODEL] = self.model
        return {k: live.get(v, v) if isinstance(v, str) else v for k, v in body.items()}

    # -- one example --

    def exchange(self, conn_name: str, frames: list[bytes]) -> list[dict[str, Any]]:
        """Send one message, collect everything it causes, repair the harness's state, and check
        that the daemon is still fully there."""
        conn = self.conns[conn_name]
        replies: list[dict[str, Any]] = []
        if frames:
            conn.send(frames)
            replies = self.drain(conn)
        self.after(conn_name, replies)
        self.check_alive(conn)
        return replies

    def drain(self, conn: Connection) -> list[dict[str, Any]]:
        """Replies up to the first that is not a `token`; a stream is aborted after a few tokens
        (and then the `aborted` reply is awaited too)."""
        replies: list[dict[str, Any]] = []
        abort_id: str | None = None
        aborted = False
        done = False
        seq = 0
        while not done or (abort_id is not None and not aborted):
            _, reply = conn.recv()
            if abort_id is not None and reply.get("id") == abort_id:
                assert reply["op"] == "aborted", reply
                aborted = True
                continue
            assert not done, f"a reply after the last one: {reply}"
            replies.append(reply)
            if reply["op"] != "token":
                done = True
                continue
            assert reply["seq"] == seq, f"seq {reply['seq']} where {seq} was due"
            seq += 1
            if seq == TOKENS_BEFORE_ABORT and abort_id is None:
                abort_id = self.next_id("abort")
                body = {"op": "abort", "id": abort_id, "session_id": reply["session_id"]}
                conn.send([TAG, pack(body)])
        if seq:
            assert replies[-1]["op"] == "end", replies[-1]
        return replies

    def after(self, conn_name: str, replies: list[dict[str, Any]]) -> None:
        conn = self.conns[conn_name]
        for reply in replies:
            op = reply["op"]
            self.counts[op if op != "error" else f"error {reply['code']}"] += 1
            assert not (op == "error" and reply["code"] in NEVER_SEEN_BY_A_SERIAL_CLIENT), reply
            assert not (op == "end" and reply["finish_reason"] == "error"), reply
            if op in ("auth_success", "auth_failed"):
                if conn_name == "authed":
                    self.auth(conn, "alice")  # alice again (a failed auth dropped it)
                elif op == "auth_success":
                    body = {"op": "auth", "id": self.next_id("unauth"), "client_id": "nobody"}
                    assert conn.request({**body, "api_key": "-"})["op"] == "auth_failed"
            elif op == "session_created":
                self.close_session(conn, reply["session_id"])
            elif op == "session_closed" and reply["session_id"] == self.session:
                self.session = self.create(self.conns["authed"])
            elif op == "end" and reply["finish_reason"] == "context":
                self.close_session(self.conns["authed"], self.session)
                self.session = self.create(self.conns["authed"])
        if replies and replies[0]["op"] == "token":
            self.counts["streams"] += 1

    def check_alive(self, conn: Connection) -> None:
        """The connection's next reply is the pong of a ping (nothing was left over); the daemon
        and every actor run with the pids they had at the start."""
        ping_id = self.next_id("ping")
        reply = conn.request({"op": "ping", "id": ping_id})
        assert reply["op"] == "pong", reply
        assert self.daemon.process.poll() is None, "the daemon exited"
        children = {c.pid for c in psutil.Process(self.daemon.process.pid).children()}
        assert children == set(self.actors.values()), f"actors restarted: {self.actors}"

    def new_log(self) -> str:
        return self.daemon.log()[self.log_offset :]

    # -- concurrent batches --

    def pool(self) -> list[tuple[Connection, str]]:
        """POOL_SIZE sessions with the connection of their owner: alice's live session, bob's
        live session and bob's extra ones (created when first needed)."""
        while len(self.bob_pool) < POOL_SIZE - 2:
            self.bob_pool.append(self.create(self.bob))
        alice = self.conns["authed"]
        return [(alice, self.session), (self.bob, self.other_session)] + [
            (self.bob, session_id) for session_id in self.bob_pool
        ]

    def replace_session(self, session_id: str, close: bool) -> None:
        """A new session in place of one that was closed (or whose context is full)."""
        if session_id == self.session:
            conn = self.conns["authed"]
        else:
            conn = self.bob
        if close:
            self.close_session(conn, session_id)
        fresh = self.create(conn)
        if session_id == self.session:
            self.session = fresh
        elif session_id == self.other_session:
            self.other_session = fresh
        else:
            self.bob_pool[self.bob_pool.index(session_id)] = fresh

    def batch(self, actions: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Send every action at once (on the connection of the session's owner), then wait for
        the final reply of each with a deadline, checking streams and orderings."""
        pool = self.pool()
        requests: dict[str, tuple[str, str]] = {}  # request id -> (op, session_id)
        order: list[str] = []
        for op, target, extra in actions:
            conn, session_id = pool[target]
            request_id = self.next_id("batch")
            body: dict[str, Any] = {"op": op, "id": request_id, **extra}
            if op in ("infer", "abort", "close_session"):
                body["session_id"] = session_id
            conn.send([TAG, pack(body)])
            requests[request_id] = (op, session_id)
            order.append(request_id)
        pending = set(order)
        seqs: Counter[str] = Counter()
        closed: set[str] = set()
        full: set[str] = set()
        poller = zmq.Poller()
        for conn in (self.conns["authed"], self.bob):
            poller.register(conn.sock, zmq.POLLIN)
        deadline = time.monotonic() + BATCH_DEADLINE_S
        while pending:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
            if not ready:
                self.stalled(pool, pending, requests, actions)
                return
            for sock in ready:
                reply = check_reply(sock.recv_multipart())
                request_id = reply.get("id")
                assert request_id in pending, f"a reply to no pending request: {reply}"
                op, session_id = requests[request_id]
                kind = reply["op"]
                self.counts[f"batch {kind if kind != 'error' else reply['code']}"] += 1
                if op == "infer" and kind == "token":
                    assert reply["seq"] == seqs[request_id], reply
                    seqs[request_id] += 1
                    continue
                pending.discard(request_id)
                code = reply.get("code")
                if op == "infer":
                    assert kind == "end" or code in ("busy", "not_found"), reply
                    assert not (kind == "end" and reply["finish_reason"] == "error"), reply
                    if kind == "end" and reply["finish_reason"] == "context":
                        full.add(session_id)
                elif op == "abort":
                    assert kind == "aborted" or code == "not_found", reply
                elif op == "close_session":
                    assert kind == "session_closed" or code == "not_found", reply
                    if kind == "session_closed":
                        closed.add(session_id)
                        earlier = order[: order.index(request_id)]
                        unfinished = [
                            r for r in earlier if r in pending and requests[r][1] == session_id
                        ]
                        assert not unfinished, f"session_closed before the end of {unfinished}"
                else:
                    assert kind == REPLY_OF_SIMPLE_OP[op], reply
        for session_id in closed:
            self.replace_session(session_id, close=False)
        for session_id in full - closed:
            self.replace_session(session_id, close=True)
        self.counts["batches"] += 1

    def stalled(
        self,
        pool: list[tuple[Connection, str]],
        pending: set[str],
        requests: dict[str, tuple[str, str]],
        actions: list[tuple[str, int, dict[str, Any]]],
    ) -> None:
        """Nothing came for BATCH_DEADLINE_S: fail, saying whether the engine sat idle with
        infers queued (a scheduling deadlock) or was busy (too slow); aborting every session of
        the pool first ends what is queued, so the daemon goes on for the other tests."""
        probe = Connection(self.endpoint)
        try:
            self.auth(probe, "alice")
            figures = [
                probe.request({"op": "stats", "id": self.next_id("stats")})["inference"]
                for _ in range(2)
            ]
        finally:
            probe.close()
        idle = all(f["active_generations"] == 0 and f["queued"] > 0 for f in figures)
        aborts = set()
        for conn, session_id in pool:
            request_id = self.next_id("unstick")
            conn.send([TAG, pack({"op": "abort", "id": request_id, "session_id": session_id})])
            aborts.add(request_id)
        poller = zmq.Poller()
        for conn in (self.conns["authed"], self.bob):
            poller.register(conn.sock, zmq.POLLIN)
        deadline = time.monotonic() + REPLY_DEADLINE_S
        while (pending or aborts) and time.monotonic() < deadline:
            for sock in dict(poller.poll(1000)):
                reply = check_reply(sock.recv_multipart())
                if reply["op"] != "token":
                    pending.discard(reply.get("id"))
                    aborts.discard(reply.get("id"))
        sent = [(op, requests[r][1][-6:]) for (op, _, _), r in zip(actions, requests, strict=True)]
        what = "scheduling deadlock: infers queued, none running" if idle else "too slow"
        raise AssertionError(
            f"a batch stalled for {BATCH_DEADLINE_S} s ({what}): {sent} (session ids shortened);"
            f" engine {figures[-1]}; still unanswered after aborting: {pending | aborts or 'none'}"
        )

    def close(self) -> None:
        for session_id in self.bob_pool:
            self.close_session(self.bob, session_id)
        self.close_session(self.conns["authed"], self.session)
        self.close_session(self.bob, self.other_session)
        for conn in (*self.conns.values(), self.bob):
            conn.close()


@pytest.fixture(scope="module")
def harness(daemon: Daemon) -> Iterator[Harness]:
    running = Harness(daemon)
    yield running
    running.close()


# ---- the fuzzers -------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(conn=connections, frames=frame_lists)
@example(conn="anon", frames=[])
@example(conn="anon", frames=[TAG])
@example(conn="authed", frames=[TAG, b"", b""])
@example(conn="authed", frames=[TAG, padded_ping(LIMIT)])
@example(conn="authed", frames=[TAG, padded_ping(LIMIT + 1)])
@example(conn="anon", frames=[TAG, b"\x91" * 100_000 + b"\xc0"])
@example(conn="authed", frames=[TAG, b"\xdd\xff\xff\xff\xff"])
@example(conn="authed", frames=[TAG, b"\x81\xa2op\xa2\xff\xfe"])
def test_fuzz_frames(harness: Harness, conn: str, frames: list[bytes]) -> None:
    harness.examples["frames"] += 1
    replies = harness.exchange(conn, frames)
    if not frames:
        assert replies == []
    else:
        assert replies, "no reply"


@FUZZ_SETTINGS
@given(conn=st.sampled_from(["authed", "authed", "authed", "anon"]), body=op_bodies())
@example(conn="authed", body={"op": "infer", "session_id": REAL_SESSION, "prompt": "Hi"})
@example(
    conn="authed",
    body={
        "op": "infer",
        "id": 2**64 - 1,
        "session_id": REAL_SESSION,
        "messages": [{"role": "tool", "content": "x"}],
        "params": {"top_k": 2**63, "max_tokens": 2**63, "temp": 1e-300, "ignore_eos": True},
    },
)
@example(conn="authed", body={"op": "infer", "session_id": OTHER_SESSION, "prompt": "x"})
@example(conn="anon", body={"op": "create_session", "id": "x"})
def test_fuzz_ops(harness: Harness, conn: str, body: dict[str, Any]) -> None:
    harness.examples["ops"] += 1
    sent = harness.resolve(body)
    replies = harness.exchange(conn, [TAG, pack(sent)])
    assert replies, "no reply"
    if not readable(sent):
        # Maps with keys other than str (or bin), at any depth: the body is refused as a whole
        # before its id is read.
        assert [(r["op"], r.get("code"), "id" in r) for r in replies] == [
            ("error", "bad_request", False)
        ], (sent, replies)
        return
    expected_id = sent.get("id") if valid_id(sent.get("id")) else None
    for reply in replies:
        assert reply.get("id") == expected_id and ("id" in reply) == (expected_id is not None), (
            sent,
            reply,
        )
    op = sent.get("op")
    ops = {reply["op"] for reply in replies}
    if op not in OPS:
        assert [r.get("code") for r in replies] == ["bad_request"], (sent, replies)
        return
    assert ops <= REPLIES_TO[op] | {"error"}, (sent, replies)
    if conn == "anon" and op not in ("ping", "auth"):
        assert replies[0]["op"] == "error", (sent, replies)
        assert replies[0]["code"] in ("bad_request", "unauthenticated"), (sent, replies)


BATCH_PROMPTS = ["", " Hi", " The sea is", " 1, 2, 3,", " Once upon a time"]


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[str, int, dict[str, Any]]]:
    """2 to 8 requests sent at once over the pool's sessions: tiny infers, aborts, closes."""
    actions: list[tuple[str, int, dict[str, Any]]] = []
    for _ in range(draw(st.integers(2, 8))):
        op = draw(st.sampled_from(["infer"] * 5 + ["abort"] * 2 + ["close_session"]))
        op = draw(st.sampled_from([op] * 5 + ["list_sessions", "stats", "ping"]))
        extra: dict[str, Any] = {}
        if op == "infer":
            extra["prompt"] = draw(st.sampled_from(BATCH_PROMPTS))
            extra["params"] = {
                "max_tokens": draw(st.integers(1, 4)),
                "temp": draw(st.sampled_from([0, 0.8])),
            }
            if not draw(st.integers(0, 4)):
                extra["reset"] = True
        actions.append((op, draw(st.integers(0, POOL_SIZE - 1)), extra))
    return actions


@settings(
    FUZZ_SETTINGS,
    max_examples=int(os.environ.get("FUZZ_BATCHES", "300")),
    phases=[Phase.explicit, Phase.generate],  # a stalled batch costs the deadline: no shrinking
)
@given(actions=batches())
def test_fuzz_concurrent_batches(
    harness: Harness, actions: list[tuple[str, int, dict[str, Any]]]
) -> None:
    """Requests in flight together over six sessions (more than the daemon's four slots): every
    request gets its final reply within the deadline, streams are whole, `session_closed` comes
    after the end of the session's generation, and the connections stay clean."""
    harness.examples["batches"] += 1
    harness.batch(actions)
    for conn in (harness.conns["authed"], harness.bob):
        harness.check_alive(conn)


def test_no_stall_when_slot_holders_queue_behind_a_session_without_a_slot(
    harness: Harness,
) -> None:
    """What the concurrent batches found (docs/reliability.md, Findings), made deterministic:
    four sessions hold the four slots, idle; then one infer for a fifth session (no slot) and
    one for each holder arrive together. The fifth is first in the queue and finds no idle slot
    (every holder has a queued job); the holders' jobs, which could run in their own slots, must
    not wait behind it. (Before the fix nothing ran until the engine's hang check killed the
    engine, --engine-hang-s later, and every stream ended with an error.)"""
    pool = harness.pool()
    bobs = [index for index, (conn, _) in enumerate(pool) if conn is harness.bob]
    waiting, holders = bobs[0], bobs[1:5]  # one connection: the requests arrive in this order
    tiny: dict[str, Any] = {"prompt": " Hi", "params": {"max_tokens": 1, "temp": 0}}
    for index in holders:
        harness.batch([("infer", index, tiny)])
    harness.batch([("infer", waiting, tiny)] + [("infer", index, tiny) for index in holders])


def test_the_daemon_survived_the_fuzz(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    """All five actors still run with their first pids, nothing failed inside, and a plain
    infer still works."""
    supervisor = psutil.Process(harness.daemon.process.pid)
    running = {harness.actor_name(child): child.pid for child in supervisor.children()}
    assert running == harness.actors
    assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in running.values())
    assert "Traceback" not in harness.new_log()
    conn = harness.conns["authed"]
    conn.send(
        [
            TAG,
            pack(
                {
                    "op": "infer",
                    "id": "plain",
                    "session_id": harness.session,
                    "prompt": "The capital of France is",
                    "params": {"temp": 0, "max_tokens": 8},
                    "reset": True,
                }
            ),
        ]
    )
    replies = []
    while not replies or replies[-1]["op"] == "token":
        _, reply = conn.recv()
        replies.append(reply)
    assert [r["seq"] for r in replies[:-1]] == list(range(len(replies) - 1))
    assert replies[-1]["op"] == "end" and replies[-1]["finish_reason"] in ("length", "stop")
    assert len(replies) > 1
    counts = harness.counts
    if harness.examples["ops"] >= 100:  # the fuzzer reached what it is meant to reach
        assert counts["streams"] > 0 and counts["error bad_request"] > 0
        assert counts["error unauthenticated"] > 0 and counts["error not_found"] > 0
    with capsys.disabled():
        elapsed = time.monotonic() - harness.started
        print(f"\nfuzz: {elapsed:.1f} s, examples {dict(harness.examples)}")
        print(f"fuzz: replies by op/code: {dict(sorted(counts.items()))}")

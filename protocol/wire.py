"""Frames and the msgpack codec, with size limits checked before anything is decoded and
limits on what a body may hold checked while it is."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import BadRequest, TooLarge

TAG = b"ICP1"
# auth_success.server.protocol: 1.1 (a float) since every 1.1 addition is served (models, roles,
# budgets, CURVE); clients check its integer part.
PROTOCOL_VERSION = 1.1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
# The transport refuses frames beyond this many times the limit outright (the peer is
# disconnected by ZeroMQ); between the limit and this cap the daemon answers `too_large`.
HARD_CAP_FACTOR = 8

Body = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What one body may hold. Decoding is stopped as soon as one is passed: a 1 MiB body of a
    million empty maps would otherwise cost ~100 ms and ~100 MB before any check."""

    max_str: int  # characters of one str (bytes of one bin)
    max_array: int  # items of one array
    max_map: int  # pairs of one map
    max_containers: int  # maps and arrays in the whole body
    max_bytes: int | None = None  # a tighter size limit than the caller's, if any


# An authenticated client: long prompts and chats, but no body of thousands of maps.
LIMITS = Limits(max_str=1 << 30, max_array=8192, max_map=256, max_containers=8192)
# Before auth only `auth` and `ping` are served: one small flat map.
BEFORE_AUTH = Limits(max_str=2048, max_array=8, max_map=16, max_containers=4, max_bytes=4096)


class _TooMany(Exception):
    pass


def _counter(limit: int) -> Callable[[Any], Any]:
    """A hook msgpack calls on every map and array it builds: stops past `limit` of them."""
    count = 0

    def hook(value: Any) -> Any:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooMany
        return value

    return hook


def pack(body: Body) -> bytes:
    """Encode one map; strings stay str (use_bin_type=True), as every peer expects."""
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def unpack(
    data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, limits: Limits = LIMITS
) -> Body:
    """Decode one map from untrusted bytes, or raise BadRequest / TooLarge."""
    if limits.max_bytes is not None:
        max_bytes = min(max_bytes, limits.max_bytes)
    if len(data) > max_bytes:
        raise TooLarge(f"body is {len(data)} bytes, the limit is {max_bytes}")
    count = _counter(limits.max_containers)
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_str,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=limits.max_str,  # valid msgpack: the fields' checks refuse it
            object_hook=count,
            list_hook=count,
        )
    except msgpack.ExtraData:
        raise BadRequest("body holds more than one msgpack object") from None
    except _TooMany:
        raise BadRequest(f"body holds more than {limits.max_containers} maps and arrays") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        detail = f": {exc}" if "exceeds max_" in str(exc) else ""  # which limit, never the data
        raise BadRequest(f"body is not valid msgpack ({type(exc).__name__}{detail})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a msgpack map, not {_kind(body)}")
    if any(not isinstance(key, str) for key in body):
        raise BadRequest("every key of the body must be a str")
    return body


def client_frames(body: Body) -> list[bytes]:
    """The two frames of a frontend message (after any routing id)."""
    return [TAG, pack(body)]


def parse_client_frames(frames: list[bytes], max_bytes: int, limits: Limits = LIMITS) -> Body:
    """Check tag and frame count, then decode the body (`BEFORE_AUTH` limits for a connection
    that has not authenticated)."""
    if len(frames) != 2:
        raise BadRequest(f"expected 2 frames (tag, body), got {len(frames)}")
    if frames[0] != TAG:
        raise BadRequest("first frame must be the protocol tag ICP1")
    return unpack(frames[1], max_bytes, limits)


def hard_cap(max_bytes: int) -> int:
    return max(max_bytes * HARD_CAP_FACTOR, 16 << 20)


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an int"
    if isinstance(value, float):
        return "a float" if math.isfinite(value) else "a non-finite float"
    if isinstance(value, str):
        return "a str"
    if isinstance(value, (bytes, bytearray)):
        return "bin"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


kind_of = _kind

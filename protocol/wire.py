"""Frames and the msgpack codec, with size limits checked before anything is decoded."""

from __future__ import annotations

import math
from typing import Any

import msgpack

from .errors import BadRequest, TooLarge

TAG = b"ICP1"
PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
# The transport refuses frames beyond this many times the limit outright (the peer is
# disconnected by ZeroMQ); between the limit and this cap the daemon answers `too_large`.
HARD_CAP_FACTOR = 8

Body = dict[str, Any]


def pack(body: Body) -> bytes:
    """Encode one map; strings stay str (use_bin_type=True), as every peer expects."""
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Body:
    """Decode one map from untrusted bytes, or raise BadRequest / TooLarge."""
    if len(data) > max_bytes:
        raise TooLarge(f"body is {len(data)} bytes, the limit is {max_bytes}")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
        )
    except msgpack.ExtraData:
        raise BadRequest("body holds more than one msgpack object") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise BadRequest(f"body is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a msgpack map, not {_kind(body)}")
    if any(not isinstance(key, str) for key in body):
        raise BadRequest("every key of the body must be a str")
    return body


def client_frames(body: Body) -> list[bytes]:
    """The two frames of a frontend message (after any routing id)."""
    return [TAG, pack(body)]


def parse_client_frames(frames: list[bytes], max_bytes: int) -> Body:
    """Check tag and frame count, then decode the body."""
    if len(frames) != 2:
        raise BadRequest(f"expected 2 frames (tag, body), got {len(frames)}")
    if frames[0] != TAG:
        raise BadRequest("first frame must be the protocol tag ICP1")
    return unpack(frames[1], max_bytes)


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

"""The request fields of the seed systems' routes (`POST /load_model`), checked."""

from __future__ import annotations

import os
import re
from typing import Any

from .shapes import FieldError

MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def load_model_fields(body: dict[str, Any]) -> tuple[str, str | None]:
    """`model_name` (a model's short name) and the optional `model_path` (a GGUF file)."""
    name = body.get("model_name")
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise FieldError("model_name", "model_name must match [A-Za-z0-9._-]{1,64}")
    path = body.get("model_path")
    if path is None:
        return name, None
    if not isinstance(path, str) or not path:
        raise FieldError("model_path", "model_path must be a non-empty string")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise FieldError("model_path", f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise FieldError("model_path", f"{path} is not a GGUF file")
    return name, path


def same_file(path: str, other: str) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False

"""The engine actor: one model, one context, continuous batching over every session's sequence."""

from .service import main

__all__ = ["main"]

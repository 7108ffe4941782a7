"""The HTTP actor: the OpenAI API, /health and the seed systems' routes, and the original
WebSocket protocol, beside the ZeroMQ gateway and reaching the same actors."""

from .service import main

__all__ = ["main"]

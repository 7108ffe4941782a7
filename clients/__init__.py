"""The InferenceCenter client library: sync Client, trio AsyncClient, metrics subscriber."""

from inferencecenter.protocol.errors import (
    AuthFailed,
    BadRequest,
    Busy,
    Forbidden,
    InternalError,
    LimitReached,
    NotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

from .async_client import AsyncClient, AsyncGeneration, AsyncSession
from .client import Client, Generation, Session
from .core import ConnectionLost
from .credentials import Credentials, CredentialsError
from .dealer import EndpointError
from .metrics import MetricsSubscriber

__all__ = [
    "AsyncClient",
    "AsyncGeneration",
    "AsyncSession",
    "AuthFailed",
    "BadRequest",
    "Busy",
    "Client",
    "ConnectionLost",
    "Credentials",
    "CredentialsError",
    "EndpointError",
    "Forbidden",
    "Generation",
    "InternalError",
    "LimitReached",
    "MetricsSubscriber",
    "NotFound",
    "Overloaded",
    "ProtocolError",
    "RateLimited",
    "Session",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
]

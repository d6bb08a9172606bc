"""Python client for the session-aware inference server (see docs/clients.md).

    from clients.python import Client

    with Client("http://127.0.0.1:8000") as client:
        client.login()
        print(client.predict("tests/data/cat.jpg")["label"])

`Client` is synchronous (httpx.Client), `AsyncClient` the same API for asyncio; every failure is an
`InferenceError` subclass from `clients.python.errors`. `python -m clients.python --help` is the
command line.
"""

from clients.python.aio import AsyncClient
from clients.python.client import Client
from clients.python.errors import (
    AuthError,
    ConnectionFailed,
    InferenceError,
    NotFoundError,
    PayloadTooLarge,
    RateLimited,
    ServerBusy,
    ServerError,
    UnsupportedMediaType,
    ValidationError,
)
from clients.python.protocol import StreamResult

__all__ = [
    "AsyncClient",
    "AuthError",
    "Client",
    "ConnectionFailed",
    "InferenceError",
    "NotFoundError",
    "PayloadTooLarge",
    "RateLimited",
    "ServerBusy",
    "ServerError",
    "StreamResult",
    "UnsupportedMediaType",
    "ValidationError",
]

"""The use cases one serving process holds, in one container the composition root (server/server.py)
builds once and hands to every transport: the HTTP handlers read it from the application's settings
(`use_cases`), the gRPC servicer takes it as an argument. Nothing else reads the application settings."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from service.auth import Authenticator
from service.capture import Captures
from service.classify import Classifier
from service.dataplane import DataPlane
from service.export import FeedbackExport
from service.feedback import FeedbackService
from service.history import History
from service.models import Models
from service.preprocess import Preprocessor
from service.sessions import SessionService


class Stream(Protocol):
    """An open stream (handlers/stream.py) as the drain sees it."""

    async def go_away(self, grace: float) -> None:
        """Read no more images, answer those in flight (within `grace` seconds), then close saying
        "going away", so that the client resumes on another connection."""
        ...


class InFlight:
    """Counts requests (and stream images) between their start and their end, and holds the open streams,
    so that the server's drain can wait for them and close the streams. Every transport counts into the
    one the server holds."""

    def __init__(self) -> None:
        self.count = 0
        self.streams: set[Stream] = set()
        self.closing = False  # the drain has begun: a stream opened now goes away at once

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1

    async def close_streams(self, grace: float) -> None:
        """Every open stream goes away, each after answering its images in flight (within `grace`)."""
        self.closing = True
        await asyncio.gather(*(stream.go_away(grace) for stream in list(self.streams)))


@dataclass(frozen=True)
class UseCases:
    """Everything a transport may call; each is built once per process."""

    auth: Authenticator
    classifier: Classifier
    sessions: SessionService
    history: History
    preprocessor: Preprocessor
    dataplane: DataPlane
    feedback: FeedbackService
    feedback_export: FeedbackExport
    captures: Captures
    models: Models  # every served model, each with its catalogue of versions
    in_flight: InFlight
    # The server's metrics (server.observability.Metrics: /metrics and the gRPC counters); typed loosely
    # because service/ does not import server/.
    metrics: Any

"""The use cases one serving process holds, in one container the composition root (server/server.py)
builds once and hands to every transport: the HTTP handlers read it from the application's settings
(`use_cases`), the gRPC servicer takes it as an argument. Nothing else reads the application settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class InFlight:
    """Counts requests (and stream images) between their start and their end, so that the server's drain
    can wait for them. Every transport counts into the one the server holds."""

    def __init__(self) -> None:
        self.count = 0

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1


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

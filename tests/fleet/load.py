"""A bounded client load: sessions predicting in a loop, and one stream, through the Python client with its
normal retries and Idempotency-Keys. Every try carries an id (X-Fleet-Try: <call>.<attempt>) that HAProxy
logs, so a 5xx in HAProxy's log can be matched to the client's retry of it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from clients.python import protocol
from clients.python.client import Client
from clients.python.errors import InferenceError
from tests.conftest import CAT_JPEG, COFFEE_JPEG
from tests.fleet.haproxy import TRY_HEADER


@dataclass
class Ledger:
    """Every try the clients made: its outcome, and whether the client tried the call again after it."""

    tries: dict[str, str] = field(default_factory=dict)  # try id -> status code or error class
    retried: set[str] = field(default_factory=set)
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, try_id: str, outcome: protocol.Outcome, retried: bool) -> None:
        with self.lock:
            self.tries[try_id] = (str(outcome.status_code) if isinstance(outcome, httpx.Response)
                                  else type(outcome).__name__)
            if retried:
                self.retried.add(try_id)

    def call(self) -> None:
        with self.lock:
            self.calls += 1

    def failed(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


class CountingClient(Client):
    """The Python client, its retry loop unchanged (`Client._send`), with each try labelled and recorded."""

    def __init__(self, base_url: str, ledger: Ledger, **kwargs: Any):
        super().__init__(base_url, **kwargs)
        self.ledger = ledger

    def _send(self, call: protocol.Call) -> Any:
        self.ledger.call()
        call_id = uuid.uuid4().hex[:12]
        exchange = protocol.Exchange(call, self.policy, self.token)
        while True:
            try_id = f"{call_id}.{exchange.attempts}"
            request = {**exchange.request, "headers": {**exchange.request["headers"], TRY_HEADER: try_id}}
            outcome = self._try(request)
            wait = exchange.after(outcome)
            self.ledger.record(try_id, outcome, retried=wait is not None)
            if wait is None:
                return exchange.result()
            time.sleep(wait)


class SessionLoad(threading.Thread):
    """One session predicting cat and coffee in turn until `stop` is set; `answered` holds the history id
    of every predict the client got an answer to."""

    def __init__(self, url: str, ledger: Ledger, stop: threading.Event, pace: float):
        super().__init__(daemon=True)
        self.client = CountingClient(url, ledger, timeout=60)
        self.ledger, self.stop, self.pace = ledger, stop, pace
        self.answered: list[str] = []
        self.client.login()

    def run(self) -> None:
        images = [CAT_JPEG, COFFEE_JPEG]
        while not self.stop.is_set():
            try:
                self.answered.append(self.client.predict(images[len(self.answered) % 2])["id"])
            except InferenceError as error:
                self.ledger.failed(f"predict: {error}")
            self.stop.wait(self.pace)  # a bounded load, not a benchmark

    def history_ids(self) -> list[str]:
        return [item["id"] for item in self.client.history()]


class StreamLoad(threading.Thread):
    """One `predict_stream` on its own session, fed an image every `pace` seconds until `stop` is set."""

    def __init__(self, url: str, ledger: Ledger, stop: threading.Event, pace: float):
        super().__init__(daemon=True)
        self.owner = CountingClient(url, ledger, timeout=60)
        self.owner.login()
        self.client = Client(url, token=self.owner.token, timeout=60)
        self.ledger, self.stop, self.pace = ledger, stop, pace
        self.sent = 0
        self.results: dict[Any, list[str]] = {}  # ref -> the history ids answered for it (one each)
        self.errors: list[str] = []

    def images(self) -> Iterator[bytes]:
        while not self.stop.is_set():
            self.sent += 1
            yield CAT_JPEG
            self.stop.wait(self.pace)

    def run(self) -> None:
        try:
            for result in self.client.predict_stream(self.images()):
                if result.ok:
                    self.results.setdefault(result.ref, []).append(result.unwrap()["id"])
                else:
                    self.errors.append(f"image {result.ref}: {result.error}")
        except InferenceError as error:
            self.errors.append(f"stream: {error}")

    def history_ids(self) -> list[str]:
        return [item["id"] for item in self.owner.history()]

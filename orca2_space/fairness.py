"""A fair share of one model for everyone: each visitor, and each network address, may have only a few
requests running or waiting, and a request over a limit is refused at once with the reason.

A request counts as the answers it runs: an answer, a token scoring or a prompt inspection is one
place, a comparison one per system message, so that a comparison of 4 weighs what 4 answers do.

Without this, one script that queues many long answers makes every other visitor wait behind all of
them. Requests are let in here, not held in Gradio's queue: the model's own scheduler (the batch, or
the engine's turn for answers run alone) is the only place a request waits, so a visitor who is
within the limits starts at the next decode step.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .settings import InvalidRequest


@dataclass(frozen=True)
class Visitor:
    """Who asks: a page session or an API client, and the network address it comes from."""

    session: str
    address: str


def visitor_address(peer: str | None, forwarded_for: Sequence[str], trusted_proxies: int) -> str:
    """The network address a request comes from, as the operator's proxies saw it.

    Each of the trusted_proxies proxies in front of the server appends the address it sees to
    X-Forwarded-For, so the visitor's is the entry that many from the right; whatever the client wrote
    itself is further left and ignored (as uvicorn's --forwarded-allow-ips and Werkzeug's
    ProxyFix(x_for=N) read it). forwarded_for holds every X-Forwarded-For header's value, in order.
    Without trusted proxies, or with fewer entries than them, it is the connection's own peer."""
    entries = [entry.strip() for value in forwarded_for for entry in value.split(",")]
    if trusted_proxies and len(entries) >= trusted_proxies and entries[-trusted_proxies]:
        return entries[-trusted_proxies]
    return peer or "unknown"


class Refused(InvalidRequest):
    """A request over a limit; the message says which and what to do."""


@dataclass(frozen=True)
class Limits:
    per_visitor: int
    per_address: int
    total: int


class FairShare:
    """Counts the places in use (requests running or waiting, each as the answers it runs) per visitor,
    per address and in all."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._sessions: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()
        self._total = 0
        self._listeners: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def listening(self, listener: Callable[[], None]) -> Iterator[None]:
        """Call listener (quickly: it runs in the admitting request's thread) after each request is let in,
        while in the block: how an evaluation knows at once that others want the batch."""
        with self._lock:
            self._listeners.append(listener)
        try:
            yield
        finally:
            with self._lock:
                self._listeners.remove(listener)

    @contextlib.contextmanager
    def admit(self, visitor: Visitor | None, places: int = 1) -> Iterator[None]:
        """Hold places while the request is in progress; Refused at once if there are not enough.
        Requests from within the app (visitor None) count toward the total only."""
        self._take(visitor, places)
        try:
            yield
        finally:
            self._give_back(visitor, places)

    def _take(self, visitor: Visitor | None, places: int) -> None:
        limits = self.limits
        with self._lock:
            if visitor is not None:
                held = self._sessions[visitor.session]
                if held + places > limits.per_visitor:
                    raise Refused(
                        _over("You already have", held, places, limits.per_visitor, "visitor")
                        + ". Wait for one to finish, or stop it, then ask again."
                    )
                held = self._addresses[visitor.address]
                if held + places > limits.per_address:
                    raise Refused(
                        _over("Your network address already has", held, places, limits.per_address, "address")
                        + "; everyone behind that address shares it. Wait for one to finish, then ask again."
                    )
            if self._total + places > limits.total:
                raise Refused(
                    f"The server is busy: {self._total} requests are running or waiting. Try again in a minute."
                )
            self._total += places
            if visitor is not None:
                self._sessions[visitor.session] += places
                self._addresses[visitor.address] += places
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def _give_back(self, visitor: Visitor | None, places: int) -> None:
        with self._lock:
            self._total -= places
            if visitor is not None:
                for counts, key in ((self._sessions, visitor.session), (self._addresses, visitor.address)):
                    counts[key] -= places
                    if not counts[key]:
                        del counts[key]

    def in_progress(self) -> int:
        """Places in use, in all."""
        with self._lock:
            return self._total


def _over(holder: str, held: int, places: int, limit: int, per: str) -> str:
    """Why a request doesn't fit a limit: "You already have 4 requests running or waiting, ..."."""
    have = f"{holder} {held} request{'' if held == 1 else 's'} running or waiting"
    if places == 1:
        return f"{have}, this server's limit per {per} (a comparison counts one per answer)"
    return f"{have}, and this one counts {places} (one per answer it runs): more than this server's {limit} per {per}"

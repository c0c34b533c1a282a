"""Turns on the model: no two forward passes overlap, and an answer's pass goes before a waiting
scoring pass, so a visitor's next token never waits behind more than the one pass under way.

A pass is urgent (an answer's: a batch step, a generate step) unless made inside `yielding()`
(scoring's chunks). A yielding pass waits while any urgent pass waits. It is not starved: when a
turn ends with no urgent pass waiting, the turn is handed to a waiting yielding pass, so one that
arrives a moment later (the batch's next step, say) waits for that one pass, as it waited for
any pass before.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

_yielding = contextvars.ContextVar("orca2_yielding_pass", default=False)


@contextlib.contextmanager
def yielding() -> Iterator[None]:
    """Forward passes made inside (in this thread or context) let urgent ones go first."""
    token = _yielding.set(True)
    try:
        yield
    finally:
        _yielding.reset(token)


class Turns:
    """One pass at a time; urgent before yielding."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = False
        self._urgent_waiting = 0
        self._yielding_waiting = 0
        # The turn just ended with no urgent pass waiting: it is a yielding pass's, whoever comes.
        self._handed_to_yielding = False

    @property
    def urgent_waiting(self) -> int:
        """Urgent passes waiting for their turn now."""
        with self._changed:
            return self._urgent_waiting

    @property
    def yielding_waiting(self) -> int:
        """Yielding passes waiting for their turn now."""
        with self._changed:
            return self._yielding_waiting

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the model for one pass: urgent, or yielding inside `yielding()`."""
        if _yielding.get():
            self._take_yielding()
        else:
            self._take_urgent()
        try:
            yield
        finally:
            self._end()

    def _take_urgent(self) -> None:
        with self._changed:
            self._urgent_waiting += 1
            try:
                self._changed.wait_for(lambda: not self._busy and not self._handed_to_yielding)
            finally:
                self._urgent_waiting -= 1
            self._busy = True

    def _take_yielding(self) -> None:
        with self._changed:
            self._yielding_waiting += 1
            try:
                self._changed.wait_for(
                    lambda: self._handed_to_yielding or (not self._busy and self._urgent_waiting == 0)
                )
            except BaseException:
                # Interrupted while the turn was handed to it and no other yielding pass waits: free it.
                if self._handed_to_yielding and self._yielding_waiting == 1:
                    self._handed_to_yielding = False
                    self._changed.notify_all()
                raise
            finally:
                self._yielding_waiting -= 1
            self._handed_to_yielding = False
            self._busy = True

    def _end(self) -> None:
        with self._changed:
            self._busy = False
            self._handed_to_yielding = self._urgent_waiting == 0 and self._yielding_waiting > 0
            self._changed.notify_all()

"""One answer being written, for every backend: the AnswerStream the chat reads, and the Feed its
backend writes to. As simonw/llm's Response owns iteration and timing for every Model.execute, this
owns the queue, the end, cancel and done, the stats, the reader's waits and the decoding; a backend
writes only its producer, which pushes token ids (a local model) or text (an inference server).

The producer holds the Feed and never the Answer, so an Answer nobody reads any more is collected,
and that cancels the producer's work (weakref.finalize below). Nothing waits forever: a reader
waiting for more checks, every WAIT_SECONDS, that the producer is still there to finish the answer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator

from ..prompt import STOP_IDS, OrcaTokenizer, StreamDecoder
from .contract import GenerationError, GenerationStats, StopReason

log = logging.getLogger(__name__)

_END = object()
# How often a reader waiting for the producer checks that the producer is still there.
WAIT_SECONDS = 1.0
OUT_OF_MEMORY = "The model ran out of memory while answering. Try again, or ask for a shorter answer."


def failure_message(error: BaseException) -> str:
    """What a reader is told when the answer failed: one line, and no allocator report."""
    if isinstance(error, GenerationError):
        return str(error)  # already written for the reader
    text = str(error).strip()
    if isinstance(error, MemoryError) or "out of memory" in text.lower():
        return OUT_OF_MEMORY
    return f"The model failed while answering: {text.splitlines()[0] if text else type(error).__name__}"


class Feed:
    """The producer's side of one answer: what it pushes, whether it should stop, how it ended."""

    def __init__(
        self,
        seed: int | None,
        batched: bool = False,
        explain: Callable[[BaseException], str] = failure_message,
        sampling: str | None = None,
    ):
        self.seed = seed
        self.batched = batched
        self.sampling = sampling  # GenerationStats.sampling
        # The reader's message for a failure (a backend may know its own out-of-memory errors).
        self._explain = explain
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        # How the producer stops working on this answer (besides seeing `cancelled`).
        self.on_cancel: Callable[[], None] = lambda: None
        # Whether the producer (its thread, or the batch's dispatcher) is still there to close the answer.
        self.alive: Callable[[], bool] = lambda: True
        self.notices: tuple[str, ...] = ()
        self.n_tokens = 0
        self.tokens_at_cancel: int | None = None
        self.last_token: int | None = None
        self.started = time.perf_counter()
        self.failure: GenerationError | None = None
        self.stats: GenerationStats | None = None
        self._close_lock = threading.Lock()

    def push(self, token: int) -> None:
        """One token id the model wrote (a stop id included: the reader leaves it out)."""
        self.n_tokens += 1
        self.last_token = token
        self.items.put(token)

    def write(self, text: str, pieces: int = 1) -> None:
        """Answer text, for a producer that sees only text; `pieces` counts as tokens."""
        self.n_tokens += pieces
        if text:
            self.items.put(text)

    def cancel(self) -> None:
        if self.cancelled.is_set() or self.done.is_set():
            return
        self.tokens_at_cancel = self.n_tokens
        self.cancelled.set()
        self.on_cancel()

    def close(
        self, error: BaseException | None = None, reason: StopReason | None = None, stats: GenerationStats | None = None
    ) -> None:
        """The producer has stopped working on this answer; the first call says how. `reason` is how
        it ended by itself; by default a stop id as the last token ended the turn, else the length did.
        A producer relaying another's answer (the model's process) passes the stats that one kept."""
        with self._close_lock:
            if not self.done.is_set():
                self._close(error, reason, stats)

    def _close(self, error: BaseException | None, reason: StopReason | None, stats: GenerationStats | None) -> None:
        if error is not None:
            self.failure = GenerationError(self._explain(error))
            self.failure.__cause__ = error.__cause__ if isinstance(error, GenerationError) else error
            reason = StopReason.ERROR
        elif self.cancelled.is_set():
            reason = StopReason.STOPPED
        elif reason is None:
            reason = StopReason.END_OF_TURN if self.last_token in STOP_IDS else StopReason.LENGTH
        if stats is None:
            after = None if self.tokens_at_cancel is None else self.n_tokens - self.tokens_at_cancel
            seconds = time.perf_counter() - self.started
            stats = GenerationStats(self.n_tokens, seconds, reason, self.seed, after, self.batched, self.sampling)
            self._log(stats)
        self.stats = stats
        self.items.put(_END)
        self.done.set()

    def _log(self, stats: GenerationStats) -> None:
        log.info(
            "generation finished (%s): %s, %d tokens in %.2fs (%.1f tokens/s)%s",
            "batched" if self.batched else "single",
            stats.stop_reason,
            stats.n_tokens,
            stats.seconds,
            stats.tokens_per_second,
            "" if stats.tokens_after_cancel is None else f", {stats.tokens_after_cancel} tokens after cancel",
        )


class Answer:
    """One running answer: a contract.AnswerStream. Iterate it for text deltas; cancel() ends the
    producer's work (a local model's after the current decode step); stats is set once it is over.

    With a tokenizer the feed carries token ids, decoded here; without one, text."""

    def __init__(self, feed: Feed, tokenizer: OrcaTokenizer | None = None):
        self._feed = feed
        self._decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        # The ids read so far: what Orca 2 wrote after the prompt (the newline that ends its role line
        # included, the end-of-turn token not); None where the producer sees only text.
        self.token_ids: list[int] | None = [] if tokenizer is not None else None
        weakref.finalize(self, feed.cancel)

    @property
    def notices(self) -> tuple[str, ...]:
        return self._feed.notices

    @property
    def stats(self) -> GenerationStats | None:
        """How the answer went, once the producer has stopped working on it."""
        return self._feed.stats

    def cancel(self) -> None:
        self._feed.cancel()

    def wait(self, timeout: float) -> bool:
        """Wait until the producer has stopped working on this answer; True once it has."""
        return self._feed.done.wait(timeout)

    def __iter__(self) -> Iterator[str]:
        ended = False
        while not ended:
            items = self._next_items()
            if ended := _END in items:
                items = items[: items.index(_END)]
            if delta := self._text(items):
                yield delta
        if self._decoder is not None and (tail := self._decoder.flush()):
            yield tail
        if (failure := self._feed.failure) is not None:
            raise GenerationError(str(failure)) from failure.__cause__

    def _text(self, items: list) -> str:
        if self._decoder is None or self.token_ids is None:
            return "".join(items)
        tokens = [token for token in items if token not in STOP_IDS]
        self.token_ids += tokens
        return "".join(self._decoder.push(token) for token in tokens)

    def _next_items(self) -> list:
        """Item by item while the reader keeps up; a reader that fell behind (a slow network) gets
        what has piled up in one piece instead of a backlog of updates."""
        feed = self._feed
        while True:
            try:
                items = [feed.items.get(timeout=WAIT_SECONDS)]
                break
            except queue.Empty:
                if not feed.alive():  # nothing will close the answer: end it here
                    feed.close(RuntimeError("the model's side stopped without finishing the answer"))
        while not feed.items.empty():
            items.append(feed.items.get_nowait())
        return items


class AnswerTurns:
    """The model's turns, for a backend whose answers run one at a time: a turn that ends goes to whoever
    waits and was served least recently (then to the first to ask), so one client's pile of answers keeps
    another visitor waiting behind the answer running, not behind all of them. `whose` is
    Backend.generate's; other work on the model (scoring, closing) waits as the app's own ("")."""

    def __init__(self):
        self._changed = threading.Condition()
        self._busy = False
        # (order of asking, whose) of every waiter, and the turn each owner waiting last had.
        self._waiting: list[tuple[int, str]] = []
        self._served: dict[str, int] = {}
        self._count = itertools.count()

    def take(self, whose: str = "", give_up: threading.Event | None = None) -> bool:
        """Wait for the turn; False, without it, once give_up is set (checked every 0.05 s)."""
        with self._changed:
            ticket = (next(self._count), whose)
            self._waiting.append(ticket)
            try:
                while self._busy or min(self._waiting, key=self._priority) != ticket:
                    if give_up is not None and give_up.is_set():
                        return False
                    self._changed.wait(0.05)
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next in line may be someone else now
            self._busy = True
            self._served[whose] = next(self._count)
            return True

    def give_back(self) -> None:
        with self._changed:
            self._busy = False
            # Only owners still waiting need their last turn remembered: the record stays small.
            waiting = {whose for _, whose in self._waiting}
            self._served = {whose: turn for whose, turn in self._served.items() if whose in waiting}
            self._changed.notify_all()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The turn for the app's own work on the model."""
        self.take()
        try:
            yield
        finally:
            self.give_back()

    def _priority(self, ticket: tuple[int, str]) -> tuple[int, int]:
        asked, whose = ticket
        return self._served.get(whose, -1), asked


def produce_in_turn(
    feed: Feed, turns: AnswerTurns, whose: str, tokens: Callable[[], Generator[int, None, None]]
) -> None:
    """A producer thread's whole answer, for a backend whose answers take turns: wait for the turn (its
    holder gives it back however it ends, and everything it waits on is bounded), looking for Stop
    meanwhile; push each id of tokens() until Stop; close the feed with what failed, logged once here
    (the backend goes on). Closing the token stream stops the model too (the only way that reaches
    ZeroGPU's worker)."""
    error = None
    try:
        if not turns.take(whose, feed.cancelled):
            return
        try:
            if feed.cancelled.is_set():
                return
            feed.started = time.perf_counter()  # the answer's speed, not its wait for its turn
            with contextlib.closing(tokens()) as stream:
                for token in stream:
                    feed.push(token)
                    if feed.cancelled.is_set():
                        break
        finally:
            turns.give_back()
    except Exception as failure:
        log.exception("generation failed")
        error = failure
    finally:
        feed.close(error)

"""Concurrent greedy answers share decode steps in one batch (transformers' continuous batching).

A GPU (or CPU) decoding one sequence is mostly idle: a step for 8 sequences costs little more than
a step for one. transformers 5's ContinuousBatchingManager runs one model thread that adds and
removes requests at every step over a paged KV cache; this module sizes it explicitly, routes its
outputs to each request's own stream, and turns a cancel into "the model stopped working on it".

What it can't honour per request is kept off it (Sampling.batchable decides): the manager's sampling and
seed are global, and it has no repetition penalty, so only greedy answers are batched.

Nothing waits forever: if the model thread fails, the manager ends the answers it held with the
error and is started again; if the dispatcher fails, it ends the answers in flight and goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus

from ...settings import BATCH_PAGE_TOKENS, Settings
from ..sampling import Sampling

log = logging.getLogger(__name__)

# While answers are in flight, each output wakes the dispatcher at once; this only paces its check
# that the model thread is still alive.
BUSY_WAIT_SECONDS = 0.5
# A cancelled answer gets no last output to wake the dispatcher, so it looks this often.
CANCEL_POLL_SECONDS = 0.02
# With nothing in flight there is nothing to check: the dispatcher sleeps until a request comes.
IDLE_WAIT_SECONDS = 5.0
# A model thread that failed exits at once; this bounds the wait for it before starting another.
RESTART_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class BatchingSettings:
    # Answers decoded together; more wait for a free place.
    max_concurrent: int = 8
    # KV-cache size, in tokens, shared by the answers in the batch. Allocated once at start:
    # Orca-2-7B needs 0.5 MiB per token in 16-bit (16384 tokens: 8 GiB).
    cache_tokens: int = 16384

    def __post_init__(self):
        if self.max_concurrent < 1:
            raise ValueError("batching needs at least one concurrent answer")
        if self.cache_tokens < BATCH_PAGE_TOKENS:
            raise ValueError(f"the batch KV cache needs at least {BATCH_PAGE_TOKENS} tokens")


def batching_settings(settings: Settings) -> BatchingSettings | None:
    """How to batch concurrent answers (--batching, --concurrency, --batch-cache-tokens), or None to
    answer one at a time."""
    if not settings.batching:
        return None
    return BatchingSettings(settings.concurrency, settings.batch_cache_tokens or machine_batch_cache_tokens())


def machine_batch_cache_tokens() -> int:
    """The batch KV cache's default size: four full contexts on a GPU (8 GiB for 7B in 16-bit), two in RAM."""
    return 16384 if torch.cuda.is_available() else 8192


class TokenSink(Protocol):
    """Where a request's tokens go (its answer's Feed)."""

    def push(self, token: int) -> None: ...

    def close(self, error: BaseException | None = None) -> None: ...


class Batcher:
    """One continuous-batching manager over the model, shared by every batched request."""

    def __init__(self, model, settings: BatchingSettings, context_length: int):
        if settings.cache_tokens < context_length:
            # A request larger than the whole cache makes the manager fail every request in flight.
            raise ValueError(
                f"the batch KV cache ({settings.cache_tokens} tokens) must hold a full context ({context_length})"
            )
        _log_through_the_app()
        # Each request sets its own max_new_tokens and stop ids; what they share is greedy decoding.
        greedy = GenerationConfig(**Sampling(max_new_tokens=256).transformers_config())
        sizing = ContinuousBatchingConfig(
            page_size=BATCH_PAGE_TOKENS,
            # Sized from config, not from RAM: the default takes 60% of free memory.
            num_blocks=math.ceil(settings.cache_tokens / BATCH_PAGE_TOKENS) + 1,
            # Also the prefill chunk: a long prompt joins a page at a time, so the answers already
            # streaming pause for one such chunk at most (~0.35 s on 2 CPU cores for 134M params).
            max_batch_tokens=BATCH_PAGE_TOKENS,
            max_requests_per_batch=settings.max_concurrent,
            max_memory_percent=1.0,
        )
        self._manager = model.init_continuous_batching(generation_config=greedy, continuous_batching_config=sizing)
        # The requests in flight; guarded by _lock.
        self._sinks: dict[str, TokenSink] = {}
        self._sent: dict[str, int] = {}
        self._cancelling: set[str] = set()
        self._lock = threading.Lock()
        # Submitting and restarting take turns, so a restart fails only what the dead model thread held.
        self._admit = threading.Lock()
        self._work = threading.Event()
        self._ids = itertools.count()
        self._closing = threading.Event()
        self._manager.start()
        # One reader for the manager's single output queue, routing to each request's sink.
        self._dispatcher = threading.Thread(target=self._dispatch, name="orca2-batch-dispatch", daemon=True)
        self._dispatcher.start()

    def alive(self) -> bool:
        """Whether anything still routes the batch's outputs (a reader waiting on a dead one would wait forever)."""
        return self._dispatcher.is_alive()

    def submit(self, input_ids: list[int], sampling: Sampling, sink: TokenSink) -> Callable[[], None]:
        """Start a greedy answer; returns the function that cancels it."""
        request_id = f"orca2-{next(self._ids)}"
        with self._admit:
            if not self._manager.is_running():
                self._restart()
            accepted = self._add(request_id, input_ids, sampling, sink)
            if not accepted and self._restart():  # it was still dying
                accepted = self._add(request_id, input_ids, sampling, sink)
        self._work.set()
        if not accepted:
            sink.close(RuntimeError("the batching engine is not accepting requests"))
        return lambda: self._cancel(request_id)

    def _add(self, request_id: str, input_ids: list[int], sampling: Sampling, sink: TokenSink) -> bool:
        # The sink is in place before the manager can answer; it leaves again if the manager refuses.
        with self._lock:
            self._sinks[request_id] = sink
            self._sent[request_id] = 0
        accepted = self._manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=sampling.max_new_tokens,
            streaming=True,
            eos_token_id=list(sampling.stop_ids),
        )
        if accepted is None:
            with self._lock:
                del self._sinks[request_id], self._sent[request_id]
        return accepted is not None

    def _restart(self) -> bool:
        """Start a model thread that died again (transformers logged why); call with _admit held."""
        if self._closing.is_set():
            return False
        self._manager.join(time.perf_counter(), timeout=RESTART_WAIT_SECONDS)
        if self._manager.is_running():
            return False
        log.warning("the batch's model thread stopped; restarting it")
        # The manager failed what it held with its error; anything it missed ends here.
        self._end_all(RuntimeError("the batch stopped unexpectedly"))
        self._manager.start()
        return True

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._sinks:
                return
            self._cancelling.add(request_id)
        self._manager.cancel_request(request_id)

    def _finish(self, request_id: str, error: BaseException | None = None) -> None:
        with self._lock:
            sink = self._sinks.pop(request_id, None)
            self._sent.pop(request_id, None)
            self._cancelling.discard(request_id)
        if sink is not None:
            sink.close(error)

    def _end_all(self, error: BaseException) -> None:
        """End every answer in flight with the error, and take them off the batch."""
        with self._lock:
            request_ids = list(self._sinks)
        for request_id in request_ids:
            self._finish(request_id, error)
            self._manager.cancel_request(request_id)

    def _dispatch(self) -> None:
        while not self._closing.is_set():
            try:
                self._dispatch_once()
            except Exception as error:
                log.exception("the batch dispatcher failed; ending the answers in flight")
                self._end_all(RuntimeError(f"the batch dispatcher failed: {error}"))
        self._end_all(RuntimeError("the server is shutting down"))

    def _dispatch_once(self) -> None:
        with self._lock:
            in_flight, cancelling = bool(self._sinks), bool(self._cancelling)
        if not in_flight:
            # An idle server sleeps here instead of polling the manager's output queue.
            self._work.wait(IDLE_WAIT_SECONDS)
            self._work.clear()
            return
        output = self._manager.get_result(timeout=CANCEL_POLL_SECONDS if cancelling else BUSY_WAIT_SECONDS)
        if output is not None:
            self._deliver(output)
        elif not self._manager.is_running():
            with self._admit:
                if not self._manager.is_running():  # unless a submit restarted it meanwhile
                    self._restart()
        self._end_cancelled()

    def _deliver(self, output) -> None:
        with self._lock:
            sink = self._sinks.get(output.request_id)
            sent = self._sent.get(output.request_id, 0)
            if sink is not None:
                # Streamed outputs carry every token so far; send the new ones.
                self._sent[output.request_id] = len(output.generated_tokens)
        if sink is None:
            return
        for token in output.generated_tokens[sent:]:
            sink.push(token)
        if output.is_finished():
            failed = output.status == RequestStatus.FAILED
            self._finish(output.request_id, RuntimeError(output.error) if failed else None)

    def _end_cancelled(self) -> None:
        """A cancelled request gets no last output: it is over once the manager has dropped it
        (at the start of the step after the cancel; the step in flight may still add a token)."""
        with self._lock:
            cancelling = set(self._cancelling)
        if cancelling:
            for request_id in cancelling - still_held(self._manager, cancelling):
                self._finish(request_id)

    def close(self) -> None:
        """Stop the model thread; answers in flight end with an error, not a hang."""
        self._closing.set()
        self._work.set()
        with self._admit:
            self._manager.stop(block=True, timeout=10, hard_stop=True)
        self._dispatcher.join(timeout=10)


def still_held(manager, request_ids: set[str]) -> set[str]:
    """Which of these cancelled requests the manager may still be working on.

    transformers gives a cancelled request no last output, and no public way to ask whether it is
    gone, so this reads its cancel queue and scheduler (test_batching.py fails if they change).
    """
    if not manager.cancel_queue.empty():
        return set(request_ids)  # the model thread has not taken the cancels in yet
    processor = manager.batch_processor
    if processor is None:
        return set()
    scheduler = processor.scheduler
    return {r for r in request_ids if r in scheduler.active_requests or r in scheduler.waiting_requests}


def _log_through_the_app() -> None:
    """transformers' batching logger prints to a stderr handler of its own, past the app's logging:
    route it through the app's handlers instead, so that a failure of the batch is in the app's log
    (once, with its traceback). Its INFO lines (a dozen per start and stop) are not this app's business."""
    batching_log = logging.getLogger("ContinuousBatchingLogger")
    batching_log.setLevel(logging.WARNING)
    for handler in list(batching_log.handlers):
        batching_log.removeHandler(handler)
    batching_log.propagate = True

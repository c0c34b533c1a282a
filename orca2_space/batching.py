"""Concurrent greedy answers share decode steps in one batch (transformers' continuous batching).

A GPU (or CPU) decoding one sequence is mostly idle: a step for 8 sequences costs little more than
a step for one. transformers 5's ContinuousBatchingManager runs one model thread that adds and
removes requests at every step over a paged KV cache; this module sizes it explicitly, routes its
outputs to each request's own stream, and turns a cancel into "the model stopped working on it".

What it can't honour per request is kept off it (engine.py decides): the manager's sampling and
seed are global, and it has no repetition penalty, so only greedy answers are batched.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable
from typing import Protocol

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus

from .settings import BATCH_PAGE_TOKENS, BatchingSettings
from .prompt import PAD, STOP_IDS

log = logging.getLogger(__name__)

class TokenSink(Protocol):
    """Where a request's tokens go (the engine's per-request state)."""

    def push(self, token: int) -> None: ...

    def close(self, error: BaseException | None = None) -> None: ...


class Batcher:
    """One continuous-batching manager over the model, shared by every batched request."""

    def __init__(self, model, settings: BatchingSettings, context_length: int):
        if settings.cache_tokens < context_length:
            # A request larger than the whole cache makes the manager fail every request in flight.
            raise ValueError(f"the batch KV cache ({settings.cache_tokens} tokens) must hold a full context ({context_length})")
        self.settings = settings
        # Its INFO lines (a dozen per start and stop) are not this app's business.
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        greedy = GenerationConfig(do_sample=False, eos_token_id=list(STOP_IDS), pad_token_id=PAD, max_new_tokens=256)
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
        self._sinks: dict[str, TokenSink] = {}
        self._sent: dict[str, int] = {}
        self._cancelling: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closing = threading.Event()
        self._manager.start()
        # One reader for the manager's single output queue, routing to each request's sink.
        self._dispatcher = threading.Thread(target=self._dispatch, name="orca2-batch-dispatch", daemon=True)
        self._dispatcher.start()

    def submit(self, input_ids: list[int], max_new_tokens: int, sink: TokenSink) -> Callable[[], None]:
        """Start a greedy answer; returns the function that cancels it."""
        request_id = f"orca2-{next(self._ids)}"
        with self._lock:
            self._sinks[request_id] = sink
            self._sent[request_id] = 0
        accepted = self._manager.add_request(
            input_ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True, eos_token_id=list(STOP_IDS)
        )
        if accepted is None:
            self._finish(request_id, RuntimeError("the batching engine is not accepting requests"))
        return lambda: self._cancel(request_id)

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

    def _dispatch(self) -> None:
        while not self._closing.is_set():
            output = self._manager.get_result(timeout=0.02)
            if output is not None:
                self._deliver(output)
            self._end_cancelled()
        with self._lock:
            left = list(self._sinks)
        for request_id in left:
            self._finish(request_id, RuntimeError("the server is shutting down"))

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
        if not self._cancelling or not self._manager.cancel_queue.empty():
            return
        processor = self._manager.batch_processor
        scheduler = processor.scheduler if processor is not None else None
        with self._lock:
            cancelling = list(self._cancelling)
        for request_id in cancelling:
            if scheduler is None or (request_id not in scheduler.active_requests and request_id not in scheduler.waiting_requests):
                self._finish(request_id)

    def close(self) -> None:
        """Stop the model thread; answers in flight end with an error, not a hang."""
        self._manager.stop(block=True, timeout=10, hard_stop=True)
        self._closing.set()
        self._dispatcher.join(timeout=10)

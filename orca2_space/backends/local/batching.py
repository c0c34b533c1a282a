"""Concurrent answers share decode steps in one batch (transformers' continuous batching).

A GPU (or CPU) decoding one sequence is mostly idle: a step for 8 sequences costs little more than
a step for one. transformers 5's ContinuousBatchingManager runs one model thread that adds and
removes requests at every step over a paged KV cache; this module sizes it explicitly, routes its
outputs to each request's own stream, and turns a cancel into "the model stopped working on it".

Each request decodes with its own settings, seed and repetition penalty (batch_sampling.py), so a
sampled answer is the same token for token in the batch as alone (seeded_sampling.py).

Nothing waits forever: if the model thread fails, the manager ends the answers it held with the
error and is started again; if the dispatcher fails, it ends the answers in flight and goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus

from ...settings import BATCH_PAGE_TOKENS, Settings
from ..sampling import Sampling
from . import batch_sampling

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


@dataclass(eq=False)
class _Job:
    """One answer the batch serves: what it was asked, for whom, and what it has written so far."""

    input_ids: list[int]
    sampling: Sampling
    sink: TokenSink
    whose: str
    # Order of asking: a job set aside keeps its place among the waiting.
    arrival: int
    written: list[int] = field(default_factory=list)
    # While the manager holds it: its id there, and how much was written before (a resumed job's
    # outputs count from its resumption).
    request_id: str | None = None
    resumed_at: int = 0
    # Cancelled in the manager, to resume once dropped (set aside) or to end (stopped).
    setting_aside: bool = False
    stopped: bool = False

    def finished_writing(self) -> bool:
        """Whether a job set aside had already written its last token (a stop id, or its length)."""
        written = self.written
        return len(written) >= self.sampling.max_new_tokens or bool(written and written[-1] in self.sampling.stop_ids)


class Batcher:
    """One continuous-batching manager over the model, shared by every batched request.

    The batch's places are shared fairly between those it serves (`whose`: a network address): a
    place that frees goes to the one with the fewest answers in the batch, and when someone waits with
    fewer than an even share while another holds more, one of the other's answers is set aside: taken
    out of the batch and resumed later from where it was, its prompt and what it wrote read again
    (vLLM's preemption by recomputation). Without it, one client's answers could fill every place
    and a visitor asking next would wait for one of them to end.
    """

    def __init__(self, model, settings: BatchingSettings, context_length: int):
        if settings.cache_tokens < context_length:
            # A request larger than the whole cache makes the manager fail every request in flight.
            raise ValueError(
                f"the batch KV cache ({settings.cache_tokens} tokens) must hold a full context ({context_length})"
            )
        _log_through_the_app()
        # Each request sets its own max_new_tokens, stop ids and sampling: the batch takes the argmax
        # of the scores batch_sampling hands it.
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
            **batch_sampling.CONFIG,
        )
        self._places = settings.max_concurrent
        self._manager = model.init_continuous_batching(generation_config=greedy, continuous_batching_config=sizing)
        batch_sampling.install(self._manager)
        # The jobs in the manager, by request id, and those waiting for a place; guarded by _lock.
        self._jobs: dict[str, _Job] = {}
        self._waiting: list[_Job] = []
        self._lock = threading.Lock()
        # Scheduling and restarting take turns, so a restart fails only what the dead model thread held.
        self._admit = threading.Lock()
        self._work = threading.Event()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._closing = threading.Event()
        self._manager.start()
        # One reader for the manager's single output queue, routing to each request's sink.
        self._dispatcher = threading.Thread(target=self._dispatch, name="orca2-batch-dispatch", daemon=True)
        self._dispatcher.start()

    def alive(self) -> bool:
        """Whether anything still routes the batch's outputs (a reader waiting on a dead one would wait forever)."""
        return self._dispatcher.is_alive()

    def held(self) -> int:
        """The answers the batch holds: in the manager or waiting for a place."""
        with self._lock:
            return len(self._jobs) + len(self._waiting)

    def submit(self, input_ids: list[int], sampling: Sampling, sink: TokenSink, whose: str = "") -> Callable[[], None]:
        """Start an answer for `whose` (who shares the batch's places with whom); returns the function
        that cancels it."""
        job = _Job(list(input_ids), sampling, sink, whose, next(self._arrivals))
        with self._lock:
            self._waiting.append(job)
        self._schedule()
        self._work.set()
        return lambda: self._cancel(job)

    def _schedule(self) -> None:
        """Give free places to those waiting, fairly, setting aside answers over an even share for those
        under it."""
        with self._admit:
            with self._lock:
                if not self._waiting:
                    return
            # A model thread that died is started again for them (the dispatcher restarts it otherwise,
            # once it has routed what the dead one failed with).
            if not self._manager.is_running():
                self._restart()
            with self._lock:
                starts, set_aside = self._plan()
                for job in starts:
                    self._waiting.remove(job)
                    job.request_id = f"orca2-{next(self._ids)}"
                    self._jobs[job.request_id] = job
            # Cancels first: the manager drops them before it takes in the new requests, in the same step
            # (continuous_api's prepare_next_batch), so a place set aside is taken at the next step.
            for job in set_aside:
                self._manager.cancel_request(job.request_id)
            for job in starts:
                if not self._start(job) and not (self._restart() and self._start(job)):
                    self._finish(job, RuntimeError("the batching engine is not accepting requests"))

    def _plan(self) -> tuple[list[_Job], list[_Job]]:
        """The waiting jobs that start now, each in turn the one whose owner holds the fewest places (then
        the first to ask), and the answers set aside to make room for them: while the next one's owner
        holds less than an even share (the places over the owners running or waiting), the latest answer
        of whoever holds the most over it. Call with _lock held."""
        holding = self._holding()
        free = self._places - sum(holding.values())
        owners = set(holding) | {job.whose for job in self._waiting}
        even = max(1, self._places // max(1, len(owners)))
        waiting = list(self._waiting)
        starts: list[_Job] = []
        set_aside: list[_Job] = []
        while waiting:
            job = min(waiting, key=lambda job: (holding[job.whose], job.arrival))
            if free:
                free -= 1
            elif holding[job.whose] < even and (victim := self._over_share(holding, even)) is not None:
                victim.setting_aside = True
                holding[victim.whose] -= 1
                set_aside.append(victim)
            else:
                break  # no place, and whoever is next holds an even share already
            waiting.remove(job)
            holding[job.whose] += 1
            starts.append(job)
        return starts, set_aside

    def _holding(self) -> Counter[str]:
        """Places each owner holds in the manager, not counting answers on their way out."""
        return Counter(job.whose for job in self._jobs.values() if not (job.setting_aside or job.stopped))

    def _over_share(self, holding: Counter[str], even: int) -> _Job | None:
        """The answer to set aside: the latest (the least to read again) of whoever holds the most places,
        if that is more than an even share. Call with _lock held."""
        over = max(holding, key=lambda whose: holding[whose], default=None)
        if over is None or holding[over] <= even:
            return None
        theirs = [job for job in self._jobs.values() if job.whose == over and not (job.setting_aside or job.stopped)]
        return max(theirs, key=lambda job: job.arrival)

    def _start(self, job: _Job) -> bool:
        """Hand the job to the manager, resuming after what it has written; False if it refused."""
        job.resumed_at = len(job.written)
        accepted = self._manager.add_request(
            job.input_ids + job.written,
            request_id=job.request_id,
            max_new_tokens=job.sampling.max_new_tokens - len(job.written),
            streaming=True,
            eos_token_id=list(job.sampling.stop_ids),
            **batch_sampling.request_kwargs(job.sampling, written=len(job.written)),
        )
        if accepted is None:
            with self._lock:
                self._jobs.pop(job.request_id or "", None)
            return False
        if job.stopped or job.setting_aside:  # cancelled before the manager knew of it
            self._manager.cancel_request(job.request_id)
        return True

    def _restart(self) -> bool:
        """Start a model thread that died again (transformers logged why); call with _admit held."""
        if self._closing.is_set():
            return False
        self._manager.join(time.perf_counter(), timeout=RESTART_WAIT_SECONDS)
        if self._manager.is_running():
            return False
        log.warning("the batch's model thread stopped; restarting it")
        # The manager failed what it held with its error; anything it missed ends here.
        self._end_all(RuntimeError("the batch stopped unexpectedly"), waiting=False)
        self._manager.start()
        return True

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                request_id = None
            elif job.request_id in self._jobs:
                job.stopped = True
                request_id = job.request_id
            else:
                return  # already over
        if request_id is None:
            self._finish(job)
        else:
            self._manager.cancel_request(request_id)
            self._work.set()

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        with self._lock:
            self._jobs.pop(job.request_id or "", None)
            job.request_id = None
        job.sink.close(error)

    def _end_all(self, error: BaseException, waiting: bool = True) -> None:
        """End every answer in flight (and, with waiting, those waiting) with the error, and take them
        off the batch."""
        with self._lock:
            jobs = list(self._jobs.values())
            if waiting:
                jobs += self._waiting
                self._waiting.clear()
        for job in jobs:
            request_id = job.request_id
            self._finish(job, error)
            if request_id is not None:
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
            in_flight = bool(self._jobs)
            cancelling = any(job.setting_aside or job.stopped for job in self._jobs.values())
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
            self._schedule()
        self._end_cancelled()

    def _deliver(self, output) -> None:
        with self._lock:
            job = self._jobs.get(output.request_id)
            # A stopped job's outputs may still be in the manager's queue, decoded before the cancel but
            # read after it: Stop ends the answer where the visitor stopped it, not one token later.
            if job is None or job.stopped:
                return
            # Streamed outputs carry every token since the job's (re)start; send the new ones.
            new = output.generated_tokens[len(job.written) - job.resumed_at :]
            job.written += new
        for token in new:
            job.sink.push(token)
        if output.is_finished():
            failed = output.status == RequestStatus.FAILED
            self._finish(job, RuntimeError(output.error) if failed else None)
            self._schedule()

    def _end_cancelled(self) -> None:
        """A cancelled request gets no last output: it is over once the manager has dropped it (at the
        start of the step after the cancel; the step in flight may still add a token). A stopped job
        ends then; one set aside waits for a place again, in its order of asking."""
        with self._lock:
            leaving = {rid for rid, job in self._jobs.items() if job.setting_aside or job.stopped}
        if not leaving:
            return
        dropped = leaving - still_held(self._manager, leaving)
        resumed = []
        with self._lock:
            for request_id in dropped:
                job = self._jobs.get(request_id)  # ended meanwhile (a restart, or closing)?
                if job is None or job.stopped or job.finished_writing():
                    continue
                del self._jobs[request_id]
                job.request_id, job.setting_aside = None, False
                resumed.append(job)
            self._waiting = sorted(self._waiting + resumed, key=lambda job: job.arrival)
            ended = [self._jobs[request_id] for request_id in dropped if request_id in self._jobs]
        for job in ended:
            self._finish(job)
        if dropped:
            self._schedule()

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

"""The local backend: Orca 2 loaded once per process, one answer's tokens at a time, or concurrent
answers in one batch.

The engine knows ids and text, nothing of chats, moderation or pages. An answer run alone runs
``model.generate`` (the model card's own call) in a worker thread; a per-request event checked by a
StoppingCriteria after every decode step lets Stop end the model's work, not just the stream. Either
way the answer is an answer.Answer over a Feed that the worker thread (or the batch) pushes ids to;
a failure of the model ends the answer with a GenerationError while the engine goes on serving.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import secrets
import threading
from collections.abc import Callable, Generator

from ...prompt import OrcaTokenizer, Prompt
from ...settings import GenerationParams, on_zerogpu
from ..answer import Answer, AnswerTurns, Feed, produce_in_turn
from ..contract import ModelInfo, ModelLoadError, ScoringUnavailable, TokenProbability, scored_tokens
from ..sampling import Sampling
from . import zerogpu
from .batching import Batcher, BatchingSettings
from .generation import one_forward_at_a_time, reader_message, stream_tokens
from .loading import load_failure, load_model
from .scoring import score_ids
from .seeded_sampling import SCHEME

log = logging.getLogger(__name__)


class Engine:
    """One model, shared by every session and request."""

    def __init__(self, model, tokenizer: OrcaTokenizer, info: ModelInfo, batching: BatchingSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        # One unbatched generate at a time (without batching, or on ZeroGPU), as the model card runs it.
        self._turns = AnswerTurns()
        # One scoring at a time: their passes take turns anyway, so running two at once would gain
        # nothing and hold a KV cache each (scoring.py says how large).
        self._scoring = threading.Lock()
        self._batcher = None
        self._stream_tokens: Callable[[list[int], Sampling, threading.Event], Generator[int, None, None]]
        one_forward_at_a_time(model)
        if on_zerogpu():
            # Each answer borrows a GPU for its own duration: nothing persistent to batch on.
            zerogpu.lend(model)
            self._stream_tokens = lambda input_ids, sampling, cancel: zerogpu.stream_tokens_on_gpu(input_ids, sampling)
            self._score_ids = zerogpu.score_ids_on_gpu
        else:
            self._stream_tokens = functools.partial(stream_tokens, model)
            self._score_ids = functools.partial(score_ids, model)
            if batching is not None:
                self._batcher = Batcher(model, batching, info.context_length)

    def close(self) -> None:
        """Stop the batching thread, if any (answers in flight end with an error)."""
        if self._batcher is not None:
            self._batcher.close()

    @classmethod
    def load(
        cls,
        model_name: str,
        quantization: str = "auto",
        on_phase: Callable[[str], None] = lambda phase: None,
        batching: BatchingSettings | None = None,
    ) -> Engine:
        """Load the model; on_phase hears what is happening ("reading the config", …)."""
        try:
            model, tokenizer, info = load_model(model_name, quantization, on_phase, on_zerogpu())
            if batching is not None:
                on_phase(f"allocating the batch KV cache ({batching.cache_tokens} tokens)")
            engine = cls(model, tokenizer, info, batching)
        except Exception as error:  # every failure becomes one clear message
            log.debug("model load failed", exc_info=True)
            raise ModelLoadError(load_failure(model_name, error)) from error
        log.info("model ready: %s", info.describe())
        return engine

    def generate(self, prompt: Prompt, params: GenerationParams, whose: str = "") -> Answer:
        """Start answering; the returned Answer streams the answer's text. Batched answers share the
        batch's places fairly between whose (batching.Batcher); answers run alone take turns in order."""
        return Answer(self.produce(prompt.input_ids, params, whose), self.tokenizer)

    def produce(
        self, input_ids: list[int], params: GenerationParams, whose: str = "", feed: Callable[..., Feed] = Feed
    ) -> Feed:
        """Start the answer's producer and return the Feed it writes ids to; `feed` makes that Feed (the
        model's process relays what is written to it: process.py)."""
        sampling = Sampling.of(params)
        if sampling.do_sample and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbelow(2**32))
        scheme = SCHEME if sampling.do_sample else None
        if self._batcher is not None:
            answer = feed(sampling.seed, batched=True, explain=reader_message, sampling=scheme)
            answer.alive = self._batcher.alive
            answer.on_cancel = self._batcher.submit(input_ids, sampling, answer, whose)
            return answer
        answer = feed(sampling.seed, explain=reader_message, sampling=scheme)
        # The request's context goes along: ZeroGPU reads the visitor (for GPU quota) from it.
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run, answer, input_ids, sampling, whose),
            name="orca2-generate",
            daemon=True,
        )
        worker.start()
        answer.alive = worker.is_alive
        return answer

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        """Each answer id's probability given the prompt and the ids before it (temperature 1), and
        the `top` most likely ids at each position, from forward passes of scoring.score_chunk ids.

        It does not wait for the turns that keep unbatched generates one at a time. Its
        passes take their turns with the others (generation.one_forward_at_a_time), after any
        answer's pass that waits, so it runs between a long answer's decode steps and delays each
        by at most one of its passes. scoring.py has checked that it fits the context.
        """
        answer_ids = list(answer_ids)
        if not answer_ids:
            return []
        attention = self.model.config._attn_implementation
        if attention.startswith("paged"):
            # The batch switched an eager model to paged attention, which runs only inside the batch.
            raise ScoringUnavailable(
                f"Token probabilities are unavailable while the batch runs the model with {attention} attention; "
                "load the model with sdpa attention (the default) or run without batching."
            )
        with self._scoring:
            probabilities, alternatives = self._score_ids(prompt.input_ids + answer_ids, len(prompt.input_ids), top)
        return scored_tokens(self.tokenizer, answer_ids, probabilities, alternatives)

    def _run(self, feed: Feed, input_ids: list[int], sampling: Sampling, whose: str) -> None:
        produce_in_turn(feed, self._turns, whose, lambda: self._stream_tokens(input_ids, sampling, feed.cancelled))

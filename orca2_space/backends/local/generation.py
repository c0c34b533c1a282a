"""model.generate as a stream of token ids: the model card's own call, with a streamer, ended by
Stop after the current decode step. Also what makes the model's forward passes take turns."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Generator

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..answer import OUT_OF_MEMORY, WAIT_SECONDS, failure_message
from ..sampling import Sampling
from .seeded_sampling import SeededLogitsProcessor, transforms
from .turns import Turns

_END = object()
# A decode step, or even a long prompt's prefill on a slow CPU, ends well within this after Stop;
# past it the model thread is stuck, and the answer ends with an error instead of holding the engine.
MODEL_STOP_SECONDS = 300.0


def stream_tokens(
    model, input_ids: list[int], sampling: Sampling, cancel: threading.Event | None
) -> Generator[int, None, None]:
    """The ids model.generate writes, one by one.

    A sampled answer, or one with a repetition penalty, is decoded greedily over seeded_sampling's
    scores, as the batch decodes it; plain greedy is the model card's own call. Closing the iterator,
    or setting `cancel`, ends the model's work after the current decode step. On ZeroGPU this whole
    generator runs in the GPU worker process.
    """
    config, processors = _decoding(sampling, len(input_ids))
    closed = threading.Event()
    tokens: queue.SimpleQueue = queue.SimpleQueue()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            ids = torch.tensor([input_ids], device=model.device)
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    logits_processor=processors,
                    streamer=_TokenStreamer(tokens.put),
                    stopping_criteria=[_CancelCriteria(closed, cancel)],
                )
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer's thread
            failure.append(error)
        finally:
            tokens.put(_END)

    worker = threading.Thread(target=run, name="orca2-model", daemon=True)
    worker.start()
    try:
        while (token := _next_token(tokens, worker)) is not _END:
            yield token
    finally:
        closed.set()
        worker.join(timeout=MODEL_STOP_SECONDS)
        if worker.is_alive():
            raise RuntimeError(f"the model did not stop within {MODEL_STOP_SECONDS:.0f} s of being asked to")
    if failure:
        raise failure[0]


def _decoding(sampling: Sampling, prompt_length: int) -> tuple[GenerationConfig, LogitsProcessorList]:
    """generate's settings: the answer's own when greedy, else greedy over the seeded scores."""
    if not transforms(sampling):
        return GenerationConfig(**sampling.transformers_config()), LogitsProcessorList()
    greedy = Sampling(sampling.max_new_tokens, stop_ids=sampling.stop_ids)
    return GenerationConfig(**greedy.transformers_config()), LogitsProcessorList(
        [SeededLogitsProcessor(sampling, prompt_length)]
    )


def _next_token(tokens: queue.SimpleQueue, worker: threading.Thread):
    """The model thread's next token, or _END (which it puts last, even when it fails)."""
    while True:
        try:
            return tokens.get(timeout=WAIT_SECONDS)
        except queue.Empty:
            if not worker.is_alive() and tokens.empty():
                raise RuntimeError("the model thread ended without finishing the answer") from None


def reader_message(error: BaseException) -> str:
    """What a visitor reads when the model failed mid-answer (torch names its own out-of-memory)."""
    return OUT_OF_MEMORY if isinstance(error, torch.OutOfMemoryError) else failure_message(error)


class _TokenStreamer(BaseStreamer):
    """Receives each new token from generate (the first call is the prompt, skipped)."""

    def __init__(self, put: Callable[[int], None]):
        self._put = put
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._put(token)

    def end(self) -> None:
        pass


class _CancelCriteria(StoppingCriteria):
    """Checked after every decode step."""

    def __init__(self, *events: threading.Event | None):
        self._events = [e for e in events if e is not None]

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(e.is_set() for e in self._events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def one_forward_at_a_time(model) -> Turns:
    """Make the model's forward passes take turns, an answer's before scoring's (turns.py), and
    return the model's Turns. A plain forward (an answer run alone, or scoring) made while
    transformers' batch manager runs a step on the same model can read wrong logits (measured on
    the tiny model: up to 0.78 apart, one pass in two), so no two passes may overlap;
    tests/test_engine.py checks that they agree. The turn wraps the transformer body, which every
    path runs: generate, the batch's steps and scoring."""
    body = model.base_model
    turns = getattr(body, "_orca2_turns", None)
    if turns is not None:
        return turns
    turns = Turns()
    forward = body.forward

    @functools.wraps(forward)
    def take_turns(*args, **kwargs):
        with turns.turn():
            return forward(*args, **kwargs)

    body.forward = take_turns
    body._orca2_turns = turns
    return turns

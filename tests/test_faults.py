"""Nothing can hang: when a model step, the model thread or the batch's dispatcher fails, every
answer in flight ends with an error a visitor can read, the cause is logged once, and the next
question is answered as before. Each test ends because the answers' iteration ends."""

import pytest
import torch
from support import QUESTIONS, answer, prompt_for

from orca2_space.backends import answer as answer_module
from orca2_space.backends.answer import Answer, Feed
from orca2_space.backends.contract import GenerationError
from orca2_space.settings import GenerationParams

FAULTS = [
    pytest.param(RuntimeError("injected"), "failed while answering: injected", id="error"),
    pytest.param(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
        "ran out of memory",
        id="out-of-memory",
    ),
]


class Fault:
    """A forward pre-hook: the layer raises the armed error once, at its next call."""

    def __init__(self):
        self._error = None

    def arm(self, error: BaseException) -> None:
        self._error = error

    def __call__(self, module, args):
        error, self._error = self._error, None
        if error is not None:
            raise error


@pytest.fixture
def fault(tiny_engine):
    fault = Fault()
    handle = tiny_engine.model.model.layers[0].register_forward_pre_hook(fault)
    yield fault
    handle.remove()


def start_answers(engine, n: int = 3) -> tuple[list[Answer], list]:
    """n long answers, each already streaming."""
    generations = [engine.generate(prompt_for(engine, q), GenerationParams(max_new_tokens=2000)) for q in QUESTIONS[:n]]
    streams = [iter(generation) for generation in generations]
    for stream in streams:
        next(stream)
    return generations, streams


def read_to_the_end(stream, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        for _ in stream:
            pass


def causes_logged(caplog, text: str) -> int:
    return sum(1 for record in caplog.records if record.exc_info and text in str(record.exc_info[1]))


def same_answer(first, second) -> bool:
    (text, stats), (again, again_stats) = first, second
    return text == again and (stats.n_tokens, stats.batched) == (again_stats.n_tokens, again_stats.batched)


@pytest.mark.parametrize("error, message", FAULTS)
def test_a_failing_step_ends_the_answer_and_the_next_is_answered(tiny_engine, fault, caplog, error, message):
    before = answer(tiny_engine, QUESTIONS[0])
    [failing], [stream] = start_answers(tiny_engine, 1)
    queued = tiny_engine.generate(prompt_for(tiny_engine, QUESTIONS[0]), GenerationParams(max_new_tokens=40))
    fault.arm(error)
    read_to_the_end(stream, message)
    assert failing.stats.stop_reason == "error"
    assert causes_logged(caplog, "injected") == 1
    # The answer that waited for the model meanwhile, and the next one, are as before the fault.
    assert "".join(queued) == before[0]
    assert same_answer(answer(tiny_engine, QUESTIONS[0]), before)


@pytest.mark.parametrize("error, message", FAULTS)
def test_a_failing_batch_step_ends_every_answer_and_the_batch_answers_again(
    batched_tiny, fault, caplog, error, message
):
    before = answer(batched_tiny, QUESTIONS[0])
    generations, streams = start_answers(batched_tiny)
    fault.arm(error)  # the batch's model thread dies of it
    for stream in streams:
        read_to_the_end(stream, message)
    assert [generation.stats.stop_reason for generation in generations] == ["error"] * 3
    assert causes_logged(caplog, "injected") == 1
    after = answer(batched_tiny, QUESTIONS[0])
    assert after[1].batched and same_answer(after, before)


def test_a_failing_dispatcher_ends_every_answer_and_the_batch_answers_again(batched_tiny, caplog, monkeypatch):
    before = answer(batched_tiny, QUESTIONS[0])
    batcher = batched_tiny._batcher
    deliver = batcher._deliver

    def fail_once(output):
        monkeypatch.setattr(batcher, "_deliver", deliver)
        raise RuntimeError("injected")

    generations, streams = start_answers(batched_tiny)
    monkeypatch.setattr(batcher, "_deliver", fail_once)
    for stream in streams:
        read_to_the_end(stream, "dispatcher failed: injected")
    assert [generation.stats.stop_reason for generation in generations] == ["error"] * 3
    assert causes_logged(caplog, "injected") == 1
    assert same_answer(answer(batched_tiny, QUESTIONS[0]), before)


def test_an_answer_whose_writer_is_gone_ends_with_an_error(tokenizer, monkeypatch):
    """A thread or dispatcher that vanished without closing the answer: its reader stops waiting."""
    monkeypatch.setattr(answer_module, "WAIT_SECONDS", 0.01)
    state = Feed(seed=None, batched=False)
    state.push(tokenizer.encode_text("Hello")[0])
    state.alive = lambda: False
    generation = Answer(state, tokenizer)
    with pytest.raises(GenerationError, match="stopped without finishing"):
        list(generation)
    assert generation.stats.stop_reason == "error" and generation.wait(timeout=0)

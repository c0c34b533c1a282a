"""Batched generation: concurrent answers share decode steps, each streaming its own tokens, and
answer exactly as they would alone (sampled ones too: tests/test_seeded_sampling.py)."""

import threading
import time

import pytest
from support import QUESTIONS, answer, batched, prompt_for, wait_for

from orca2_space.backends.local.batching import Batcher, BatchingSettings, still_held
from orca2_space.backends.local.engine import Engine
from orca2_space.settings import GenerationParams


@pytest.fixture(scope="module")
def batched_never_ends(never_ends):
    engine = batched(never_ends)
    yield engine
    engine.close()


def test_a_greedy_answer_is_batched_and_identical_to_generate_alone(batched_tiny, tiny_engine):
    text, stats = answer(batched_tiny, QUESTIONS[0])
    assert stats.batched and stats.n_tokens == 40
    assert text == answer(tiny_engine, QUESTIONS[0])[0]


def test_concurrent_answers_stream_together_and_each_equals_its_answer_alone(batched_tiny, tiny_engine):
    arrivals: dict[str, list[float]] = {q: [] for q in QUESTIONS}
    texts: dict[str, str] = {}

    def chat(question):
        generation = batched_tiny.generate(prompt_for(batched_tiny, question), GenerationParams(max_new_tokens=60))
        parts = []
        for delta in generation:
            arrivals[question].append(time.perf_counter())
            parts.append(delta)
        texts[question] = "".join(parts)

    threads = [threading.Thread(target=chat, args=(q,)) for q in QUESTIONS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert texts == {q: answer(tiny_engine, q, max_new_tokens=60)[0] for q in QUESTIONS}
    # Every answer streamed in many pieces, and all were streaming at the same time.
    assert all(len(times) > 10 for times in arrivals.values())
    assert max(times[0] for times in arrivals.values()) < min(times[-1] for times in arrivals.values())


@pytest.mark.parametrize("engine_name", ["ends_with_im_end", "ends_with_eos"])
def test_a_batched_answer_ends_at_im_end_or_eos_without_control_text(request, engine_name):
    engine = batched(request.getfixturevalue(engine_name))
    try:
        text, stats = answer(engine, "Hi", max_new_tokens=64)
    finally:
        engine.close()
    assert text == "\nThe answer" and stats.stop_reason == "end_of_turn" and stats.batched
    assert stats.n_tokens == 4  # three words and the stop token


def test_stop_ends_the_batched_answers_work_within_one_decode_step(batched_never_ends):
    generation = batched_never_ends.generate(prompt_for(batched_never_ends), GenerationParams(max_new_tokens=3000))
    for n, _ in enumerate(generation, 1):
        if n == 5:
            generation.cancel()
    assert generation.wait(timeout=10), "the batch still holds the request after Stop"
    stats = generation.stats
    assert stats.stop_reason == "stopped" and stats.tokens_after_cancel <= 1 and stats.n_tokens < 3000
    scheduler = batched_never_ends._batcher._manager.batch_processor.scheduler
    assert not scheduler.active_requests and not scheduler.waiting_requests


def test_an_abandoned_batched_stream_is_dropped_from_the_batch(batched_never_ends):
    generation = batched_never_ends.generate(prompt_for(batched_never_ends), GenerationParams(max_new_tokens=3000))
    stream = iter(generation)
    next(stream)
    state = generation._feed
    del stream, generation
    assert state.done.wait(timeout=10) and state.stats.stop_reason == "stopped"


def test_stopping_one_answer_leaves_the_others_running(batched_never_ends):
    ids = prompt_for(batched_never_ends)
    kept, stopped = (batched_never_ends.generate(ids, GenerationParams(max_new_tokens=60)) for _ in range(2))
    stopped.cancel()
    assert len("".join(kept)) > 0 and kept.stats.stop_reason == "length" and kept.stats.n_tokens == 60
    assert stopped.wait(timeout=10) and stopped.stats.stop_reason == "stopped"


@pytest.mark.parametrize(
    "params",
    [
        dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, seed=7),  # a seed is per request
        dict(repetition_penalty=1.3),  # so is the repetition penalty
    ],
)
def test_sampled_and_penalised_answers_are_batched_with_their_own_settings(batched_tiny, tiny_engine, params):
    text, stats = answer(batched_tiny, QUESTIONS[1], **params)
    assert stats.batched
    assert text == answer(tiny_engine, QUESTIONS[1], **params)[0]


def test_a_seeded_answer_is_repeatable_while_batched_answers_run(batched_tiny):
    sampled = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=1234)
    alone = answer(batched_tiny, QUESTIONS[2], **sampled)[0]
    background = [
        batched_tiny.generate(prompt_for(batched_tiny, q), GenerationParams(max_new_tokens=60)) for q in QUESTIONS
    ]
    during = answer(batched_tiny, QUESTIONS[2], **sampled)[0]
    for generation in background:
        "".join(generation)
    assert during == alone


class Started:
    """The requests a batch hands its manager: one per answer, and one more each time an answer set aside
    resumes (counted through the manager's public add_request)."""

    def __init__(self, engine: Engine, monkeypatch):
        manager = engine._batcher._manager
        add_request = manager.add_request
        self.prompts: list[int] = []

        def counted(input_ids, **kwargs):
            self.prompts.append(len(input_ids))
            return add_request(input_ids, **kwargs)

        monkeypatch.setattr(manager, "add_request", counted)


def test_one_address_cannot_keep_every_place_from_a_visitor_who_asks_next(never_ends, monkeypatch):
    """Four endless answers for one address fill the batch's four places; a fifth, for another address,
    gets a place at once (one of the four is set aside) and ends, while all four go on streaming."""
    engine = batched(never_ends, max_concurrent=4)
    started = Started(engine, monkeypatch)
    params = GenerationParams(max_new_tokens=3000)
    try:
        flood = [engine.generate(prompt_for(engine), params, whose="203.0.113.66") for _ in range(4)]
        streams = [iter(generation) for generation in flood]
        for stream in streams:
            next(stream)  # each holds a place and is writing
        honest = engine.generate(prompt_for(engine), GenerationParams(max_new_tokens=8), whose="198.51.100.7")
        assert "".join(honest) and honest.stats.n_tokens == 8 and honest.stats.stop_reason == "length"
        assert len(started.prompts) == 6  # 4 + the honest answer + the one set aside, resumed
        for stream in streams:
            next(stream)  # still streaming, the one set aside included
        assert not any(generation.wait(0) for generation in flood)
    finally:
        engine.close()


def test_answers_set_aside_and_resumed_equal_their_answers_alone(tiny_engine, monkeypatch):
    """Greedy, seeded and penalised answers of one address, the latest set aside for another address's
    each time, resume where they were and write what they write alone, token for token."""
    engine = batched(tiny_engine, max_concurrent=2)
    started = Started(engine, monkeypatch)
    settings = [
        {},
        dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=0, seed=99),
        dict(repetition_penalty=1.3),
        dict(do_sample=True, temperature=1.2, top_k=40, seed=5, repetition_penalty=1.1),
    ]
    try:
        texts: dict[int, str] = {}

        def ask(index: int, whose: str) -> None:
            question = QUESTIONS[index % len(QUESTIONS)]
            params = GenerationParams(max_new_tokens=60, **settings[index])
            texts[index] = "".join(engine.generate(prompt_for(engine, question), params, whose=whose))

        threads = [threading.Thread(target=ask, args=(index, "a")) for index in range(len(settings))]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(started.prompts) >= 2, "the first address's answers to start")
        ask(0, "b")  # on the caller's thread: it ends once it has had its place
        for thread in threads:
            thread.join(timeout=120)
        assert any(length > min(started.prompts) for length in started.prompts[2:]), "nothing was set aside"
        alone = {
            index: answer(tiny_engine, QUESTIONS[index % len(QUESTIONS)], max_new_tokens=60, **settings[index])[0]
            for index in range(len(settings))
        }
        assert texts == alone
    finally:
        engine.close()


def test_stop_ends_answers_waiting_for_a_place_or_set_aside(never_ends):
    engine = batched(never_ends, max_concurrent=2)
    params = GenerationParams(max_new_tokens=3000)
    try:
        running = [engine.generate(prompt_for(engine), params, whose="a") for _ in range(2)]
        for generation in running:
            next(iter(generation))
        waiting = engine.generate(prompt_for(engine), params, whose="a")  # a holds its even share: it waits
        other = engine.generate(prompt_for(engine), params, whose="b")  # a's latest is set aside for it
        next(iter(other))
        for generation in (waiting, *running, other):
            generation.cancel()
            assert generation.wait(timeout=30) and generation.stats.stop_reason == "stopped"
        assert engine._batcher.held() == 0
    finally:
        engine.close()


def test_the_batch_cache_must_hold_a_whole_context(tiny_engine):
    with pytest.raises(ValueError, match="must hold a full context"):
        Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.info, BatchingSettings(cache_tokens=1024))


def test_closing_the_engine_ends_answers_in_flight_instead_of_hanging(never_ends):
    engine = batched(never_ends)
    generation = engine.generate(prompt_for(engine), GenerationParams(max_new_tokens=3000))
    next(iter(generation))
    engine.close()
    assert generation.wait(timeout=15) and generation.stats.stop_reason in ("error", "stopped")


def test_an_idle_batch_sleeps_instead_of_polling(batched_tiny, monkeypatch):
    answer(batched_tiny, QUESTIONS[0], max_new_tokens=3)  # it has worked, and is idle again
    batcher = batched_tiny._batcher
    wakeups = []
    dispatch_once = batcher._dispatch_once

    def counted():
        wakeups.append(1)
        dispatch_once()

    monkeypatch.setattr(batcher, "_dispatch_once", counted)
    time.sleep(2)
    # Polling the manager every 0.02 s, as it once did, would be about 100 wake-ups.
    assert len(wakeups) <= 3


def test_still_held_reads_transformers_internals_that_mean_what_it_assumes(tiny_engine):
    """transformers has no public way to learn that a cancelled request is gone. If this fails, its
    internals changed and batching.still_held must change with them."""
    batcher = Batcher(tiny_engine.model, BatchingSettings(max_concurrent=2, cache_tokens=8192), context_length=4096)
    manager = batcher._manager  # used directly: the batcher's dispatcher sleeps while it has no requests
    try:
        manager.add_request(prompt_for(tiny_engine).input_ids, request_id="probe", max_new_tokens=2000, streaming=True)
        first = manager.get_result(timeout=60)
        assert first.request_id == "probe" and not first.is_finished()
        with manager.pause():  # the model thread waits, having taken in its queues: the cancel stays queued
            manager.cancel_request("probe")
            assert not manager.cancel_queue.empty()
            assert "probe" in manager.batch_processor.scheduler.active_requests
            assert still_held(manager, {"probe"}) == {"probe"}
        wait_for(lambda: not still_held(manager, {"probe"}), "the cancelled request to leave the batch")
        scheduler = manager.batch_processor.scheduler
        assert "probe" not in scheduler.active_requests and "probe" not in scheduler.waiting_requests
        # And no last output says so: the reason still_held exists.
        outputs = iter(lambda: manager.get_result(timeout=0.5), None)
        assert not any(output.is_finished() for output in outputs)
    finally:
        batcher.close()

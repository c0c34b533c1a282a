"""Turns on the model: one pass at a time, an answer's pass before a waiting scoring pass, and a
scoring pass still gets the turn whenever no answer's pass waits for it (so scoring ends)."""

import contextlib
import functools
import threading
import time

from support import wait_for

from orca2_space.backends.local.turns import Turns, yielding


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_an_answers_pass_waiting_goes_before_a_scoring_pass_waiting_longer():
    turns, log = Turns(), []

    def scoring():
        with yielding(), turns.turn():
            log.append("scoring")

    def answer():
        with turns.turn():
            log.append("answer")

    with turns.turn():  # a pass under way
        waiting = [in_thread(scoring)]
        wait_for(lambda: turns.yielding_waiting == 1, "the scoring pass to wait")
        waiting.append(in_thread(answer))
        wait_for(lambda: turns.urgent_waiting == 1, "the answer's pass to wait")
        log.append("under way")
    for thread in waiting:
        thread.join(timeout=60)
    assert log == ["under way", "answer", "scoring"]


def test_a_scoring_pass_gets_a_turn_that_ends_with_no_answer_waiting():
    """The batch steps back to back: its next step, asked for right after its last, comes after the
    scoring pass that was waiting, instead of going first again forever."""
    turns, log = Turns(), []

    def scoring():
        with yielding(), turns.turn():
            log.append("scoring")

    with turns.turn():
        waiting = in_thread(scoring)
        wait_for(lambda: turns.yielding_waiting == 1, "the scoring pass to wait")
        log.append("step 1")
    with turns.turn():
        log.append("step 2")
    waiting.join(timeout=60)
    assert log == ["step 1", "scoring", "step 2"]


def test_no_two_passes_overlap():
    turns, inside, most = Turns(), [0], [0]

    def passes(marked: bool):
        for _ in range(200):
            with yielding() if marked else contextlib.nullcontext(), turns.turn():
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0)  # let the other threads run, as a forward pass does
                inside[0] -= 1

    threads = [in_thread(functools.partial(passes, marked)) for marked in (True, True, False, False)]
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and most == [1]
    assert turns.urgent_waiting == 0 and turns.yielding_waiting == 0


def test_yielding_marks_only_the_passes_made_inside_it():
    turns, log = Turns(), []
    with yielding():
        pass

    def answer():
        with turns.turn():
            log.append("answer")

    with turns.turn():
        thread = in_thread(answer)
        wait_for(lambda: turns.urgent_waiting == 1, "the pass made after yielding() to wait as an answer's")
    thread.join(timeout=60)
    assert log == ["answer"]

"""The turns of a backend whose answers run one at a time (answer.AnswerTurns): whoever waits and was served
least recently goes next, so one client's pile of answers can't keep another visitor waiting behind all
of them."""

import threading

from support import wait_for

from orca2_space.backends.answer import AnswerTurns


def turn_order(turns: AnswerTurns, asking: list[str]) -> list[str]:
    """Who gets the turn, in order, when each of `asking` waits for it (asking in that order) while it is
    held, and then it is given back."""
    order: list[str] = []

    def wait_turn(whose: str) -> None:
        assert turns.take(whose)
        order.append(whose)
        turns.give_back()

    threads = []
    for n, whose in enumerate(asking, 1):
        threads.append(threading.Thread(target=wait_turn, args=(whose,)))
        threads[-1].start()
        wait_for(lambda n=n: len(turns._waiting) == n, f"{n} waiting")
    turns.give_back()
    for thread in threads:
        thread.join(timeout=30)
    return order


def test_a_visitor_who_asks_behind_another_clients_pile_goes_next():
    turns = AnswerTurns()
    assert turns.take("flood")  # one of its answers runs
    assert turn_order(turns, ["flood", "flood", "flood", "honest"]) == ["honest", "flood", "flood", "flood"]


def test_two_piles_take_turns_about():
    turns = AnswerTurns()
    assert turns.take("a")
    assert turn_order(turns, ["a", "a", "a", "b", "b", "b"]) == ["b", "a", "b", "a", "b", "a"]


def test_a_waiter_who_gives_up_leaves_the_line_without_the_turn():
    turns = AnswerTurns()
    assert turns.take("a")
    stop = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(turns.take("b", stop)))
    waiter.start()
    wait_for(lambda: len(turns._waiting) == 1, "b waiting")
    stop.set()
    waiter.join(timeout=30)
    assert result == [False] and not turns._waiting
    turns.give_back()
    assert turns.take("c")  # the turn was free: b never held it

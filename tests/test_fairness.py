"""A fair share for everyone: a visitor (and an address) may have only a few requests running or
waiting, a comparison counting one per answer; more are refused at once with the reason, and nobody
waits behind someone else's pile. Answers, comparisons, scoring and prompt inspection all count. An
address has a budget of bytes too, and the page's work takes its address's turn."""

import contextlib
import threading

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from support import Clock, FakeBackend, Held, batched, free_port, refusal, wait_for

from orca2_space import fairness
from orca2_space.chat import Chat
from orca2_space.fairness import ByteBudget, FairShare, Limits, Refused, Visitor, counted_address, visitor_address
from orca2_space.scoring import token_probabilities
from orca2_space.settings import Settings
from orca2_space.ui.adapters import visitor_of

ALICE = Visitor("alice-session", "10.0.0.1")
ALICE_AGAIN = Visitor("alice-second-tab", "10.0.0.1")
BOB = Visitor("bob-session", "10.0.0.2")


@pytest.fixture
def hold():
    """hold(share, visitor) takes a place and keeps it: the request 'runs' until the test ends."""
    with contextlib.ExitStack() as places:
        yield lambda share, visitor, count=1: places.enter_context(share.admit(visitor, count))


def test_a_visitor_over_the_limit_is_refused_with_the_reason_and_others_go_on(hold):
    share = FairShare(Limits(per_visitor=2, per_address=8, total=40))
    hold(share, ALICE), hold(share, ALICE)
    with pytest.raises(Refused, match="You already have 2 requests running or waiting.*Wait for one to finish"):
        hold(share, ALICE)
    hold(share, BOB)
    assert share.in_progress() == 3


def test_new_sessions_from_one_address_do_not_dodge_the_address_limit(hold):
    share = FairShare(Limits(per_visitor=2, per_address=3, total=40))
    hold(share, ALICE), hold(share, ALICE), hold(share, ALICE_AGAIN)
    with pytest.raises(Refused, match="Your network address already has 3 requests"):
        hold(share, Visitor("alice-third-tab", "10.0.0.1"))
    hold(share, BOB)


def test_an_address_full_or_just_refused_for_its_limit_is_refused_at_the_door(hold, monkeypatch):
    """address_refusal: what guard.py answers before any work is spent on a request."""
    now = [100.0]
    monkeypatch.setattr(fairness.time, "monotonic", lambda: now[0])
    share = FairShare(Limits(per_visitor=4, per_address=4, total=40))
    assert share.address_refusal(ALICE.address) is None
    hold(share, ALICE, 3)
    assert share.address_refusal(ALICE.address) is None  # one more fits
    with pytest.raises(Refused) as refused:
        hold(share, ALICE_AGAIN, 2)  # doesn't fit
    assert share.address_refusal(ALICE.address) == str(refused.value)  # asking again at once: at the door
    assert share.address_refusal(BOB.address) is None
    now[0] += fairness.REFUSED_ADDRESS_SECONDS + 0.01
    assert share.address_refusal(ALICE.address) is None  # past the pause, it is looked at again
    hold(share, ALICE_AGAIN)
    assert share.address_refusal(ALICE.address).startswith("Your network address already has 4 requests")


def test_a_full_server_says_so(hold):
    share = FairShare(Limits(per_visitor=2, per_address=8, total=2))
    hold(share, ALICE), hold(share, BOB)
    with pytest.raises(Refused, match="The server is busy: 2 requests are running or waiting"):
        hold(share, Visitor("carol", "10.0.0.3"))


def test_a_place_is_given_back_when_the_request_ends_however_it_ends():
    share = FairShare(Limits(per_visitor=1, per_address=8, total=40))
    with share.admit(ALICE):
        pass
    with pytest.raises(RuntimeError), share.admit(ALICE):
        raise RuntimeError("the answer failed")
    with share.admit(ALICE):
        assert share.in_progress() == 1
    assert share.in_progress() == 0


def test_a_stream_that_is_left_gives_its_place_back(fake_backend):
    chat = Chat(fake_backend, Settings(visitor_limit=1))
    updates = chat.respond(chat.request("Hi", "", []), visitor=ALICE)
    next(updates)
    with pytest.raises(Refused):
        next(chat.respond(chat.request("Again", "", []), visitor=ALICE))
    updates.close()  # what Gradio does when the client leaves
    assert list(chat.respond(chat.request("Again", "", []), visitor=ALICE))[-1].answer == "The answer"


def test_a_request_counts_as_the_answers_it_runs_and_is_refused_if_they_do_not_fit(hold):
    share = FairShare(Limits(per_visitor=4, per_address=6, total=40))
    hold(share, ALICE)
    with pytest.raises(Refused, match=r"You already have 1 request running or waiting, and this one counts 4 \(one "):
        hold(share, ALICE, 4)
    hold(share, ALICE, 3)
    with pytest.raises(Refused, match="Your network address already has 4 requests.*this one counts 3"):
        hold(share, ALICE_AGAIN, 3)
    hold(share, ALICE_AGAIN, 2)
    assert share.in_progress() == 6


def test_by_default_a_visitor_can_compare_4_system_messages_and_that_is_their_whole_share(fake_backend):
    chat = Chat(fake_backend, Settings())
    comparison = chat.compare(chat.compare_requests("Hi", ["A", "B", "C", "D"]), visitor=ALICE)
    updates = [next(comparison)]
    assert chat.fair_share.in_progress() == 4
    with pytest.raises(Refused, match="You already have 4 requests running or waiting"):
        next(chat.respond(chat.request("And a chat", "", []), visitor=ALICE))
    updates += comparison
    assert [update.answer for update in updates[-1]] == ["The answer"] * 4
    assert chat.fair_share.in_progress() == 0


def test_a_comparison_larger_than_a_visitors_share_is_refused_saying_how_many_fit(fake_backend):
    chat = Chat(fake_backend, Settings(visitor_limit=2))
    with pytest.raises(Refused, match=r"one visitor run 2 at a time: compare at most 2 system messages \(got 3\)"):
        chat.compare_requests("Hi", ["A", "B", "C"])
    assert len(chat.compare_requests("Hi", ["A", "B"])) == 2


def test_inspecting_and_scoring_take_a_place_of_the_share(fake_backend):
    chat = Chat(fake_backend, Settings(visitor_limit=1))
    with chat.fair_share.admit(ALICE):
        with pytest.raises(Refused, match="You already have 1 request running or waiting"):
            chat.inspect("Hi", "", [], visitor=ALICE)
        with pytest.raises(Refused, match="You already have 1 request running or waiting"):
            token_probabilities(chat, "Hi", "", [], "The answer", visitor=ALICE)
        assert chat.inspect("Hi", "", [], visitor=BOB).n_tokens > 0
        assert token_probabilities(chat, "Hi", "", [], "The answer", visitor=BOB)
    assert fake_backend.scored and chat.fair_share.in_progress() == 0


@pytest.fixture(scope="module")
def shared_app(never_ends):
    """The app over the batched model that answers until stopped, with the default limits."""
    from orca2_space.cli import launch

    engine = batched(never_ends, max_concurrent=8)
    chat = Chat(engine, Settings(host="127.0.0.1", port=free_port(), max_new_tokens_cap=4000))
    demo = launch(chat, block=False)
    yield chat, demo.local_url
    demo.close()
    engine.close()


def test_one_client_holding_24_requests_neither_starves_another_nor_waits_in_line(shared_app):
    chat, url = shared_app
    hog, other = Client(url, verbose=False), Client(url, verbose=False)
    assert chat.settings.visitor_limit == 4
    jobs = [
        hog.submit(message=f"Tell me everything, part {n}", max_new_tokens=4000, api_name="/chat") for n in range(24)
    ]
    wait_for(lambda: sum(job.done() for job in jobs) >= 20, "20 of the 24 requests to come back", seconds=300)
    refused = refusals(jobs)
    # Refused at once: the 20 came back while the 4 admitted answers were still being written.
    assert len(refused) == 20 and all(for_the_share(reason, 4) for reason in refused)
    running = [job for job in jobs if not job.done()]
    assert len(running) == 4
    wait_for(lambda: all(job.outputs() for job in running), "the 4 admitted answers to start")

    progress = lambda: max(len(job.outputs()[-1]["answer_ids"] or []) for job in running)
    before = progress()
    first_token = threading.Event()
    other_job = other.submit(message="Hi", max_new_tokens=8, api_name="/chat")
    for update in other_job:
        if update["answer_ids"]:
            first_token.set()
            break
    # The hog's answers moved on by a few decode steps, not the thousands its pile would take.
    assert first_token.is_set() and progress() - before < 100
    assert other_job.result()["n_tokens"] == 8
    for job in running:
        job.cancel()


@pytest.fixture
def held_app(tokenizer):
    """The app over a model whose answers and scorings stay in progress until released, with a visitor
    limit of 2, as `--visitor-limit 2` sets it."""
    from orca2_space.cli import launch

    held = Held()
    chat = Chat(
        FakeBackend(tokenizer, ["\n", "The", " answer"], held=held), Settings(port=free_port(), visitor_limit=2)
    )
    demo = launch(chat, block=False)
    yield held, demo.local_url
    held.release()
    demo.close()


def refusals(jobs: list) -> list[str]:
    """The reasons of the jobs that were refused, once every other one is known to be in progress."""
    return [refusal(job) for job in jobs if job.done()]


def for_the_share(reason: str, visitor_limit: int) -> bool:
    """Whether a burst's request was refused for the visitor's share: by the fair share, or at the door
    while the queue held as many of the address's as it may (the ones it had are the share's to refuse)."""
    return f"You already have {visitor_limit} requests running or waiting" in reason or "waiting to start" in reason


def test_one_client_flooding_scoring_fills_neither_the_queue_nor_anyone_elses_share(held_app):
    held, url = held_app
    hog, other = Client(url, verbose=False), Client(url, verbose=False)
    # More than --max-queue (32) at once: held in Gradio's queue, these would tell everyone it is full.
    jobs = [
        hog.submit(message="Hi", system_message="", answer=f"Answer {n}", api_name="/token_probabilities")
        for n in range(36)
    ]
    wait_for(lambda: sum(job.done() for job in jobs) == 34 and held.waiting == 2, "34 refusals and 2 held scorings")
    reasons = refusals(jobs)
    assert len(reasons) == 34 and all(for_the_share(reason, 2) for reason in reasons)
    assert "You already have 2" in " ".join(reasons)  # the ones the queue had were refused by the fair share
    admitted = [job for job in jobs if not job.done()]
    with pytest.raises(AppError, match="You already have 2 requests running or waiting"):
        hog.predict(message="Hi", api_name="/inspect_prompt")

    answer = other.submit(message="Hi", max_new_tokens=8, api_name="/chat")
    inspected = other.predict(message="Hi", system_message="", api_name="/inspect_prompt")
    assert inspected["n_tokens"] > 0
    wait_for(lambda: held.waiting == 3, "the other visitor's answer to be admitted")
    held.release()
    assert answer.result()["answer"] == "The answer"
    scored = {"".join(token["text"] for token in job.result()["tokens"]) for job in admitted}
    assert len(scored) == 2 and all(text.startswith("\nAnswer ") for text in scored)


def test_with_a_visitor_limit_of_2_a_comparison_of_3_is_refused_saying_so_and_one_of_2_runs(held_app):
    held, url = held_app
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match=r"compare at most 2 system messages \(got 3\)"):
        client.predict(message="Hi", system_messages=["A", "B", "C"], api_name="/compare")
    held.release()
    answers = client.predict(message="Hi", system_messages=["A", "B"], api_name="/compare")["answers"]
    assert [answer["answer"] for answer in answers] == ["The answer", "The answer"]


def page_request(session: str | None) -> gr.Request:
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("10.16.3.80", 50000)}
    return gr.Request(request=Request(scope), session_hash=session)


def test_a_visitor_is_its_session_and_a_caller_without_one_counts_as_its_address():
    assert visitor_of(page_request("s1")) == Visitor("s1", "10.16.3.80")
    assert visitor_of(page_request(None)) == Visitor("address 10.16.3.80", "10.16.3.80")


# The address: each trusted proxy appends the address it sees to X-Forwarded-For; the client writes the rest.


def test_without_trusted_proxies_the_address_is_the_connections_whatever_the_header_says():
    assert visitor_address("10.16.3.80", ["203.0.113.7"], trusted_proxies=0) == "10.16.3.80"


def test_behind_one_proxy_the_address_is_the_one_it_appended_and_what_the_client_wrote_is_ignored():
    assert visitor_address("10.16.3.80", ["203.0.113.7"], trusted_proxies=1) == "203.0.113.7"
    assert visitor_address("10.16.3.80", ["1.2.3.4, 5.6.7.8, 203.0.113.7"], trusted_proxies=1) == "203.0.113.7"
    # A client's own header line comes first; the proxy's entry is still the last.
    assert visitor_address("10.16.3.80", ["1.2.3.4", "203.0.113.7"], trusted_proxies=1) == "203.0.113.7"


def test_behind_two_proxies_the_address_is_the_second_entry_from_the_right():
    forwarded = ["1.2.3.4, 203.0.113.7, 10.0.0.5"]
    assert visitor_address("10.16.3.80", forwarded, trusted_proxies=2) == "203.0.113.7"


def test_a_request_that_did_not_pass_every_trusted_proxy_counts_as_the_connection():
    assert visitor_address("10.16.3.80", [], trusted_proxies=1) == "10.16.3.80"
    assert visitor_address("10.16.3.80", ["203.0.113.7"], trusted_proxies=2) == "10.16.3.80"
    assert visitor_address("10.16.3.80", ["203.0.113.7, "], trusted_proxies=1) == "10.16.3.80"


def test_an_ipv6_address_counts_as_its_64_network_which_one_machine_cant_leave():
    """A machine on IPv6 may take any of its /64's 2^64 addresses: each must not be a new address."""
    assert counted_address("2001:db8:1:2:3:4:5:6") == counted_address("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert counted_address("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert visitor_address("10.16.3.80", ["2001:DB8:1:2::7"], trusted_proxies=1) == "2001:db8:1:2::/64"
    assert visitor_address("2001:db8:1:2::7", [], trusted_proxies=0) == "2001:db8:1:2::/64"


def test_an_ipv4_address_written_as_ipv6_or_not_an_ip_counts_as_it_is():
    assert counted_address("::ffff:192.0.2.1") == counted_address("192.0.2.1") == "192.0.2.1"
    assert counted_address("testclient") == "testclient"


def test_a_port_a_proxy_wrote_after_the_address_does_not_make_each_connection_an_address():
    assert counted_address("192.0.2.1:50312") == counted_address("192.0.2.1:50313") == "192.0.2.1"
    assert counted_address("[2001:db8:1:2::7]:50312") == "2001:db8:1:2::/64"
    assert counted_address("2001:db8:1:2::7") == "2001:db8:1:2::/64"  # the last group is not a port
    assert counted_address("testclient:80x") == "testclient:80x"


def test_addresses_of_one_64_network_share_its_limit(hold):
    share = FairShare(Limits(per_visitor=2, per_address=2, total=40))
    hold(share, Visitor("a", counted_address("2001:db8::1"))), hold(share, Visitor("b", counted_address("2001:db8::2")))
    with pytest.raises(Refused, match="Your network address already has 2 requests"):
        hold(share, Visitor("c", counted_address("2001:db8::3")))
    hold(share, Visitor("d", counted_address("2001:db8:0:1::1")))


# A budget of bytes per address (the door counts them: tests/test_hardening.py).


def test_an_address_may_send_its_burst_at_once_then_what_refills():
    clock = Clock()
    budget = ByteBudget(per_second=1000, burst_seconds=10, clock=clock)
    budget.spent("192.0.2.1", 9_000)
    assert budget.wait("192.0.2.1") == 0
    # One request larger than what is left passes whole; its address then waits for the budget to refill.
    budget.spent("192.0.2.1", 25_000)
    assert budget.wait("192.0.2.1") == 24 and budget.wait("192.0.2.2") == 0
    clock.now += 23.5
    assert budget.wait("192.0.2.1") == 1
    clock.now += 1
    assert budget.wait("192.0.2.1") == 0


def test_an_idle_address_saves_no_more_than_its_burst():
    clock = Clock()
    budget = ByteBudget(per_second=1000, burst_seconds=10, clock=clock)
    clock.now += 3600
    budget.spent("192.0.2.1", 10_000)
    assert budget.wait("192.0.2.1") == 1  # nothing left: the hour idle saved 10 s' worth
    budget.spent("192.0.2.2", 9_999)
    assert budget.wait("192.0.2.2") == 0


def test_the_pages_work_holds_a_place_and_is_refused_once_its_address_is_past_its_budget():
    share = FairShare(Limits(per_visitor=4, per_address=8, total=40, address_bytes_per_second=1000))
    with share.page_work(ALICE):
        assert share.in_progress() == 1
    share.bytes.spent(ALICE.address, 100_000)  # what that work moved, as the door counts it
    # A request whose own body made the debt was let in whole at the door, and does its work.
    with share.page_work(ALICE_AGAIN, brought=200_000):
        pass
    refused = pytest.raises(Refused, match=r"Your network address has moved more data .* Try again in \d+ s")
    with refused, share.page_work(ALICE_AGAIN):
        pass
    with share.page_work(BOB):
        pass
    assert share.in_progress() == 0


def test_the_pages_work_from_one_address_takes_turns_and_other_addresses_do_not_wait():
    """So the bytes one request moved count before the next starts: 8 at once would each find the
    budget unspent."""
    share = FairShare(Limits(per_visitor=4, per_address=8, total=40))
    events: list[str] = []
    first_in, first_may_end = threading.Event(), threading.Event()

    def first():
        with share.page_work(ALICE):
            first_in.set()
            first_may_end.wait(60)
            events.append("first ends")

    def second():
        with share.page_work(ALICE_AGAIN):
            events.append("second starts")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert first_in.wait(60)
    threads.append(threading.Thread(target=second))
    threads[1].start()
    wait_for(lambda: share.in_progress() == 2, "the second request to hold its place, waiting for its turn")
    with share.page_work(BOB):  # another address: in at once, while the first still holds Alice's turn
        events.append("other address")
    first_may_end.set()
    for thread in threads:
        thread.join(60)
    assert events == ["other address", "first ends", "second starts"]

"""A fair share for everyone: a visitor (and an address) may have only a few requests running or
waiting; more are refused at once with the reason, and nobody waits behind someone else's pile."""

import contextlib
import threading

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from support import batched, free_port, wait_for

from orca2_space.chat import Chat
from orca2_space.fairness import FairShare, Limits, Refused, Visitor
from orca2_space.settings import Settings
from orca2_space.ui.adapters import visitor_of

ALICE = Visitor("alice-session", "10.0.0.1")
ALICE_AGAIN = Visitor("alice-second-tab", "10.0.0.1")
BOB = Visitor("bob-session", "10.0.0.2")


@pytest.fixture
def hold():
    """hold(share, visitor) takes a place and keeps it: the request 'runs' until the test ends."""
    with contextlib.ExitStack() as places:
        yield lambda share, visitor: places.enter_context(share.admit(visitor))


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


def test_a_comparison_is_one_request_of_the_visitors_share(fake_backend):
    chat = Chat(fake_backend, Settings(visitor_limit=1))
    final = list(chat.compare(chat.compare_requests("Hi", ["A", "B", "C"]), visitor=ALICE))[-1]
    assert [update.answer for update in final] == ["The answer"] * 3


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
    assert chat.settings.visitor_limit == 2
    jobs = [
        hog.submit(message=f"Tell me everything, part {n}", max_new_tokens=4000, api_name="/chat") for n in range(24)
    ]
    wait_for(lambda: sum(job.done() for job in jobs) >= 22, "22 of the 24 requests to come back", seconds=300)
    refused = []
    for job in (job for job in jobs if job.done()):
        with pytest.raises(AppError) as error:
            job.result()
        refused.append(str(error.value))
    # Refused at once: the 22 came back while the 2 admitted answers were still being written.
    assert len(refused) == 22 and all("You already have 2 requests running or waiting" in r for r in refused)
    running = [job for job in jobs if not job.done()]
    assert len(running) == 2

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


def page_request(headers: dict, session: str | None = "s1") -> gr.Request:
    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": raw, "client": ("10.16.3.80", 50000)}
    return gr.Request(request=Request(scope), session_hash=session)


def test_on_a_space_the_address_is_the_one_its_proxy_forwards(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/orca2-space")
    visitor = visitor_of(page_request({"X-Forwarded-For": "203.0.113.7, 10.16.3.1"}))
    assert visitor == Visitor("s1", "203.0.113.7")


def test_elsewhere_the_address_is_the_connections(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert visitor_of(page_request({"X-Forwarded-For": "203.0.113.7"})) == Visitor("s1", "10.16.3.80")
    # A caller without a session counts as its address.
    assert visitor_of(page_request({}, session=None)).session == "address 10.16.3.80"

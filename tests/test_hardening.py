"""The server against a hostile visitor: an address can't be forged, monitoring is off, only the page's
own origin may read answers in a browser when there is a login, wrong passwords are throttled per
address, an address that sends more than its budget of bytes waits for it to refill, a malformed API
call is refused with what is wrong, and uploads are capped. Every check goes
through a launched server."""

import json
import time

import httpx
import pytest
from conftest import free_port
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from support import Clock, FakeBackend, Held, refusal, wait_for

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.settings import Settings
from orca2_space.ui.guard import REFUSAL_PAUSE_SECONDS, LoginThrottle, login_message

PASSWORD = "correct horse battery"
WRONG_LOGIN = {"username": "ann", "password": "wrong"}
RIGHT_LOGIN = {"username": "ann", "password": PASSWORD}
ADDRESS_REFUSAL = "Your network address already has"
STARTED = (Status.PROCESSING, Status.ITERATING)


@pytest.fixture(scope="module")
def open_app(never_ends):
    """The app as it runs off a Space (no proxy trusted, no login), with an address limit a test can fill
    and room in Gradio's queue for a burst of 44 requests (the fair share, not the queue, refuses them)."""
    settings = Settings(
        host="127.0.0.1", port=free_port(), max_new_tokens_cap=4000, address_limit=3, max_queue=64, max_upload_mb=1
    )
    demo = launch(Chat(never_ends, settings), block=False)
    yield settings, demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def guarded_app(never_ends):
    """With a login, behind one trusted proxy (this test's client plays it, writing X-Forwarded-For)."""
    settings = Settings(
        host="127.0.0.1",
        port=free_port(),
        max_new_tokens_cap=4000,
        auth=("ann", PASSWORD),
        trusted_proxies=1,
        address_limit=2,
        max_failed_logins=5,
    )
    demo = launch(Chat(never_ends, settings), block=False)
    yield settings, demo.local_url
    demo.close()


def burst_client(url: str, forwarded: str, **kwargs) -> Client:
    """A client of a burst: httpx's 5 s default bounds each request, and on a busy 2-core machine, with
    the model answering the admitted ones, dozens of requests at once can take longer to be answered."""
    return Client(url, verbose=False, headers={"X-Forwarded-For": forwarded}, httpx_kwargs={"timeout": 120}, **kwargs)


def long_answers(clients: list[Client], admitted: int) -> tuple[list[str], list]:
    """Each client asks for a long answer at once; the refusals' messages, and the jobs still running
    once all but the admitted ones have come back. If reading the refusals fails, every job is stopped,
    so that the next test finds the address's places free."""
    jobs = [client.submit(message="Tell me everything", max_new_tokens=4000, api_name="/chat") for client in clients]
    try:
        deadline = time.monotonic() + 300  # a bound for a broken server, not a speed test
        while sum(job.done() for job in jobs) < len(jobs) - admitted and time.monotonic() < deadline:
            time.sleep(0.1)
        refusals = [refusal(job) for job in jobs if job.done()]
    except BaseException:
        stop(jobs)
        raise
    return refusals, [job for job in jobs if not job.done()]


def stop(jobs) -> None:
    for job in jobs:
        job.cancel()


# The visitor's address.


def test_44_forged_forwarded_addresses_from_one_machine_all_count_as_its_one_address(open_app):
    """uvicorn, as Gradio starts it, would take a loopback client's X-Forwarded-For as its address."""
    settings, url = open_app
    assert settings.trusted_proxies == 0 and settings.address_limit == 3
    clients = [burst_client(url, f"198.51.100.{n}") for n in range(44)]
    refusals, running = long_answers(clients, admitted=3)
    try:
        assert len(running) == 3
        assert len(refusals) == 41 and all(ADDRESS_REFUSAL in refusal for refusal in refusals)
    finally:
        stop(running)


# What the client wrote left of the proxy's entry differs, or the proxy saw other addresses of one IPv6
# /64 network (a machine may take any of them): either way the address is one, and another is let in.
ONE_ADDRESS = {
    "forged entries": ([f"10.9.8.{n}, 203.0.113.7" for n in range(6)], "203.0.113.8"),
    "one /64": ([f"2001:db8:5:6::{n:x}" for n in range(1, 7)], "2001:db8:5:7::1"),
}


@pytest.mark.parametrize("forwarded, elsewhere", ONE_ADDRESS.values(), ids=ONE_ADDRESS.keys())
def test_behind_a_trusted_proxy_only_the_entry_it_appended_counts_as_the_address(guarded_app, forwarded, elsewhere):
    settings, url = guarded_app
    assert settings.trusted_proxies == 1 and settings.address_limit == 2

    def client(forwarded: str) -> Client:
        return burst_client(url, forwarded, auth=("ann", PASSWORD))

    refusals, running = long_answers([client(entry) for entry in forwarded], admitted=2)
    try:
        assert len(running) == 2
        assert len(refusals) == 4 and all(ADDRESS_REFUSAL in refusal for refusal in refusals)
        other = client(elsewhere).submit(message="Hi", max_new_tokens=3, api_name="/chat")
        # Started (a refusal would end it at once); it waits for the model, which runs answers one at a
        # time here: the ones running go, so that it needn't wait for 4000 tokens.
        wait_for(lambda: other.done() or other.status().code in STARTED, "the other address's answer to start")
        stop(running)
        assert other.result()["done"]
    finally:
        stop(running)


@pytest.fixture
def held_app(tokenizer):
    """An address limit of 2, over a model whose answers stay in progress until released."""
    held = Held()
    settings = Settings(host="127.0.0.1", port=free_port(), address_limit=2)
    chat = Chat(FakeBackend(tokenizer, ["\n", "The", " answer"], held=held), settings)
    demo = launch(chat, block=False)
    yield chat, demo.local_url
    held.release()
    demo.close()


def test_an_address_with_no_places_left_is_refused_at_the_door_with_the_reason(held_app):
    """Once an address holds every place it may, its requests are refused before Gradio's queue does
    any work for them (a 429 after a pause, with Retry-After), by API call and by queued event alike."""
    chat, url = held_app
    running = [Client(url, verbose=False).submit(message="Hi", api_name="/chat") for _ in range(2)]
    wait_for(lambda: chat.fair_share.in_progress() == 2, "both answers to hold their places")
    for path, body in [
        ("gradio_api/call/v2/chat", {"message": "Hi"}),
        ("gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "abc"}),
    ]:
        response = httpx.post(url + path, json=body, timeout=30)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["detail"].startswith(f"{ADDRESS_REFUSAL} 2 requests running or waiting")
    assert chat.fair_share.in_progress() == 2 and not any(job.done() for job in running)  # nothing let in


def test_an_address_may_have_only_its_limit_of_requests_waiting_in_the_queue(tokenizer):
    """However many it sends at once, an address can't fill Gradio's queue (room for --max-queue in all,
    and "Queue is full" for everyone past it): past --address-limit waiting, the door refuses."""
    held = Held()
    settings = Settings(
        host="127.0.0.1", port=free_port(), concurrency=1, max_queue=4, address_limit=2, trusted_proxies=1
    )
    chat = Chat(FakeBackend(tokenizer, ["\n", "The", " answer"], held=held), settings)
    demo = launch(chat, block=False)
    try:

        def ask(address: str):
            return burst_client(demo.local_url, address).submit(message="Hi", api_name="/chat")

        # All 5 places (--concurrency + --max-queue) held, by 3 addresses: the next requests wait in the queue.
        running = [ask(address) for address in ["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.2", "192.0.2.3"]]
        wait_for(lambda: held.waiting == 5, "5 answers to hold every place")
        waiting = [ask("198.51.100.9"), ask("198.51.100.9")]
        wait_for(lambda: len(demo._queue) == 2, "the address's 2 requests to wait in the queue")
        with pytest.raises(httpx.HTTPStatusError) as refused:
            ask("198.51.100.9").result()
        detail = refused.value.response.json()["detail"]
        assert refused.value.response.status_code == 429 and "2 requests waiting to start" in detail
        assert detail.startswith(ADDRESS_REFUSAL)
        another = ask("203.0.113.5")  # another address still gets into the queue
        wait_for(lambda: len(demo._queue) == 3, "the other address's request to wait in the queue")
        held.release()
        assert all(job.result()["answer"] == "The answer" for job in [*running, *waiting, another])
    finally:
        held.release()
        demo.close()


# Monitoring.


@pytest.mark.parametrize("path", ["monitoring", "monitoring/summary", "monitoring/some-key"])
def test_monitoring_is_off(open_app, path):
    _, url = open_app
    response = httpx.get(url + path, timeout=30, follow_redirects=False)
    assert response.status_code == 403 and response.json()["detail"] == "Monitoring is not enabled."


# Cross-origin reading. Host is a public name: Gradio trusts any origin when it is not localhost.

HOST = "orca2.example"


def cors_headers(url: str, origin: str, cookies=None) -> tuple[int, dict]:
    response = httpx.get(url + "config", headers={"Host": HOST, "Origin": origin}, cookies=cookies, timeout=30)
    return response.status_code, {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def test_with_a_login_another_site_may_not_read_answers_with_the_visitors_cookies(guarded_app):
    _, url = guarded_app
    cookies = httpx.post(url + "login", data=RIGHT_LOGIN, headers={"X-Forwarded-For": "192.0.2.50"}).cookies
    assert cors_headers(url, "https://evil.example", cookies) == (200, {})
    assert cors_headers(url, "null", cookies) == (200, {})
    status, granted = cors_headers(url, f"https://{HOST}", cookies)
    assert status == 200
    assert granted["access-control-allow-origin"] == f"https://{HOST}"
    assert granted["access-control-allow-credentials"] == "true"


def test_with_a_login_another_sites_preflight_is_not_granted(guarded_app):
    _, url = guarded_app
    preflight = {"Host": HOST, "Access-Control-Request-Method": "POST"}
    foreign = httpx.options(url + "gradio_api/call/chat", headers={**preflight, "Origin": "https://evil.example"})
    assert not any(name.startswith("access-control-allow") for name in foreign.headers)
    own = httpx.options(url + "gradio_api/call/chat", headers={**preflight, "Origin": f"https://{HOST}"})
    assert own.headers["access-control-allow-origin"] == f"https://{HOST}"


def test_without_a_login_or_a_share_link_other_sites_may_call_the_public_api(open_app):
    """As Gradio serves a public Space: its API is meant to be called from other pages."""
    _, url = open_app
    status, granted = cors_headers(url, "https://another-space.example")
    assert status == 200 and granted["access-control-allow-origin"] == "https://another-space.example"


# Logins.


def test_wrong_passwords_are_refused_after_a_few_from_one_address_and_others_may_still_log_in(guarded_app):
    settings, url = guarded_app
    attacker = {"X-Forwarded-For": "forged, 192.0.2.66"}
    answers = [httpx.post(url + "login", data=WRONG_LOGIN, headers=attacker, timeout=30) for _ in range(30)]
    wrong = [a for a in answers if a.status_code == 400 and a.json()["detail"] == "Incorrect credentials."]
    refused = [a for a in answers if a.status_code == 429]
    assert len(wrong) == settings.max_failed_logins == 5 and len(refused) == 25
    assert all("Too many wrong logins from your network address" in a.json()["detail"] for a in refused)
    assert all(int(a.headers["retry-after"]) > 0 for a in refused)
    # The right password doesn't get through while the address waits; from elsewhere it does.
    assert httpx.post(url + "login", data=RIGHT_LOGIN, headers=attacker).status_code == 429
    assert httpx.post(url + "login", data=RIGHT_LOGIN, headers={"X-Forwarded-For": "192.0.2.67"}).status_code == 200


def test_a_throttled_address_may_try_again_once_its_oldest_failure_is_a_minute_old():
    clock = Clock()
    throttle = LoginThrottle(limit=3, window=60, clock=clock)
    for _ in range(3):
        assert throttle.wait("192.0.2.1") == 0
        throttle.failed("192.0.2.1")
        clock.now += 10
    assert throttle.wait("192.0.2.1") == 30 and throttle.wait("192.0.2.2") == 0
    clock.now += 30
    assert throttle.wait("192.0.2.1") == 0


def test_a_successful_login_clears_the_addresss_failures():
    throttle = LoginThrottle(limit=2, clock=Clock())
    throttle.failed("192.0.2.1")
    throttle.succeeded("192.0.2.1")
    throttle.failed("192.0.2.1")
    assert throttle.wait("192.0.2.1") == 0


# Bytes sent: every page event brings the chats the browser keeps, and its work follows their size.

BUDGET_REFUSAL = "Your network address has moved more data through this server than it allows one address"


@pytest.fixture(scope="module")
def budget_app(never_ends):
    """A budget of 1 MiB a minute (8 s' worth at once, about 137 KiB), behind one trusted proxy."""
    settings = Settings(host="127.0.0.1", port=free_port(), trusted_proxies=1, address_mib_per_minute=1)
    demo = launch(Chat(never_ends, settings), block=False)
    yield settings, demo.local_url
    demo.close()


def test_past_its_budget_an_address_is_refused_work_with_the_wait_and_others_are_not(budget_app):
    _, url = budget_app
    sender, other = {"X-Forwarded-For": "192.0.2.10"}, {"X-Forwarded-For": "192.0.2.11"}
    # Read whole (the call's check refuses the parameter it doesn't have), so counted whole.
    large = {"message": "Hi", "padding": " " * 300_000}
    assert httpx.post(url + "gradio_api/call/v2/chat", json=large, headers=sender, timeout=60).status_code == 422
    small = {"message": "Hi", "max_new_tokens": 1}
    refused = [
        httpx.post(url + "gradio_api/call/v2/chat", json=small, headers=sender, timeout=60),
        httpx.post(url + "gradio_api/queue/join", json={"data": [], "fn_index": 0}, headers=sender, timeout=60),
    ]
    for response in refused:
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert response.json()["detail"].startswith(BUDGET_REFUSAL + " (1 MiB a minute")
    upload = httpx.post(url + "gradio_api/upload", files={"files": ("chat.json", b"{}")}, headers=sender, timeout=60)
    # Plain words: the page shows an upload's refusal as "HTTP 429: " and the body.
    assert upload.status_code == 429 and upload.text.startswith(BUDGET_REFUSAL)
    # What asks for no work still gets through, and another address is let in.
    assert httpx.get(url + "config", headers=sender, timeout=60).status_code == 200
    assert httpx.post(url + "gradio_api/call/v2/chat", json=small, headers=other, timeout=60).status_code == 200
    # Once the budget has refilled (the 300 KB were about 9 s past it), the address is let in again.
    wait = int(refused[-1].headers["retry-after"]) + REFUSAL_PAUSE_SECONDS
    wait_for(
        lambda: httpx.post(url + "gradio_api/call/v2/chat", json=small, headers=sender, timeout=60).status_code == 200,
        "the budget to refill",
        seconds=30 + wait,
    )


def test_what_comes_back_counts_against_the_budget_too(budget_app):
    """An export's file is 8x the chats it was made from, and writing it is the export's work."""
    _, url = budget_app
    scorer = {"X-Forwarded-For": "192.0.2.12"}
    # A few KB asked: every id's probability and its 5 alternatives come back.
    asked = {"message": "Hi", "answer_ids": [13] * 2000}
    sent = httpx.post(url + "gradio_api/call/v2/token_probabilities", json=asked, headers=scorer, timeout=60)
    result = httpx.get(
        url + f"gradio_api/call/token_probabilities/{sent.json()['event_id']}", headers=scorer, timeout=120
    )
    assert "event: complete" in result.text
    assert len(sent.request.content) < 20_000 and len(result.content) > 300_000  # the burst is about 140 KB
    refused = httpx.post(url + "gradio_api/call/v2/chat", json={"message": "Hi"}, headers=scorer, timeout=60)
    assert refused.status_code == 429 and refused.json()["detail"].startswith(BUDGET_REFUSAL)


# Malformed API calls: refused before they start, with what is wrong.

COMPARE_PARAMETERS = (
    "message, system_messages, do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, "
    "moderation"
)


@pytest.mark.parametrize(
    "path, body, status, says",
    [
        (
            "call/compare",
            {"data": ["Hi", ["A", "B"]]},
            422,
            f"/compare takes 10 values, in this order: {COMPARE_PARAMETERS}; got 2",
        ),
        ("call/compare", {"data": ["Hi", ["A", "B"], *[None] * 8, "extra"]}, 422, "got 11"),
        ("call/compare", {"data": "Hi"}, 422, "Input should be a valid list"),
        ("call/v2/compare", {"message": "Hi"}, 422, "/compare needs system_messages; its parameters: message"),
        ("call/v2/compare", {"message": "Hi", "system_messages": ["A", "B"], "colour": 1}, 422, "no parameter colour"),
        ("call/compares", {"data": []}, 404, "There is no API endpoint /compares. This server's: /chat, /compare,"),
        # The page's own events are not an API.
        ("call/respond", {"data": []}, 404, "There is no API endpoint /respond"),
        ("run/compare", {"data": ["Hi", ["A", "B"]]}, 404, "Please join the queue"),
    ],
)
def test_a_malformed_raw_call_is_refused_with_what_is_wrong(open_app, path, body, status, says):
    _, url = open_app
    response = httpx.post(url + "gradio_api/" + path, json=body, timeout=30)
    assert response.status_code == status and says in str(response.json()["detail"])


def test_a_raw_call_with_every_value_is_answered(open_app):
    _, url = open_app
    values = ["Hi", ["A", "B"], False, 0.7, 0.9, 50, 1.0, 3, None, None]
    event = httpx.post(url + "gradio_api/call/compare", json={"data": values}, timeout=30)
    stream = httpx.get(url + f"gradio_api/call/compare/{event.json()['event_id']}", timeout=120).text
    assert "event: complete" in stream and '"n_tokens": 3' in stream


@pytest.mark.parametrize(
    "arguments, error, says",
    [
        (dict(message="Hi", system_messages="A"), AppError, "system_messages must be a list of 2 to 4 texts"),
        (dict(message="Hi", system_messages=["A", 7]), AppError, r"system_messages\[1\] must be text"),
        (dict(message="Hi", system_messages=["A", "B"], top_k="many"), AppError, "top_k must be a number"),
        (dict(message="Hi"), TypeError, "No value provided for required argument: system_messages"),
        (dict(message="Hi", system_messages=["A", "B"], colour=1), TypeError, "`colour` is not a valid key-word"),
    ],
)
def test_a_malformed_client_call_is_refused_with_what_is_wrong(open_app, arguments, error, says):
    _, url = open_app
    with pytest.raises(error, match=says):
        Client(url, verbose=False).predict(**arguments, api_name="/compare")


# Uploads.


def test_an_upload_over_the_cap_is_refused_with_the_cap(open_app):
    settings, url = open_app
    cap = settings.max_upload_mb * 1024 * 1024
    big = {"files": ("chat.json", b"[" + b" " * cap + b"]", "application/json")}
    refused = httpx.post(url + "gradio_api/upload", files=big, timeout=60)
    assert refused.status_code == 413 and f"maximum allowed size of {cap} bytes" in refused.text
    small = {"files": ("chat.json", b"{}", "application/json")}
    assert httpx.post(url + "gradio_api/upload", files=small, timeout=60).status_code == 200


# Queued events: one the app doesn't have is named back, not a bare 500. Gradio reads fn_index leniently
# ("7" and 7.0 name event 7), so the check does too.


@pytest.mark.parametrize("fn_index", [9999, -1, "9999", 9999.0])
def test_joining_the_queue_for_an_event_the_app_does_not_have_is_refused_saying_so(open_app, fn_index):
    _, url = open_app
    body = {"data": [], "fn_index": fn_index, "session_hash": "a-page-session"}
    response = httpx.post(url + "gradio_api/queue/join", json=body, timeout=30)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"fn_index {int(fn_index)} names no event of this app.")


def test_joining_the_queue_for_one_of_the_apps_events_is_let_through(open_app):
    _, url = open_app
    body = {"data": [], "fn_index": 0, "session_hash": "a-page-session"}
    response = httpx.post(url + "gradio_api/queue/join", json=body, timeout=30)
    assert response.status_code == 200 and response.json()["event_id"]


# The login page: Gradio's form shows "Incorrect credentials" for a 400 and nothing for the throttle's
# 429, so the page says the rule up front.


def test_the_login_page_says_that_wrong_logins_are_limited(guarded_app):
    settings, url = guarded_app
    page = httpx.get(url, timeout=30).text
    # What the page's script reads: window.gradio_config = {...};
    config = json.JSONDecoder().raw_decode(page, page.index("window.gradio_config = ") + 23)[0]
    assert config["auth_required"] and config["auth_message"] == login_message(settings.max_failed_logins)
    assert config["auth_message"].startswith(f"After {settings.max_failed_logins} wrong logins within a minute")

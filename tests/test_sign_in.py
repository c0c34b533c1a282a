"""Sign in with Hugging Face: where the page offers it, a signed-in visitor's fair share is their
account's, whichever page they ask from; a visitor who hasn't signed in has the smaller anonymous share;
the server's owner may keep heavy requests (comparisons) for signed-in visitors; and nothing a client
writes itself (a header, a body field, a session cookie it signed) makes it signed in.

The app is launched with what a Space with hf_oauth: true is given (OAUTH_CLIENT_ID and
OAUTH_CLIENT_SECRET), and visitors sign in through Gradio's own routes and session cookie. Off a Space, Gradio serves its
local mock of Hugging Face's OAuth: the same routes and the same signed session, signing in as the
account the machine is logged in with, which the mock asks the hub for; that one question is answered
here instead (tests never touch a hub). What only a real Space shows is in docs/space.md.
"""

import base64
import contextlib
import hashlib
import json
import re

import gradio as gr
import gradio.oauth
import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from starlette.requests import Request
from support import FakeBackend, Held, free_port, wait_for

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.fairness import FairShare, Heavy, Limits, Refused, Visitor
from orca2_space.grading import Grading, Rule
from orca2_space.publish import card_metadata
from orca2_space.settings import SIGN_IN_ANONYMOUS_VISITOR_LIMIT, Settings
from orca2_space.ui import build
from orca2_space.ui.adapters import caller_of, visitor_of

SECRET = "the-spaces-oauth-secret"
ACCOUNT = "ann"
SIGN_IN_HINT = "Signed in with Hugging Face (the button at the top of the page), you may have 2."
SIGN_IN_TO_COMPARE = "Sign in with Hugging Face (the button at the top of the page) to compare system messages"


def offer_sign_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables a Space with hf_oauth: true is given. Gradio read its own copy of the secret when it
    was imported (before this test set it), so that copy is set too."""
    monkeypatch.setenv("OAUTH_CLIENT_ID", "the-spaces-oauth-client")
    monkeypatch.setenv("OAUTH_CLIENT_SECRET", SECRET)
    monkeypatch.setattr(gradio.oauth, "OAUTH_CLIENT_SECRET", SECRET)
    for space in ("SPACE_ID", "SYSTEM"):  # off a Space: Gradio's local mock of the OAuth routes
        monkeypatch.delenv(space, raising=False)
    # The mock asks the hub who this machine is logged in as; the hub's answer, as it gives it.
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(
        gradio.oauth, "whoami", lambda: {"type": "user", "name": ACCOUNT, "fullname": "Ann", "avatarUrl": ""}
    )


@pytest.fixture
def sign_in_offered(monkeypatch):
    offer_sign_in(monkeypatch)


@pytest.fixture(scope="module")
def launched(tokenizer):
    """A signed-in visitor may hold 2 places, one who hasn't 1; comparisons are for signed-in visitors."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        offer_sign_in(monkeypatch)
        backend = FakeBackend(tokenizer, ["\n", "The", " answer"])
        settings = Settings(
            host="127.0.0.1", port=free_port(), visitor_limit=2, anonymous_visitor_limit=1, sign_in_for_heavy=True
        )
        chat = Chat(backend, settings)
        demo = launch(chat, block=False)
        yield chat, backend, demo.local_url
        demo.close()


@pytest.fixture
def held_app(launched):
    """The app, its answers in progress until the test releases them."""
    chat, backend, url = launched
    backend.held = held = Held()
    yield held, url
    held.release()
    wait_for(lambda: chat.fair_share.in_progress() == 0, "every place to be given back")


def signed_in_cookie(url: str) -> str:
    """Sign in as the page's button does: /login/huggingface, then the callback, which keeps the account
    in Gradio's session and sets its cookie. The cookie is Secure, which a client's jar keeps back from
    http://127.0.0.1, so it is carried by hand."""
    login = httpx.get(url + "login/huggingface", timeout=30)
    assert login.status_code == 307 and "/login/callback" in login.headers["location"]
    callback = httpx.get(httpx.URL(url).join(login.headers["location"]), timeout=30)
    assert callback.status_code == 307
    return callback.headers["set-cookie"].split(";")[0]


def page(url: str, cookie: str | None = None, **headers: str) -> Client:
    """A page session (a client of its own), with the browser's cookie if it has one."""
    return Client(url, verbose=False, headers={**headers, **({"Cookie": cookie} if cookie else {})})


def long_answer(client: Client):
    return client.submit(message="Tell me everything", max_new_tokens=4000, api_name="/chat")


def refusal(job) -> str:
    with pytest.raises(AppError) as error:
        job.result()
    return str(error.value)


def test_a_signed_in_visitor_is_one_visitor_in_every_page_and_has_the_larger_share(held_app):
    held, url = held_app
    cookie = signed_in_cookie(url)
    first_tab, second_tab = page(url, cookie), page(url, cookie)
    running = [long_answer(first_tab), long_answer(second_tab)]
    wait_for(lambda: held.waiting == 2, "both tabs' answers to be in progress")
    third = long_answer(page(url, cookie))
    assert "You already have 2 requests running or waiting" in refusal(third)
    # Someone else is a visitor of their own.
    other = long_answer(page(url))
    wait_for(lambda: held.waiting == 3, "another visitor's answer to be in progress")
    held.release()
    assert all(job.result()["answer"] == "The answer" for job in [*running, other])


def test_a_visitor_who_has_not_signed_in_has_the_smaller_share_and_is_told_what_signing_in_gives(held_app):
    held, url = held_app
    visitor = page(url)
    running = long_answer(visitor)
    wait_for(lambda: held.waiting == 1, "the answer to be in progress")
    said = refusal(long_answer(visitor))
    assert "You already have 1 request running or waiting" in said and said.endswith(SIGN_IN_HINT)
    held.release()
    assert running.result()["answer"] == "The answer"


def test_comparisons_are_for_signed_in_visitors_when_the_owner_says_so(held_app):
    held, url = held_app
    held.release()
    with pytest.raises(AppError, match=re.escape(SIGN_IN_TO_COMPARE)):
        page(url).predict(message="Hi", system_messages=["A", "B"], api_name="/compare")
    compared = page(url, signed_in_cookie(url)).predict(message="Hi", system_messages=["A", "B"], api_name="/compare")
    assert [answer["answer"] for answer in compared["answers"]] == ["The answer", "The answer"]


def gradios_key(secret: str) -> str:
    """The key Gradio's OAuth signs its session cookie with (gradio/oauth.py, attach_oauth)."""
    return hashlib.sha256((secret + "-v4").encode()).hexdigest()


def forged_session(key: str) -> str:
    """A session cookie saying ann signed in, as Starlette writes it, signed with a key of the forger's."""
    from itsdangerous import TimestampSigner

    session = {"oauth_info": {"userinfo": {"preferred_username": ACCOUNT}, "expires_at": 4_000_000_000}}
    data = base64.b64encode(json.dumps(session).encode())
    return "session=" + TimestampSigner(key).sign(data).decode()


@pytest.mark.parametrize(
    "cookie, headers",
    [
        (forged_session("a-guessed-key"), {}),
        (forged_session(gradios_key("")), {}),  # the key without a secret: why sign-in needs one
        (None, {"X-Forwarded-User": ACCOUNT, "X-Hf-User": ACCOUNT, "Authorization": "Bearer hf_someone"}),
    ],
    ids=["cookie-signed-by-the-client", "cookie-signed-without-the-secret", "headers"],
)
def test_what_a_client_writes_itself_does_not_sign_it_in(held_app, cookie, headers):
    held, url = held_app
    held.release()
    with pytest.raises(AppError, match=re.escape(SIGN_IN_TO_COMPARE)):
        page(url, cookie, **headers).predict(message="Hi", system_messages=["A", "B"], api_name="/compare")


def test_the_forged_cookies_are_sessions_as_gradio_writes_them_but_for_the_key(held_app):
    """The control for the forgeries above: the same cookie signed with the Space's own key is signed in."""
    held, url = held_app
    held.release()
    signed = page(url, forged_session(gradios_key(SECRET)))
    compared = signed.predict(message="Hi", system_messages=["A", "B"], api_name="/compare")
    assert len(compared["answers"]) == 2


def test_an_oauth_token_in_the_calls_body_does_not_sign_it_in(held_app):
    """Gradio takes a token from the body for endpoints that ask for a gr.OAuthToken; the account is read
    from the session only."""
    held, url = held_app
    held.release()
    call = {"message": "Hi", "system_messages": ["A", "B"], "oauth_token": "hf_someone"}
    event = httpx.post(url + "gradio_api/call/v2/compare", json=call, timeout=30)
    assert event.status_code == 200
    stream = httpx.get(url + f"gradio_api/call/compare/{event.json()['event_id']}", timeout=60).text
    assert "event: error" in stream and SIGN_IN_TO_COMPARE in stream


def request_with(session: dict | None, session_hash: str | None = "a-page-session") -> gr.Request:
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("10.16.3.80", 50000)}
    if session is not None:
        scope["session"] = session  # where SessionMiddleware puts what it decoded
    return gr.Request(request=Request(scope), session_hash=session_hash)


def signed_in_session(expires_at: int = 4_000_000_000) -> dict:
    return {"oauth_info": {"userinfo": {"preferred_username": ACCOUNT}, "expires_at": expires_at}}


def test_a_visitor_is_the_account_the_session_names_until_it_expires():
    assert visitor_of(request_with(signed_in_session())) == Visitor(f"hf:{ACCOUNT}", "10.16.3.80", signed_in=True)
    assert visitor_of(request_with(signed_in_session(expires_at=1))) == Visitor("a-page-session", "10.16.3.80")
    assert visitor_of(request_with({})) == Visitor("a-page-session", "10.16.3.80")
    assert visitor_of(request_with(None)) == Visitor("a-page-session", "10.16.3.80")


def test_an_agent_is_never_signed_in():
    """Gradio's MCP server keeps no session: an agent is its address, whatever its request carries."""
    request = request_with(signed_in_session()).request
    assert caller_of(request) == Visitor("address 10.16.3.80", "10.16.3.80")


def test_a_page_session_named_like_an_account_does_not_take_the_accounts_places(held_app):
    held, url = held_app
    signed_in = page(url, signed_in_cookie(url))
    running = [long_answer(signed_in), long_answer(signed_in)]
    wait_for(lambda: held.waiting == 2, "the account's answers to be in progress")
    impostor = Client(url, verbose=False)
    impostor.session_hash = f"hf:{ACCOUNT}"
    other = long_answer(impostor)
    wait_for(lambda: held.waiting == 3, "the impostor's answer to be in progress, as anyone's")
    held.release()
    assert all(job.result()["answer"] == "The answer" for job in [*running, other])


# The rules, on the fair share itself.

ANN = Visitor(f"hf:{ACCOUNT}", "10.0.0.1", signed_in=True)
ANONYMOUS = Visitor("a-page-session", "10.0.0.1")
SIGN_IN_LIMITS = Limits(
    per_visitor=4, per_address=8, total=40, per_anonymous_visitor=2, sign_in_offered=True, sign_in_for_heavy=True
)


def test_a_visitor_who_has_not_signed_in_holds_fewer_places_and_hears_what_signing_in_gives():
    share = FairShare(SIGN_IN_LIMITS)
    with contextlib.ExitStack() as places:
        places.enter_context(share.admit(ANONYMOUS, 2))
        with pytest.raises(Refused, match="You already have 2 requests") as refused:
            places.enter_context(share.admit(ANONYMOUS))
        assert str(refused.value).endswith(
            "Signed in with Hugging Face (the button at the top of the page), you may have 4."
        )
        places.enter_context(share.admit(ANN, 4))  # the same address, within its 8


def test_a_request_larger_than_the_anonymous_share_says_so_and_what_signing_in_gives():
    share = FairShare(SIGN_IN_LIMITS)
    with pytest.raises(Refused) as refused, share.admit(ANONYMOUS, 3):
        pass
    assert str(refused.value) == (
        "This request counts 3 (one per answer it runs): more than this server lets one visitor have at once (2)."
        " Signed in with Hugging Face (the button at the top of the page), you may have 4."
    )


def test_without_sign_in_on_the_page_nobody_is_told_to_sign_in():
    share = FairShare(Limits(per_visitor=4, per_address=8, total=40, per_anonymous_visitor=2))
    with pytest.raises(Refused) as refused, share.admit(ANONYMOUS, 3):
        pass
    assert "Sign" not in str(refused.value)


def test_heavy_requests_are_refused_to_visitors_who_have_not_signed_in_where_the_owner_says_so():
    share = FairShare(SIGN_IN_LIMITS)
    with pytest.raises(Refused, match=re.escape(SIGN_IN_TO_COMPARE)), share.admit(ANONYMOUS, 2, Heavy.COMPARISON):
        pass
    assert share.in_progress() == 0
    with share.admit(ANN, 2, Heavy.COMPARISON), share.admit(None, 2, Heavy.COMPARISON):  # the app's own, too
        assert share.in_progress() == 4
    lenient = FairShare(Limits(per_visitor=4, per_address=8, total=40, sign_in_offered=True))
    with lenient.admit(ANONYMOUS, 2, Heavy.COMPARISON):
        assert lenient.in_progress() == 2


def test_a_comparison_is_asked_within_the_askers_share(fake_backend, sign_in_offered):
    chat = Chat(fake_backend, Settings(visitor_limit=4, anonymous_visitor_limit=2))
    with pytest.raises(Refused, match=r"compare at most 2 system messages \(got 3\)\. Signed in with Hugging Face"):
        chat.compare_requests("Hi", ["A", "B", "C"], visitor=ANONYMOUS)
    assert len(chat.compare_requests("Hi", ["A", "B", "C", "D"], visitor=ANN)) == 4


def test_an_evaluation_is_a_heavy_request_too(fake_backend, sign_in_offered):
    chat = Chat(fake_backend, Settings(sign_in_for_heavy=True))
    request = chat.evaluation_request([{"question": "What is 2 + 2?", "answer": "4"}], [""], Grading(Rule.NUMBER))
    with pytest.raises(Refused, match=r"to evaluate questions under system messages: "):
        next(chat.evaluate(request, visitor=ANONYMOUS))
    assert chat.fair_share.in_progress() == 0
    progress = list(chat.evaluate(request, visitor=ANN))
    assert progress[-1].finished and progress[-1].done == 1


# Where sign-in is offered, and what the owner sets.


def login_buttons(demo: gr.Blocks) -> list[gr.LoginButton]:
    return [block for block in demo.blocks.values() if isinstance(block, gr.LoginButton)]


def test_without_sign_in_on_the_space_the_page_has_no_sign_in_button(fake_backend, monkeypatch):
    monkeypatch.delenv("OAUTH_CLIENT_ID", raising=False)
    assert not login_buttons(build(Chat(fake_backend, Settings())))


def test_where_the_space_offers_sign_in_the_page_has_the_button_and_says_what_it_gives(fake_backend, sign_in_offered):
    demo = build(Chat(fake_backend, Settings(visitor_limit=4)))
    assert len(login_buttons(demo)) == 1
    why = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "why-sign-in")
    assert (
        why.value
        == "Signing in gives you 4 requests at a time instead of 2; your share is your account's, in every tab."
    )


def test_where_visitors_can_sign_in_those_who_have_not_get_a_smaller_share_by_default(monkeypatch):
    for variable in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "ORCA2_ANONYMOUS_VISITOR_LIMIT"):
        monkeypatch.delenv(variable, raising=False)
    assert Settings().anonymous_visitor_limit is None
    monkeypatch.setenv("OAUTH_CLIENT_ID", "the-spaces-oauth-client")
    monkeypatch.setenv("OAUTH_CLIENT_SECRET", SECRET)
    assert Settings().anonymous_visitor_limit == SIGN_IN_ANONYMOUS_VISITOR_LIMIT < Settings().visitor_limit


def test_requiring_sign_in_for_heavy_requests_needs_sign_in(monkeypatch):
    monkeypatch.delenv("OAUTH_CLIENT_SECRET", raising=False)
    with pytest.raises(ValueError, match="--sign-in-for-heavy needs Sign in with Hugging Face"):
        Settings(sign_in_for_heavy=True)


def test_the_space_asks_hugging_face_for_sign_in():
    assert card_metadata()["hf_oauth"] is True

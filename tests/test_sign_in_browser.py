"""Sign in with Hugging Face on the page, in Chromium: the header's button goes through Gradio's OAuth
routes (its local mock, as in test_sign_in.py) and comes back signed in, with the account named."""

import gradio.oauth
import pytest
from support import ARTIFACTS, NO_CHROMIUM, NO_CHROMIUM_REASON, FakeBackend, free_port

from orca2_space.chat import Chat
from orca2_space.cli import launch
from orca2_space.settings import Settings

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]
ACCOUNT = "ann"


@pytest.fixture(scope="module")
def app_with_sign_in(tokenizer):
    with pytest.MonkeyPatch.context() as monkeypatch:
        # What a Space with hf_oauth: true is given, and the hub's answer to the mock (see test_sign_in.py).
        monkeypatch.setenv("OAUTH_CLIENT_ID", "the-spaces-oauth-client")
        monkeypatch.setenv("OAUTH_CLIENT_SECRET", "the-spaces-oauth-secret")
        monkeypatch.setattr(gradio.oauth, "OAUTH_CLIENT_SECRET", "the-spaces-oauth-secret")
        for space in ("SPACE_ID", "SYSTEM"):
            monkeypatch.delenv(space, raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        monkeypatch.setattr(
            gradio.oauth, "whoami", lambda: {"type": "user", "name": ACCOUNT, "fullname": "Ann", "avatarUrl": ""}
        )
        chat = Chat(FakeBackend(tokenizer, ["\n", "The", " answer"]), Settings(host="127.0.0.1", port=free_port()))
        demo = launch(chat, block=False)
        yield demo.local_url
        demo.close()


def test_the_header_signs_a_visitor_in_and_names_the_account(app_with_sign_in, page):
    page.goto(app_with_sign_in)
    button = page.locator("#sign-in button")
    button.filter(has_text="Sign in with Hugging Face").wait_for()
    assert "Signing in gives you 4 requests at a time instead of 2" in page.inner_text("#why-sign-in")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "sign-in.png")
    button.click()
    button.filter(has_text=f"Logout ({ACCOUNT})").wait_for()
    page.screenshot(path=ARTIFACTS / "signed-in.png")

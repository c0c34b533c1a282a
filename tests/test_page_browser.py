"""The page as a visitor uses it, in Chromium: text shown as written and nothing loaded from a
message, Enter to send, conversations kept in the browser (reload, restart, past chats, privacy),
export, import and replay, single-turn mode and the raw view."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gradio_client import Client
from make_tiny_model import build_tiny_model
from openai_stub import OpenAIStub, Script
from support import (
    ARTIFACTS,
    DONE,
    FIXTURES,
    NO_CHROMIUM,
    NO_CHROMIUM_REASON,
    App,
    answers,
    click_and_wait_for_answer,
    download,
    fits,
    open_app,
    open_sampling,
    preset_labels_shown,
    send,
    set_number,
)

from orca2_space.presets import EXAMPLE_LABELS, EXAMPLES, PRESET_CHOICES, PRESETS

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]
USER = "#chatbot [data-testid=user]"


class LeakServer:
    """A loopback server that counts every request: a message must never make the browser fetch."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()


def bait(url: str, where: str) -> str:
    return (
        f'![chart]({url}/{where}-markdown.png) and <img src="{url}/{where}-img.png"> '
        f'<iframe src="{url}/{where}-frame"></iframe> <link rel="stylesheet" href="{url}/{where}.css">'
    )


def test_text_is_shown_as_written_and_no_message_loads_anything(browser, tmp_path):
    leak = LeakServer()
    written = "\nIn HTML, <div> is a block & <span> is inline; a < b > c, &amp; stays. " + bait(leak.url, "answer")
    with OpenAIStub(Script(pieces=(written[:30], written[30:]))) as stub:
        app = App(
            FIXTURES / "orca2-tokenizer", tmp_path / "app.log", None, "--backend", "openai", "--base-url", stub.base_url
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        try:
            page.goto(app.url)
            page.wait_for_selector("#model-status:has-text('Inference server')")
            question = "In HTML, what does <div> do compared with <span>? " + bait(leak.url, "question")
            send(page, question)
            page.wait_for_load_state("networkidle")
            assert page.locator(USER).all_inner_texts()[-1] == question
            assert answers(page)[-1] == written[1:]
            assert not page.locator("#chatbot img[src*='127.0.0.1'], #chatbot iframe").count()
            page.screenshot(path=str(ARTIFACTS / "as-written.png"), full_page=True)
        finally:
            context.close()
            app.close()
    leak.close()
    assert leak.hits == []


def test_markdown_and_math_still_render(page, plain_app, tmp_path):
    open_app(page, plain_app)
    send(page, "**bold** and `a<b>` then $$x^2$$ and \\(y\\), but $1.10 and $2.20 are prices")
    bubble = page.locator(USER).last
    assert bubble.locator("strong").inner_text() == "bold"
    assert bubble.locator("code").first.inner_text() == "a<b>"
    assert bubble.locator(".katex").count() == 2
    assert "$1.10 and $2.20 are prices" in bubble.inner_text()


def test_enter_sends_and_shift_enter_adds_a_line(page, plain_app):
    open_app(page, plain_app)
    box = page.locator("#message textarea")
    box.fill("First line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "First line\nsecond line"
    assert page.locator(USER).count() == 0
    box.press("Enter")
    page.wait_for_selector(DONE)
    assert page.locator(USER).all_inner_texts()[-1] == "First line\nsecond line"


def test_the_conversation_survives_a_reload_and_a_server_restart(browser, tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    app = App(model, tmp_path / "app.log")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_app(page, app)
        send(page, "Remember me")
        answer = answers(page)[-1]
        page.reload()
        page.wait_for_function(f"document.querySelectorAll('{USER}').length == 1")
        app.close()
        app = App(model, tmp_path / "app.log", port=app.port)
        open_app(page, app)
        page.wait_for_function(f"document.querySelectorAll('{USER}').length == 1")
        assert page.locator(USER).inner_text() == "Remember me" and answers(page)[-1] == answer
    finally:
        context.close()
        app.close()


def chat_titles(page) -> list[str]:
    page.click("#chats input")
    # The open chat's option carries a check mark.
    titles = [title.removeprefix("✓").strip() for title in page.locator("[role=option]").all_inner_texts()]
    page.keyboard.press("Escape")
    return titles


def test_past_chats_can_be_opened_and_deleted_and_stay_in_their_browser(browser, plain_app):
    mine, theirs = (browser.new_context(viewport={"width": 1280, "height": 900}) for _ in range(2))
    page = mine.new_page()
    try:
        open_app(page, plain_app)
        send(page, "About whales")
        page.click("#new-chat")
        page.wait_for_function(f"document.querySelectorAll('{USER}').length == 0")
        send(page, "About dolphins")
        assert chat_titles(page) == ["About dolphins", "About whales"]

        page.fill("#chats input", "About whales")  # the list filters as one types
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('{USER}')?.innerText == 'About whales'")
        page.click("#delete-chat")
        page.wait_for_function(f"document.querySelectorAll('{USER}').length == 0")
        assert chat_titles(page) == ["About dolphins"]

        other = theirs.new_page()
        open_app(other, plain_app)
        assert chat_titles(other) == [] and other.locator(USER).count() == 0
    finally:
        mine.close()
        theirs.close()


def test_an_exported_sampled_answer_replays_through_the_page_and_chat(browser, plain_app, tmp_path):
    first, second = (
        browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True) for _ in range(2)
    )
    page = first.new_page()
    try:
        open_app(page, plain_app)
        open_sampling(page)
        page.check("#do-sample input")
        set_number(page, "#max-new-tokens input[type=number]", 24)
        set_number(page, "#seed input", 4321)
        send(page, "Surprise me")
        shown = answers(page)[-1]
        exported = json.loads(download(page, "#export-json"))
        (turn,) = exported["exchanges"]
        answer = turn["answer"]  # exactly as written (the page, like any Markdown, drops a leading space)
        assert exported["model"] and exported["weights"] and exported["app_version"]
        assert (
            " ".join(answer.split()) == " ".join(shown.split())
            and turn["settings"]["seed"] == 4321
            and turn["settings"]["do_sample"]
        )
        assert turn["prompt_ids"][:3] == [1, 29871, 32001] and turn["stats"]["n_tokens"] == 24
        assert "Surprise me" in download(page, "#export-markdown")
        saved = tmp_path / "conversation.json"
        saved.write_text(json.dumps(exported))

        elsewhere = second.new_page()
        open_app(elsewhere, plain_app)
        with elsewhere.expect_file_chooser() as chooser:
            elsewhere.click("#import-json")
        chooser.value.set_files(str(saved))
        elsewhere.wait_for_function(f"document.querySelector('{USER}')?.innerText == 'Surprise me'")
        click_and_wait_for_answer(elsewhere, "#retry")
        assert answers(elsewhere)[-1] == shown

        settings = {k: v for k, v in turn["settings"].items()}
        final = Client(plain_app.url, verbose=False).predict(
            message="Surprise me", system_message=turn["system_message"], **settings, api_name="/chat"
        )
        assert final["answer"] == answer and final["answer_ids"] == turn["answer_ids"]
    finally:
        first.close()
        second.close()


def test_single_turn_is_the_default_and_leaves_earlier_turns_out(page, plain_app):
    open_app(page, plain_app)
    send(page, "First question")
    assert "Single turn" in page.inner_text("#answer-status")
    page.fill("#message textarea", "Second question")
    page.get_by_text("Prompt inspector", exact=True).click()
    page.click("#inspect")
    page.wait_for_function("document.querySelector('#inspect-count').innerText.includes('tokens')")
    assert "First question" not in page.inner_text("#inspect-text")
    page.uncheck("#single-turn input")
    page.click("#inspect")
    page.wait_for_function("document.querySelector('#inspect-text').innerText.includes('First question')")
    click_and_wait_for_answer(page, "#send")
    assert "With the earlier turns" in page.inner_text("#answer-status")


def test_the_raw_view_shows_the_exact_characters(page, plain_app):
    open_app(page, plain_app)
    question = "  *not emphasis*\n\n\n<b>tag</b>   end"
    send(page, question)
    assert page.locator(USER).last.locator("em").count() == 1
    page.check("#raw input")
    page.wait_for_function(f"document.querySelector('{USER} pre') !== null")
    assert page.locator(USER).last.locator("pre").inner_text() == question


def test_on_a_phone_the_conversation_tools_fit(browser, plain_app):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_app(page, plain_app)
        send(page, "In HTML, what does <div> do compared with <span>?")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for control in ("#send", "#export-json", "#import-json", "#new-chat", "#single-turn"):
            box = page.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, control
        page.screenshot(path=str(ARTIFACTS / "phone-conversation.png"), full_page=True)
    finally:
        context.close()


PHONE = dict(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)


def test_on_a_phone_the_page_opens_at_its_top_and_its_texts_read_in_full(browser, plain_app):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_app(page, plain_app)
        assert fits(page, "#message textarea")  # the placeholder
        send(page, "First question")
        send(page, "Second question")
        page.reload()
        page.wait_for_function(f"document.querySelectorAll('{USER}').length == 2")
        # The message box has the cursor, but the page did not scroll down to it.
        assert page.evaluate("document.activeElement === document.querySelector('#message textarea')")
        assert page.evaluate("window.scrollY") == 0
        assert preset_labels_shown(page, "#preset") == [(label, True) for label, _ in PRESET_CHOICES]
    finally:
        context.close()


def test_a_preset_says_what_it_asks(page, plain_app):
    open_app(page, plain_app)
    page.click("#preset input")
    page.get_by_role("option", name="Empty", exact=True).click()
    page.wait_for_function("document.querySelector('#system-message textarea').value === ''")
    assert PRESETS["Empty (paper's evaluation setting)"].asks in page.inner_text("#preset")


def test_the_chat_has_no_unlabelled_trash_button(page, plain_app):
    open_app(page, plain_app)
    send(page, "Hello")
    # Gradio's Chatbot shows an icon-only "Clear" (a trash can) that only empties the view.
    assert not page.locator("#chatbot").get_by_role("button", name="Clear").is_visible()
    assert page.get_by_role("button", name="+ New chat").is_visible()


def test_the_model_cards_examples_show_their_task_and_give_the_exact_prompt(page, plain_app):
    open_app(page, plain_app)
    for label, prompt in zip(EXAMPLE_LABELS, EXAMPLES):
        example = page.get_by_text(label, exact=True)
        assert example.is_visible()
        example.click()
        page.wait_for_function(f"document.querySelector('#message textarea').value == {json.dumps(prompt)}")


def test_the_token_probabilities_looked_at_travel_with_the_export(browser, plain_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_app(page, plain_app)
        open_sampling(page)
        set_number(page, "#max-new-tokens input[type=number]", 12)
        send(page, "First question")
        send(page, "Second question")
        page.get_by_text("How sure was Orca 2?").click()
        page.click("#score-last")
        page.wait_for_selector("#tokens .tok")
        first, second = json.loads(download(page, "#export-json"))["exchanges"]
        markdown = download(page, "#export-markdown")
    finally:
        context.close()
    assert first["tokens"] is None and len(second["tokens"]) == 12
    assert [t["id"] for t in second["tokens"]] == second["answer_ids"]
    assert markdown.count("Token probabilities (all in the JSON export): 12 tokens") == 1


def test_a_long_chat_title_ends_in_an_ellipsis_before_the_caret(page, plain_app):
    open_app(page, plain_app)
    send(page, "How can you determine if a restaurant is popular among locals or mainly attracts tourists?")
    shown = page.locator("#chats input").evaluate(
        """title => { const style = getComputedStyle(title);
        const caret = title.parentElement.querySelector('.icon-wrap').getBoundingClientRect();
        const textEnd = title.getBoundingClientRect().right - parseFloat(style.paddingRight);
        return [title.scrollWidth > title.clientWidth, style.textOverflow, textEnd <= caret.left]; }"""
    )
    assert shown == [True, "ellipsis", True]  # cut, says so, and not under the caret

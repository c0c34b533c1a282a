"""The app as a visitor uses it: `python app.py` in a subprocess, driven by Playwright in Debian's
Chromium. Waits are on the page's own signals (the status line's data-state), never fixed sleeps."""

import re

import pytest
from make_tiny_model import build_tiny_model
from support import (
    ARTIFACTS,
    DONE,
    NEW_DONE,
    NO_CHROMIUM,
    NO_CHROMIUM_REASON,
    SAFETY_KEY,
    SCRIPT,
    SERVER_START_SECONDS,
    STEPS_OF_A_FREE_SERVER,
    VIOLENT_ANSWER,
    App,
    TransformersServe,
    answers,
    click_and_wait_for_answer,
    content_safety,
    finish_loading,
    mark_status_seen,
    open_app,
    open_sampling,
    send,
    set_number,
    slow_loading_model,
)

from orca2_space.presets import EXAMPLE_LABELS

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]


@pytest.fixture(scope="module")
def moderated_app(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("browser-moderated")
    model = build_tiny_model(folder / "violent", script=tokenizer.encode_text(VIOLENT_ANSWER), loop=True)
    with content_safety() as server:
        env = {"CONTENT_SAFETY_ENDPOINT": server.endpoint, "CONTENT_SAFETY_KEY": SAFETY_KEY}
        app = App(model, folder / "app.log", env)
        yield app
        app.close()


def record_answers(page):
    """Every text the answer bubbles show, as the page changes."""
    seen: list[str] = []
    page.expose_function("recordAnswer", lambda text: seen.append(text))
    page.evaluate(
        """() => new MutationObserver(() => window.recordAnswer(
               [...document.querySelectorAll('#chatbot [data-testid=bot]')].map(e => e.innerText).join('\\n')))
           .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true})"""
    )
    return seen


def test_the_page_shows_the_model_and_how_it_was_loaded(page, plain_app):
    open_app(page, plain_app)
    status = page.inner_text("#model-status")
    assert "tiny" in status and "fp32" in status and "auto: no GPU" in status and "cpu" in status


def test_while_the_model_loads_the_page_says_so_and_a_message_waits_for_it(page, tmp_path):
    model, tokenizer = slow_loading_model(tmp_path / "slow")
    app = App(model, tmp_path / "app.log")
    try:
        open_app(page, app, model_ready=False)
        # The model's process says what it does once it has started (the page asks every second).
        page.wait_for_selector("#model-status:has-text('reading the tokenizer')", timeout=SERVER_START_SECONDS * 1000)
        assert "Loading" in page.inner_text("#model-status")
        page.fill("#message textarea", "Are you there?")
        mark_status_seen(page)
        page.click("#send")
        page.wait_for_selector("#answer-status [data-outcome=waiting]:has-text('waiting for the model')")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "loading.png")
        finish_loading(model, tokenizer)
        page.wait_for_selector(NEW_DONE)
        assert page.get_attribute("#answer-status [data-state=done]", "data-outcome") == "length"
        assert page.inner_text("#chatbot [data-testid=bot]").strip()
        # The status line follows the loading to its end without a reload.
        page.wait_for_selector("#model-status:has-text('auto: no GPU')")
    finally:
        app.close()
    assert "reading the tokenizer" in app.log() and "model ready" in app.log()


def test_on_a_space_a_model_that_fails_to_load_leaves_the_page_up_with_the_reason(page, tmp_path):
    app = App(tmp_path / "no-such-model", tmp_path / "app.log", {"SPACE_ID": "someone/orca2"})
    try:
        open_app(page, app, model_ready=False)
        page.wait_for_selector("#model-status:has-text('Loading failed')")
        assert "no-such-model" in page.inner_text("#model-status")
        page.fill("#message textarea", "Hello?")
        click_and_wait_for_answer(page, "#send")
        assert "could not be loaded" in page.inner_text("#answer-status")
        # The question stays in the chat, for Retry once the Space is fixed.
        assert page.inner_text("#chatbot [data-testid=user]").strip() == "Hello?"
        assert "there is no folder at that path" in page.inner_text("#answer-status")
    finally:
        app.close()
    assert "no-such-model" in app.log()


def test_an_answer_streams_in_token_by_token(page, plain_app):
    open_app(page, plain_app)
    seen = record_answers(page)
    send(page, "How can you tell if a restaurant is popular with locals?")
    partials = {text for text in seen if text.strip()}
    assert len(partials) > 1
    final = answers(page)[-1]
    assert all(final.startswith(p.strip()[:20]) for p in partials)
    assert "<|im_end|>" not in final and "<|im_start|>" not in final
    assert page.locator(DONE).get_attribute("data-outcome") == "length"


def stop_a_long_answer(page):
    """Ask for a 4000-token answer, press Stop once it is under way, wait for the page to say so."""
    open_sampling(page)
    set_number(page, "#max-new-tokens input[type=number]", 4000)
    page.fill("#message textarea", "Tell me everything.")
    page.click("#send")
    page.wait_for_function("document.querySelector('#chatbot [data-testid=bot]')?.innerText.length > 50")
    page.click("#stop")
    page.wait_for_selector(DONE)
    assert page.locator(DONE).get_attribute("data-outcome") == "stopped"


def test_stop_ends_the_generation_on_the_server(page, plain_app):
    open_app(page, plain_app)
    stop_a_long_answer(page)
    assert "Stopped" in page.inner_text("#answer-status")
    page.wait_for_selector("#send")
    finished = re.findall(
        r"generation finished \((\w+)\): (\w+), (\d+) tokens.*, (\w+) tokens after cancel", plain_app.log()
    )
    path, reason, n_tokens, after_cancel = finished[-1]
    # The app batches greedy answers by default: Stop reaches the batch too.
    assert path == "batched" and reason == "stopped" and int(n_tokens) < 4000 and int(after_cancel) <= 1


def test_retry_undo_and_new_chat(page, plain_app):
    open_app(page, plain_app)
    send(page, "First question")
    send(page, "Second question")
    assert page.locator("#chatbot [data-testid=user]").count() == 2
    first_answer = answers(page)[-1]

    click_and_wait_for_answer(page, "#retry")
    assert page.locator("#chatbot [data-testid=user]").all_inner_texts()[-1] == "Second question"
    assert page.locator("#chatbot [data-testid=user]").count() == 2
    assert answers(page)[-1] == first_answer  # greedy: the same answer again

    page.click("#undo")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=user]').length == 1")
    assert page.input_value("#message textarea") == "Second question"

    page.click("#new-chat")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=user]').length == 0")


def test_choosing_a_preset_changes_the_inspected_prompt(page, plain_app):
    open_app(page, plain_app)
    page.fill("#message textarea", "What is 17 * 23?")
    page.get_by_text("Prompt inspector", exact=True).click()
    page.click("#inspect")
    page.wait_for_function("document.querySelector('#inspect-count').innerText.includes('tokens')")
    assert "You are Orca" in page.inner_text("#inspect-text")

    page.click("#preset input")
    page.get_by_role("option", name="Empty", exact=True).click()
    page.wait_for_function("document.querySelector('#system-message textarea').value === ''")
    page.click("#inspect")
    page.wait_for_function("document.querySelector('#inspect-count').innerText.startsWith('25 tokens')")
    assert page.inner_text("#inspect-text .cm-content").startswith("<|im_start|>system\n<|im_end|>")
    assert page.input_value("#inspect-ids textarea").startswith("[1, 29871, 32001, 5205, 13, 32002")


def sampled_answer(page, seed):
    page.click("#new-chat")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=user]').length == 0")
    set_number(page, "#seed input", seed)
    send(page, "Surprise me")
    return answers(page)[-1]


def test_the_same_seed_gives_the_same_sampled_answer(page, plain_app):
    open_app(page, plain_app)
    open_sampling(page)
    page.check("#do-sample input")
    set_number(page, "#max-new-tokens input[type=number]", 30)
    first = sampled_answer(page, 1234)
    assert "seed 1234" in page.inner_text("#answer-status")
    assert sampled_answer(page, 1234) == first
    assert sampled_answer(page, 99) != first


def test_without_a_moderation_service_the_toggle_is_off_and_disabled(page, plain_app):
    open_app(page, plain_app)
    toggle = page.locator("#moderation input")
    assert not toggle.is_checked() and toggle.is_disabled()
    assert "CONTENT_SAFETY_ENDPOINT" in page.inner_text("#moderation")


def test_moderation_withholds_a_flagged_answer_that_never_shows(page, moderated_app):
    open_app(page, moderated_app)
    toggle = page.locator("#moderation input")
    assert toggle.is_checked() and toggle.is_enabled()
    seen = record_answers(page)
    send(page, "What is the weather like?")
    assert page.locator(DONE).get_attribute("data-outcome") == "withheld"
    assert seen and not any("violent" in text for text in seen)
    assert "Violence (severity 6)" in answers(page)[-1]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "moderation.png"), full_page=True)

    toggle.uncheck()
    send(page, "And without moderation?")
    assert "violent" in answers(page)[-1]


def test_a_phone_sized_screen_can_chat(browser, plain_app):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    open_app(page, plain_app)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    send_box = page.locator("#send").bounding_box()
    assert send_box["x"] >= 0 and send_box["x"] + send_box["width"] <= 390
    send(page, "Hi from a phone")
    assert answers(page)[-1].strip()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone.png"))
    context.close()


def test_screenshot_of_the_page(page, plain_app):
    """Saves tests/artifacts/screenshot.png; assets/screenshot.png in README is a copy of a good one."""
    open_app(page, plain_app)
    open_sampling(page)
    set_number(page, "#max-new-tokens input[type=number]", 48)
    page.get_by_text("Sampling", exact=True).click()
    page.get_by_text(EXAMPLE_LABELS[0], exact=True).click()
    page.get_by_text("Prompt inspector", exact=True).click()
    page.click("#inspect")
    page.wait_for_function("document.querySelector('#inspect-count').innerText.includes('tokens')")
    click_and_wait_for_answer(page, "#send")
    page.evaluate("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "screenshot.png"), full_page=True)
    assert (ARTIFACTS / "screenshot.png").stat().st_size > 10_000


def test_on_an_inference_server_the_page_says_so_and_stop_ends_the_servers_work(page, tmp_path):
    model = build_tiny_model(tmp_path / "loops", script=SCRIPT, loop=True)
    server = TransformersServe(tmp_path / "serve.log")
    app = App(model, tmp_path / "app.log", None, "--backend", "openai", "--base-url", server.base_url)
    try:
        page.goto(app.url)
        page.wait_for_selector("#model-status:has-text('Inference server')")
        assert server.base_url in page.inner_text("#model-status")
        stop_a_long_answer(page)
        assert answers(page)[-1].startswith("The answer\nThe answer")
        page.screenshot(path=str(ARTIFACTS / "inference-server.png"), full_page=True)
        assert server.steps_a_new_answer_waits(model) < STEPS_OF_A_FREE_SERVER
    finally:
        app.close()
        server.stop()

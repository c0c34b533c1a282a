"""The Compare tab and the token view as a researcher uses them, in Chromium: answers side by side,
each what /chat gives for its system message; one Stop for all; columns that stack on a phone; an
export; and the probability of every token of an answer, with its alternatives on click or focus."""

import json

import pytest
from gradio_client import Client
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from support import (
    ARTIFACTS,
    NO_CHROMIUM,
    NO_CHROMIUM_REASON,
    answers,
    download,
    open_app,
    preset_labels_shown,
    send,
    set_number,
)

from orca2_space.presets import PRESET_CHOICES, SYSTEM_PRESETS

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]
STORY = (
    "Put these sentences in order to make a story: (a) She planted the seed. (b) A flower bloomed. "
    "(c) Anna bought a seed. (d) She watered it every day."
)
DEFAULT_SYSTEMS = [
    SYSTEM_PRESETS[name]
    for name in ("Cautious (model card default)", "Empty (paper's evaluation setting)", "Step-by-step")
]


def set_max_new_tokens(page, control: str, value: int):
    """Type the value into a slider's number box until the page has taken it (a value typed while the
    slider was still mounting, as its accordion opened, is lost)."""
    page.wait_for_load_state("networkidle")
    taken = f"document.querySelector('{control} input[type=range]').value == '{value}'"
    for _ in range(3):
        set_number(page, f"{control} input[type=number]", value)
        try:
            page.wait_for_function(taken, timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the page did not take {value} in {control}")


def open_compare(page, app, max_new_tokens: int):
    open_app(page, app)
    page.click("#compare-tab-button")
    page.get_by_text("Settings shared by every column").click()
    set_max_new_tokens(page, "#compare-max-new-tokens", max_new_tokens)


def compare(page, question: str, columns: int = 3):
    page.fill("#compare-message textarea", question)
    page.click("#compare-run")
    for index in range(columns):
        page.wait_for_selector(f"#compare-status-{index} [data-state=done]")


def column_answer(page, index: int) -> str:
    return page.inner_text(f"#compare-answer-{index} [data-testid=bot]")


def test_answers_stream_side_by_side_and_each_equals_chat_for_its_system_message(page, plain_app):
    open_compare(page, plain_app, 20)
    compare(page, STORY)
    client = Client(plain_app.url, verbose=False)
    for index, system in enumerate(DEFAULT_SYSTEMS):
        alone = client.predict(
            message=STORY, system_message=system, single_turn=True, max_new_tokens=20, api_name="/chat"
        )
        # The page, like any Markdown, collapses runs of spaces; the export below holds the exact text.
        assert " ".join(column_answer(page, index).split()) == " ".join(alone["answer"].split())
        assert "20 tokens" in page.inner_text(f"#compare-status-{index}")
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


def test_one_stop_stops_every_column(page, plain_app):
    open_compare(page, plain_app, 4000)
    page.fill("#compare-message textarea", "Tell me everything.")
    page.click("#compare-run")
    page.wait_for_function(
        "[0, 1, 2].every(i => document.querySelector(`#compare-answer-${i} [data-testid=bot]`)?.innerText.length > 20)"
    )
    page.click("#compare-stop")
    for index in range(3):
        status = page.locator(f"#compare-status-{index} [data-state=done]")
        status.wait_for()
        assert status.get_attribute("data-outcome") == "stopped"
    page.wait_for_selector("#compare-run")


def test_a_comparison_exports_as_one_with_the_tokens_looked_at_and_imports_back(browser, plain_app, tmp_path):
    contexts = [browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True) for _ in range(2)]
    page, elsewhere = (context.new_page() for context in contexts)
    try:
        open_compare(page, plain_app, 12)
        page.click("#compare-count label:has-text('2')")
        compare(page, STORY, columns=2)
        page.click("#compare-score-0")
        page.wait_for_selector("#compare-tokens .tok")
        exported = json.loads(download(page, "#compare-export"))
        saved = tmp_path / "comparison.json"
        saved.write_text(json.dumps(exported))

        open_compare(elsewhere, plain_app, 20)
        with elsewhere.expect_file_chooser() as chooser:
            elsewhere.click("#compare-import")
        chooser.value.set_files(str(saved))
        elsewhere.wait_for_selector("#compare-export:enabled")
        shown = [column_answer(elsewhere, index) for index in range(2)]
        again = json.loads(download(elsewhere, "#compare-export"))
        assert shown == [column_answer(page, index) for index in range(2)]
        assert elsewhere.input_value("#compare-message textarea") == STORY
    finally:
        for context in contexts:
            context.close()
    assert exported["format"] == "orca2-space/comparison" and exported["question"] == STORY
    columns = exported["answers"]
    assert [c["preset"] for c in columns] == ["Cautious (model card default)", "Empty (paper's evaluation setting)"]
    assert [c["system_message"] for c in columns] == DEFAULT_SYSTEMS[:2]
    assert all(c["stats"]["n_tokens"] == 12 and len(c["answer_ids"]) == 12 for c in columns)
    assert [t["id"] for t in columns[0]["tokens"]] == columns[0]["answer_ids"] and columns[1]["tokens"] is None
    assert {**again, "exported": None} == {**exported, "exported": None}


def test_how_sure_and_export_wait_for_a_comparison_and_a_kept_one_is_shown_again(page, plain_app):
    open_compare(page, plain_app, 8)
    actions = ["#compare-export", *(f"#compare-score-{index}" for index in range(3))]
    assert all(page.locator(action).is_disabled() for action in actions)
    compare(page, STORY)
    answered = [column_answer(page, index) for index in range(3)]
    assert all(page.locator(action).is_enabled() for action in actions)
    page.reload()
    page.click("#compare-tab-button")
    page.wait_for_selector("#compare-export:enabled")
    assert [column_answer(page, index) for index in range(3)] == answered
    assert all(page.locator(action).is_enabled() for action in actions)


def test_the_columns_line_up_and_each_answer_shows_its_opening(page, plain_app):
    open_compare(page, plain_app, 200)
    page.click("#compare-count label:has-text('4')")
    compare(page, STORY, columns=4)
    for part in ("answer", "status", "score"):
        tops = {round(page.locator(f"#compare-{part}-{index}").bounding_box()["y"]) for index in range(4)}
        assert len(tops) == 1, part
    for index in range(4):
        scrolled = page.locator(f"#compare-answer-{index} .bubble-wrap").evaluate(
            "box => [box.scrollTop, box.scrollHeight > box.clientHeight]"
        )
        assert scrolled == [0, True]  # a long answer, shown from its start
    assert not page.locator("#compare-answer-0").get_by_role("button", name="Clear").is_visible()


def test_every_preset_reads_in_full_in_the_narrowest_column(page, plain_app):
    open_compare(page, plain_app, 8)
    page.click("#compare-count label:has-text('4')")
    page.wait_for_selector("#compare-column-3")
    # Four columns side by side, as narrow as the page makes them (narrower ones wrap to a new row).
    columns = [page.locator(f"#compare-column-{index}").bounding_box() for index in range(4)]
    assert len({box["y"] for box in columns}) == 1 and columns[3]["width"] < 300
    assert preset_labels_shown(page, "#compare-preset-3") == [(label, True) for label, _ in PRESET_CHOICES]


def test_a_tokens_alternatives_open_inside_the_screen(page, plain_app):
    open_compare(page, plain_app, 80)
    compare(page, STORY)
    page.click("#compare-score-2")
    page.wait_for_selector("#compare-tokens .tok")
    tokens = page.locator("#compare-tokens .tok")
    outside = []
    for index in range(tokens.count()):
        tokens.nth(index).focus()
        box = tokens.nth(index).locator(".tok-alts").bounding_box()
        if not (box and box["x"] >= 0 and box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 900):
            outside.append((index, box))
    assert tokens.count() == 80 and outside == []


def test_on_a_phone_the_columns_stack(browser, plain_app):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_compare(page, plain_app, 8)
        compare(page, STORY)
        boxes = [page.locator(f"#compare-column-{index}").bounding_box() for index in range(3)]
        page.screenshot(path=str(ARTIFACTS / "compare-phone.png"), full_page=True)
    finally:
        context.close()
    assert all(box["width"] > 300 for box in boxes)
    assert boxes[0]["y"] + boxes[0]["height"] <= boxes[1]["y"] and boxes[1]["y"] + boxes[1]["height"] <= boxes[2]["y"]


def tokens_of(page, view: str) -> list:
    return page.locator(f"{view} .tok").all()


def test_clicking_an_answer_colours_its_tokens_and_a_focused_token_shows_its_alternatives(page, plain_app):
    open_app(page, plain_app)
    page.get_by_text("Sampling", exact=True).click()
    set_max_new_tokens(page, "#max-new-tokens", 16)
    send(page, STORY)
    page.click("#chatbot [data-testid=bot]")
    page.wait_for_selector("#tokens .tok")
    tokens = tokens_of(page, "#tokens")
    assert len(tokens) == 16  # one per id the model wrote, its role line's newline included
    assert "temperature 1" in page.inner_text("#tokens")
    assert " ".join(page.inner_text("#tokens .tok-answer").split()) == " ".join(("\n" + answers(page)[-1]).split())
    tokens[5].focus()
    popup = tokens[5].locator(".tok-alts")
    assert popup.is_visible() and popup.locator(".tok-alt").count() == 5
    # Greedy: what the model wrote is the token it found most likely.
    assert "chosen" in popup.locator(".tok-alt").first.get_attribute("class")
    page.screenshot(path=str(ARTIFACTS / "tokens.png"), full_page=True)


def test_a_compared_answer_has_its_token_view_too(page, plain_app):
    open_compare(page, plain_app, 10)
    compare(page, STORY)
    assert "10 tokens" in page.inner_text("#compare-status-1")
    page.click("#compare-score-1")
    page.wait_for_selector("#compare-tokens .tok")
    assert "System message 2" in page.inner_text("#compare-tokens")
    assert len(tokens_of(page, "#compare-tokens")) == 10

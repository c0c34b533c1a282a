"""The Evaluate tab as a researcher uses it, in Chromium: the sample set under the empty and cautious system
messages, run to the end; the matrix of every answer, its filters, a cell's full answer and its token
view; an override that changes the figures; the exports and an import that shows the evaluation again;
Stop; a phone's screen; and a hostile file that shows as text and loads nothing."""

import csv
import io
import json

import pytest
from gradio_client import Client
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from support import ARTIFACTS, NO_CHROMIUM, NO_CHROMIUM_REASON, download, open_app, set_number

from orca2_space.presets import CAUTIOUS
from orca2_space.questions import sample_questions

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]
CELLS = "#evaluate-matrix button[data-cell]"
DONE = "#evaluate-progress [data-state=done]"
ATTACKER = "127.0.0.1:9"


def set_max_new_tokens(page, value: int):
    """Type the value into the slider's number box until the page has taken it (a value typed while the
    slider was still mounting, as its accordion opened, is lost)."""
    page.wait_for_load_state("networkidle")
    taken = f"document.querySelector('#evaluate-max-new-tokens input[type=range]').value == '{value}'"
    for _ in range(3):
        set_number(page, "#evaluate-max-new-tokens input[type=number]", value)
        try:
            page.wait_for_function(taken, timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the page did not take {value}")


def open_evaluate(page, app, max_new_tokens: int):
    open_app(page, app)
    page.click("#evaluate-tab-button")
    page.get_by_text("Settings for every answer").click()
    set_max_new_tokens(page, max_new_tokens)


def run_sample(page):
    page.click("#evaluate-sample")
    page.wait_for_selector("#evaluate-questions [data-questions]")
    page.click("#evaluate-run")
    page.wait_for_selector(DONE, timeout=600_000)
    page.wait_for_selector(f"{CELLS}:enabled")


def figures(page) -> list[str]:
    return page.locator("#evaluate-summary .eval-accuracy td.eval-accuracy").all_inner_texts()


def exported(page) -> dict:
    return json.loads(download(page, "#evaluate-export-json"))


def test_the_sample_set_under_the_empty_and_cautious_messages_runs_to_the_end_and_reads_cell_by_cell(
    browser, plain_app, tmp_path
):
    questions = sample_questions().questions
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_evaluate(page, plain_app, 8)
        assert [page.input_value(f"#evaluate-system-{i} textarea") for i in range(2)] == ["", CAUTIOUS]
        run_sample(page)
        cells = page.locator(CELLS)
        assert cells.count() == 2 * len(questions)
        assert len(figures(page)) == 2 and page.locator("#evaluate-summary .eval-bar-row").count() == 2
        assert "Scored by:" in page.inner_text("#evaluate-summary")
        page.get_by_text("Settings for every answer").click()  # closed again, for the screenshot
        page.screenshot(path=str(ARTIFACTS / "evaluate.png"), full_page=True)

        failing = page.locator("#evaluate-matrix tr:has(td[data-verdict]:not([data-verdict=right]))").count()
        page.click("#evaluate-filter label:has-text('Failures')")
        page.wait_for_function(f"document.querySelectorAll('#evaluate-matrix tr[data-question]').length == {failing}")
        assert page.locator("#evaluate-matrix tr:has(td[data-verdict]:not([data-verdict=right]))").count() == failing

        # A cell's full answer, exactly as the model wrote it (spaces collapse as in any Markdown), and its tokens.
        first = page.locator(CELLS).first
        place = [int(n) for n in first.get_attribute("data-cell").split(",")]
        first.click()
        page.wait_for_selector("#evaluate-cell #evaluate-answer [data-testid=bot]")
        asked = questions[place[0]].prompt
        system = ["", CAUTIOUS][place[1]]
        written = Client(plain_app.url, verbose=False).predict(
            message=asked, system_message=system, single_turn=True, max_new_tokens=8, api_name="/chat"
        )
        shown = page.inner_text("#evaluate-answer [data-testid=bot]")
        assert " ".join(shown.split()) == " ".join(written["answer"].split())
        assert " ".join(page.inner_text("#evaluate-answer [data-testid=user]").split()) == " ".join(asked.split())
        page.click("#evaluate-score")
        page.wait_for_selector("#evaluate-tokens .tok")
        assert page.locator("#evaluate-tokens .tok").count() == len(written["answer_ids"])
        page.screenshot(path=str(ARTIFACTS / "evaluate-cell.png"), full_page=True)

        # An override: the cell is right after all. The figures follow, and the cell is marked.
        before = figures(page)
        page.click("#evaluate-verdict label:has-text('Right')")
        page.wait_for_function(
            f"document.querySelectorAll('#evaluate-summary td.eval-accuracy')[{place[1]}].innerText != {json.dumps(before[place[1]])}"
        )
        assert "✎" in page.inner_text(f"#evaluate-matrix td:has(button[data-cell='{place[0]},{place[1]}'])")
        assert "overridden by hand" in page.inner_text("#evaluate-summary")

        table = list(csv.DictReader(io.StringIO(download(page, "#evaluate-export-csv"))))
        assert len(table) == 2 * len(questions)
        assert [row["overridden"] for row in table].count("yes") == 1
        again = exported(page)
        overridden = next(c for c in again["cells"] if [c["question"], c["message"]] == place)
        assert overridden["override"] == "right"
        assert all(cell["prompt_ids"] for cell in again["cells"])
        saved = tmp_path / "evaluation.json"
        saved.write_text(json.dumps(again))
        shown_figures = figures(page)
    finally:
        context.close()

    elsewhere = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True).new_page()
    try:
        open_app(elsewhere, plain_app)
        elsewhere.click("#evaluate-tab-button")
        with elsewhere.expect_file_chooser() as chooser:
            elsewhere.click("#evaluate-import")
        chooser.value.set_files(str(saved))
        elsewhere.wait_for_selector("#evaluate-export-json:enabled")
        assert figures(elsewhere) == shown_figures
        assert elsewhere.locator(CELLS).count() == 2 * len(questions)
        assert "✎" in elsewhere.inner_text(f"#evaluate-matrix td:has(button[data-cell='{place[0]},{place[1]}'])")
        reimported = exported(elsewhere)
    finally:
        elsewhere.context.close()
    assert reimported["cells"] == again["cells"]


def test_stop_ends_the_run_and_what_finished_stays(page, plain_app):
    open_evaluate(page, plain_app, 2000)
    page.click("#evaluate-sample")
    page.wait_for_selector("#evaluate-questions [data-questions]")
    page.click("#evaluate-run")
    page.wait_for_selector("#evaluate-progress [data-state=running]")
    page.click("#evaluate-stop")
    page.wait_for_selector("#evaluate-progress [data-state=stopped]")
    page.wait_for_selector("#evaluate-run")
    assert page.locator("#evaluate-stop").is_hidden()


def test_a_hostile_file_shows_as_text_loads_nothing_and_a_bad_one_says_why(page, plain_app, tmp_path):
    asked = []
    page.on("request", lambda request: asked.append(request.url))
    hostile = f"<img src=http://{ATTACKER}/a.png onerror=alert(1)> ![x](http://{ATTACKER}/b.png) =1+1"
    good = tmp_path / "questions.csv"
    with good.open("w", newline="") as file:
        csv.writer(file).writerows([["question", "answer"], [hostile, "4"], ["What is 2 + 2?", "4"]])
    open_evaluate(page, plain_app, 4)
    with page.expect_file_chooser() as chooser:
        page.click("#evaluate-upload")
    chooser.value.set_files(str(good))
    page.wait_for_selector("#evaluate-questions [data-questions='2']")
    assert hostile in page.inner_text("#evaluate-questions")
    page.click("#evaluate-run")
    page.wait_for_selector(DONE, timeout=300_000)
    assert hostile[:60] in page.inner_text("#evaluate-matrix")
    page.locator(CELLS).first.click()
    page.wait_for_selector("#evaluate-answer [data-testid=user]")
    assert " ".join(hostile.split()) in " ".join(page.inner_text("#evaluate-answer [data-testid=user]").split())
    assert page.locator("#evaluate-tab img").count() == 0
    assert not [url for url in asked if ATTACKER in url]

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt_text,solution\nWhat is 2 + 2?,4\n")
    with page.expect_file_chooser() as chooser:
        page.click("#evaluate-upload")
    chooser.value.set_files(str(bad))
    page.wait_for_selector("#evaluate-questions [role=alert]")
    assert "prompt_text" in page.inner_text("#evaluate-questions")


def test_on_a_phone_the_tab_fits_the_screen_and_the_matrix_scrolls_within_itself(browser, plain_app):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_app(page, plain_app)
        # Every tab is named on the one row of tabs, none hidden behind a menu.
        assert all(page.locator(f"#{tab}-tab-button").is_visible() for tab in ("chat", "compare", "evaluate"))
        page.click("#evaluate-tab-button")
        page.get_by_text("Settings for every answer").click()
        set_max_new_tokens(page, 4)
        run_sample(page)
        page.screenshot(path=str(ARTIFACTS / "evaluate-phone.png"), full_page=True)
        page_width = page.evaluate("document.documentElement.scrollWidth")
        columns = [page.locator(f"#evaluate-column-{index}").bounding_box() for index in range(2)]
        matrix = page.locator("#evaluate-matrix .eval-scroll").bounding_box()
        chart = page.locator("#evaluate-summary .eval-chart").bounding_box()
    finally:
        context.close()
    assert page_width <= 390
    assert all(box["width"] > 300 for box in columns) and columns[0]["y"] < columns[1]["y"]
    assert matrix["x"] >= 0 and matrix["x"] + matrix["width"] <= 390
    assert chart["x"] >= 0 and chart["x"] + chart["width"] <= 390

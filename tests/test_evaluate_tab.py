"""ui/evaluation_view.py and kept_evaluations.py: what the Evaluate tab shows of questions and results
(every text escaped, nothing loaded; the matrix, its filters, overrides marked; the chart's bars and
error bars; the progress line), the evaluations kept in the browser (few, small, read as untrusted), and
the tab's own events: each one that does work takes a place in the visitor's fair share, and no uploaded
file stays on the server's disk."""

import html.parser
import re

import gradio as gr
import pytest
from support import page_request, uploaded

from orca2_space import kept_evaluations
from orca2_space.chat import Chat
from orca2_space.evaluation import Cell, Evaluation, MessageResult, PairResult, Summary, summarize, to_json
from orca2_space.grading import Graded, Grading, Rule, Verdict
from orca2_space.presets import CAUTIOUS
from orca2_space.questions import Columns, Question, QuestionSet
from orca2_space.settings import Settings
from orca2_space.ui import evaluate_tab
from orca2_space.ui.adapters import visitor_of
from orca2_space.ui.evaluation_view import (
    matrix_html,
    message_label,
    progress_html,
    questions_html,
    rows_shown,
    summary_html,
)

ATTACKER = "127.0.0.1:9"  # the discard port: nothing may even try to reach it
HOSTILE = (
    f"<img src=http://{ATTACKER}/img.png onerror=alert(1)> ![x](http://{ATTACKER}/md.png) "
    f'<a href="http://{ATTACKER}/">link</a> <script>alert(2)</script> & &amp; "q" \'a\' ${{value}} {{{{value}}}}'
)
TAGS = {"div", "p", "span", "code", "table", "caption", "thead", "tbody", "tr", "th", "td", "br", "button", "progress"}
ATTRIBUTES = {
    "class", "role", "aria-label", "aria-live", "title", "style", "type", "disabled", "scope", "value", "max",
    "data-questions", "data-state", "data-done", "data-total", "data-message", "data-pair", "data-question",
    "data-cell", "data-verdict",
}  # fmt: skip
COLUMNS = Columns("question", "answer", "choices", "id", ("topic",))


class Markup(html.parser.HTMLParser):
    """The tags, attributes and text of an HTML fragment, as a browser parses it."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attributes: dict[str, list[str]] = {}
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            self.attributes.setdefault(name, []).append(value or "")

    def handle_data(self, data):
        self.text.append(data)

    @property
    def shown(self) -> str:
        return "".join(self.text)


def loads_nothing(markup: str) -> Markup:
    parsed = Markup(markup)
    assert parsed.tags <= TAGS and set(parsed.attributes) <= ATTRIBUTES
    # A style holds the chart's numbers only: no url(), no text from outside.
    assert all(re.fullmatch(r"(left|width): [\d.]+%(; width: [\d.]+%)?", s) for s in parsed.attributes.get("style", []))
    return parsed


def question(index: int, text: str = "What is 2 + 2?", expected: str = "4") -> Question:
    return Question(f"q{index}", text, expected, ("3", "4"), (("topic", "arithmetic"),))


def cell(q: int, m: int, verdict: Verdict | None, extracted: str | None = "4", **fields) -> Cell:
    graded = Graded(extracted, verdict or Verdict.NO_ANSWER)
    if verdict is None:
        return Cell(q, m, "", graded, error="The question is too long for Orca 2's context.", **fields)
    return Cell(q, m, f"The answer is {extracted}.", graded, answer_ids=(13, 1576), **fields)


def evaluation(rows: list[list[Verdict | None]], systems=("", CAUTIOUS), texts: list[str] | None = None) -> Evaluation:
    texts = texts or ["What is 2 + 2?"] * len(rows)
    questions = QuestionSet(tuple(question(i, t) for i, t in enumerate(texts)), COLUMNS, "questions.csv")
    cells = tuple(
        cell(q, m, v, None if v == Verdict.NO_ANSWER else "4") for q, row in enumerate(rows) for m, v in enumerate(row)
    )
    return Evaluation(questions, systems, Grading(Rule.NUMBER), {"max_new_tokens": 64}, {"name": "tiny"}, cells)


R, W, N = Verdict.RIGHT, Verdict.WRONG, Verdict.NO_ANSWER


def test_a_hostile_question_expected_answer_and_system_message_show_as_text_and_load_nothing():
    questions = QuestionSet((Question(HOSTILE, HOSTILE, HOSTILE, (HOSTILE,), (("topic", HOSTILE),)),), COLUMNS, HOSTILE)
    preview = loads_nothing(questions_html(questions))
    assert preview.shown.count(HOSTILE) == 3  # the source, the id, the question (long choices are cut)

    graded = Evaluation(
        questions,
        (HOSTILE, ""),
        Grading(Rule.REGEX, HOSTILE),
        {},
        {},
        (Cell(0, 0, HOSTILE, Graded(HOSTILE[:30], W)), Cell(0, 1, HOSTILE, Graded(None, N), override=R)),
    )
    matrix = loads_nothing(matrix_html(graded))
    assert HOSTILE[:30] in matrix.shown and message_label(0, HOSTILE)[:20] in matrix.shown
    summary = loads_nothing(summary_html(graded, summarize(graded)))
    assert message_label(0, HOSTILE) in summary.shown


def test_the_matrix_shows_every_cell_with_its_extracted_answer_and_verdict():
    shown = evaluation([[R, W], [N, None]])
    parsed = Markup(matrix_html(shown))
    assert parsed.attributes["data-cell"] == ["0,0", "0,1", "1,0", "1,1"]
    assert parsed.attributes["data-verdict"] == ["right", "wrong", "no-answer", "error"]
    assert "✓4" in parsed.shown and "✗4" in parsed.shown and "?no answer found" in parsed.shown
    assert "⚠The question is too long" in parsed.shown


def test_while_the_run_goes_on_the_cells_not_answered_yet_wait_and_none_opens():
    running = evaluation([[R, W]])
    running = Evaluation(running.questions, running.system_messages, running.grading, {}, {}, running.cells[:1])
    parsed = Markup(matrix_html(running, clickable=False))
    assert parsed.attributes["disabled"] == ["", ""] and "…" in parsed.shown


@pytest.mark.parametrize(
    "shown, rows",
    [("all", [0, 1, 2, 3]), ("failures", [1, 2, 3]), ("disagree", [1, 3])],
)
def test_the_filters_keep_all_the_failures_or_where_the_system_messages_disagree(shown, rows):
    # Both right; one wrong; both wrong; one found no answer (not right, so it disagrees too).
    four = evaluation([[R, R], [R, W], [W, W], [N, R]])
    assert rows_shown(four, shown) == rows
    assert Markup(matrix_html(four, shown)).attributes.get("data-question", []) == [str(r) for r in rows]


def test_an_override_is_marked_in_the_matrix_and_counted_in_the_figures():
    graded = evaluation([[W, R], [R, R]])
    overridden = graded.with_override(0, 0, R)
    assert "eval-overridden" not in Markup(matrix_html(graded)).attributes["class"]
    matrix = Markup(matrix_html(overridden))
    assert "eval-overridden" in matrix.attributes["class"] and any(
        "overridden by hand (graded wrong)" in a for a in matrix.attributes["aria-label"]
    )
    before, after = summarize(graded), summarize(overridden)
    assert (before.messages[0].right, after.messages[0].right) == (1, 2)
    figures = Markup(summary_html(overridden, after)).shown
    assert "1 verdict overridden by hand" in figures and "100.0%" in figures


def test_the_chart_draws_each_accuracy_as_a_bar_with_its_interval_as_error_bars():
    shown = evaluation([[R, W]])
    results = (
        MessageResult(0, 49, 41, 10, 0, 0.49, (0.3953, 0.5853)),
        MessageResult(1, 0, 0, 0, 2, None, None),
    )
    pair = PairResult(0, 1, 7, 3, 40, 50, 0.34375, "no evidence of a difference at this sample size")
    markup = summary_html(shown, Summary(results, (pair,)))
    parsed = loads_nothing(markup)
    assert parsed.attributes["style"][:2] == ["width: 49.00%", "left: 39.53%; width: 19.00%"]
    assert "49.0%" in parsed.shown and "39.5% to 58.5%" in parsed.shown
    label = next(a for a in parsed.attributes["aria-label"] if a.startswith("Accuracy"))
    assert "1 · Empty: 49.0% (39.5% to 58.5%)" in label and "2 · Cautious: nothing scored" in label
    assert "0.344" in parsed.shown and "no evidence of a difference at this sample size" in parsed.shown
    assert "Scored by: " + shown.grading.describe() in parsed.shown


def test_the_progress_says_how_many_how_fast_and_how_long_and_whether_it_ended_or_was_stopped():
    running = Markup(progress_html(37, 160, 4.2, 29.4, False))
    assert (
        running.attributes["data-state"] == ["running"]
        and "37 of 160 answers · 4.2 answers/s · about 29 s left" in running.shown
    )
    assert Markup(progress_html(160, 160, 4.2, None, True)).attributes["data-state"] == ["done"]
    stopped = Markup(progress_html(37, 160, None, None, True, ["Stopped after 37 of 160 answers."]))
    assert stopped.attributes["data-state"] == ["stopped"] and "Stopped after 37 of 160 answers." in stopped.shown


def test_a_typed_system_message_is_named_by_its_opening():
    assert message_label(1, CAUTIOUS) == "2 · Cautious"
    assert (
        message_label(0, "Answer   with one\nword only, please, and nothing else at all")
        == "1 · “Answer with one word only, plea…”"
    )


def test_the_browser_keeps_the_last_three_newest_first_without_prompt_ids():
    kept = []
    for index in range(5):
        one = evaluation([[R, W]])
        one = Evaluation(one.questions, one.system_messages, one.grading, {}, {}, tuple(
            Cell(c.question, c.message, c.answer, c.graded, c.answer_ids, prompt_ids=(1, 2, 3)) for c in one.cells
        ))  # fmt: skip
        kept, notice = kept_evaluations.keep(kept, one, label=f"run {index}")
        assert notice is None
    assert [k.label for k in kept] == ["run 4", "run 3", "run 2"]
    opened = kept_evaluations.opened(kept, 100, 1000)
    assert opened is not None and all(c.prompt_ids is None and c.answer_ids == (13, 1576) for c in opened.cells)


def test_an_evaluation_too_large_for_the_browser_is_kept_without_answer_ids_and_the_others_give_way(monkeypatch):
    small = evaluation([[R, W]])
    kept, _ = kept_evaluations.keep([], small, label="small")
    monkeypatch.setattr(kept_evaluations, "KEPT_CHARS", len(kept_evaluations.compact(small, answer_ids=False)) + 1)
    kept, notice = kept_evaluations.keep(kept, small, label="again")
    assert [k.label for k in kept] == ["again"] and "without its answers' token ids" in (notice or "")
    opened = kept_evaluations.opened(kept, 100, 1000)
    assert opened is not None and all(c.answer_ids is None for c in opened.cells)


def test_what_the_browser_sends_back_is_read_as_untrusted():
    good, _ = kept_evaluations.keep([], evaluation([[R]], systems=("",)), label="good")
    sent = [{"label": 1}, "junk", *kept_evaluations.dump(good)]
    assert [k.label for k in kept_evaluations.load(sent)] == ["good"]
    assert kept_evaluations.load({"not": "a list"}) == []
    broken = [kept_evaluations.KeptEvaluation(label="broken", evaluation=to_json(evaluation([[R]]))[:-20])]
    assert kept_evaluations.opened(broken, 100, 1000) is None


# --- The tab's own events ------------------------------------------------------------------------


@pytest.fixture
def tab_events(fake_backend) -> tuple[Chat, dict]:
    """The Evaluate tab's event handlers, by name, as the page calls them."""
    chat = Chat(fake_backend, Settings(visitor_limit=2))
    with gr.Blocks() as demo:
        evaluate_tab.build(demo, chat)
    return chat, {f.name: f.fn for f in demo.fns.values()}


def kept_two() -> list:
    kept, _ = kept_evaluations.keep([], evaluation([[R, W], [W, R]]), label="first")
    kept, _ = kept_evaluations.keep(kept, evaluation([[R, R], [W, W]]), label="second")
    return kept_evaluations.dump(kept)


def test_every_evaluate_event_that_does_work_takes_a_place_in_the_visitors_fair_share(tab_events):
    """A visitor with every place taken is told why by each of them; another visitor is not held up."""
    chat, events = tab_events
    kept, cell = kept_two(), gr.SelectData(None, {"index": [0, 1], "value": "0,1", "selected": True})
    calls = {
        "load_sample": lambda r: events["load_sample"](r),
        "show_kept": lambda r: events["show_kept"](r, kept=kept, shown="all", chosen=None),
        "filtered": lambda r: events["filtered"](r, kept=kept, shown="failures", chosen=None),
        "open_cell": lambda r: events["open_cell"](cell, r, kept=kept, shown="all"),
        "override": lambda r: events["override"](r, kept=kept, chosen=[0, 1], verdict=Verdict.RIGHT.value),
        "choose_kept": lambda r: events["choose_kept"](r, kept=kept, index=1),
        "export_csv": lambda r: events["export_csv"](r, kept=kept),
        "export_json": lambda r: events["export_json"](r, kept=kept),
    }
    busy, other = page_request("busy"), page_request("other", address="10.0.0.2")
    with chat.fair_share.admit(visitor_of(busy), 2):
        for name, call in calls.items():
            with pytest.raises(gr.Error, match="You already have 2 requests running or waiting"):
                call(busy)
            assert call(other), name
        with pytest.raises(gr.Error, match="already"):
            events["load_hub"](busy, dataset="owner/name", split="test", question="", answer="", choices="")
        uploads = {
            "load_file": lambda r, file: events["load_file"](r, file=file),
            "import_json": lambda r, file: events["import_json"](r, file=file, kept=kept),
        }
        for name, upload in uploads.items():
            path = uploaded(f"refused-{name}.json", b"[]")
            with pytest.raises(gr.Error, match="already"):
                upload(busy, {"path": str(path)})
            assert not path.exists(), name  # read (and deleted) before the refusal


def test_an_uploaded_question_file_is_loaded_and_not_kept_on_the_servers_disk(tab_events):
    _, events = tab_events
    path = uploaded("questions.csv", b"question,answer\nWhat is 2 + 2?,4\n")
    shown = events["load_file"](page_request("s"), file={"path": str(path), "orig_name": "questions.csv"})
    loaded = next(value for value in shown.values() if isinstance(value, dict) and "questions" in value)
    assert [q["text"] for q in loaded["questions"]] == ["What is 2 + 2?"]
    assert not path.exists() and not path.parent.exists()


def test_an_imported_evaluation_is_kept_in_the_browser_and_not_on_the_servers_disk(tab_events):
    _, events = tab_events
    path = uploaded("evaluation.json", to_json(evaluation([[R, W]])).encode())
    shown = events["import_json"](page_request("s"), file={"path": str(path)}, kept=kept_two())
    kept = next(value for value in shown.values() if isinstance(value, list))
    assert len(kept_evaluations.load(kept)) == 3
    assert not path.exists() and not path.parent.exists()

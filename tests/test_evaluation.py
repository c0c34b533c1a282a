"""An evaluation's cells, summary and exports: accuracy with its interval per system message, the paired
test per pair, overrides, a CSV no spreadsheet can run, and a JSON that comes back exactly as it went."""

import csv
import io
import json
from dataclasses import replace

import pytest

from orca2_space.evaluation import (
    FORMAT,
    Cell,
    Evaluation,
    from_json,
    summarize,
    to_csv,
    to_json,
)
from orca2_space.grading import Graded, Grading, Rule, Verdict, grade
from orca2_space.questions import Columns, Question, QuestionSet
from orca2_space.settings import InvalidRequest
from orca2_space.statistics import mcnemar_exact, wilson_interval

RIGHT, WRONG, NONE = Verdict.RIGHT, Verdict.WRONG, Verdict.NO_ANSWER
QUESTIONS = QuestionSet(
    (
        Question("q1", "What is 6 × 7?", "42", (), (("level", "easy"),)),
        Question("q2", '=HYPERLINK("http://evil.example","click")', "-3", (), (("level", "@SUM(A1)"),)),
        Question("q3", "Which is a fruit?", "B", ("carrot", "apple"), (("level", "\tTab"),)),
    ),
    Columns("question", "answer", "choices", "id", ("level",)),
    "mine.csv",
)
GRADING = Grading(Rule.FINAL)
PARAMS = {"max_new_tokens": 256, "do_sample": False, "temperature": 0.7, "seed": 1234}
MODEL = {"name": "microsoft/Orca-2-7b", "backend": "local", "weights": "bfloat16", "app_version": "abc123"}
SYSTEMS = ("", "You are Orca, a cautious assistant.")


def answered(evaluation: Evaluation, question: int, message: int, answer: str, **extra) -> Evaluation:
    graded = grade(evaluation.grading, evaluation.questions.questions[question], answer)
    cell = Cell(question, message, answer, graded, answer_ids=(13, 29871, 2), prompt_ids=(1, 32001, 1788), **extra)
    return evaluation.with_cell(cell)


def example() -> Evaluation:
    evaluation = Evaluation(QUESTIONS, SYSTEMS, GRADING, PARAMS, MODEL)
    for question, message, answer in [
        (0, 0, "6 × 7 = 42.\nFinal answer: 42"),
        (0, 1, "Final answer: 42"),
        (1, 0, "Final answer: -3"),
        (1, 1, "I am not sure."),
        (2, 0, "Final answer: (A)"),
        (2, 1, "The answer is (B) apple."),
    ]:
        evaluation = answered(evaluation, question, message, answer, stats={"tokens_per_second": 12.5})
    return evaluation


def test_cells_are_found_by_question_and_message_and_a_new_answer_replaces_the_old():
    evaluation = example()
    assert evaluation.total == 6 and len(evaluation.cells) == 6
    assert evaluation.cell(1, 1) is not None and evaluation.cell(1, 1).verdict is NONE
    again = answered(evaluation, 1, 1, "Final answer: -3")
    assert len(again.cells) == 6 and again.cell(1, 1).verdict is RIGHT
    assert evaluation.cell(1, 1).verdict is NONE
    with pytest.raises(ValueError):
        evaluation.with_cell(replace(evaluation.cells[0], question=3))


def test_a_cell_with_an_error_has_no_verdict_and_is_not_scored():
    evaluation = Evaluation(QUESTIONS, SYSTEMS, GRADING, PARAMS, MODEL)
    evaluation = evaluation.with_cell(Cell(0, 0, "", Graded(None, NONE), error="The question is too long."))
    assert evaluation.cell(0, 0).verdict is None
    result = summarize(evaluation).messages[0]
    assert (result.errors, result.right + result.wrong + result.no_answer, result.accuracy) == (1, 0, None)
    with pytest.raises(ValueError):
        evaluation.with_override(0, 0, RIGHT)


def test_accuracy_counts_no_answer_found_as_not_right_and_reports_it_on_its_own():
    summary = summarize(example())
    first, second = summary.messages
    assert (first.right, first.wrong, first.no_answer, first.errors) == (2, 1, 0, 0)
    assert (second.right, second.wrong, second.no_answer) == (2, 0, 1)
    assert first.accuracy == second.accuracy == pytest.approx(2 / 3)
    assert first.interval == wilson_interval(2, 3) and second.interval == wilson_interval(2, 3)


def test_each_pair_of_system_messages_gets_the_discordant_counts_and_mcnemars_test():
    (pair,) = summarize(example()).pairs
    # q1 both right; q2 only the empty one (no answer found under the cautious); q3 only the cautious.
    assert (pair.first, pair.second, pair.both, pair.only_first, pair.only_second, pair.neither) == (0, 1, 1, 1, 1, 0)
    assert pair.p_value == mcnemar_exact(1, 1) == 1.0
    assert pair.words == (
        "no evidence of a difference at this sample size (p = 1): each got 1 right that the other got wrong"
    )


def test_a_summary_of_a_partial_run_pairs_only_questions_answered_under_both():
    evaluation = Evaluation(QUESTIONS, SYSTEMS, GRADING, PARAMS, MODEL)
    assert summarize(evaluation).pairs[0].p_value is None
    evaluation = answered(evaluation, 0, 0, "Final answer: 42")
    (pair,) = summarize(evaluation).pairs
    assert pair.p_value is None and pair.words == "no question answered under both yet"
    evaluation = answered(evaluation, 0, 1, "Final answer: 41")
    assert summarize(evaluation).pairs[0].only_first == 1


def test_an_override_changes_the_figures_and_is_kept_apart_from_the_rules_verdict():
    evaluation = example().with_override(1, 1, WRONG)
    cell = evaluation.cell(1, 1)
    assert (cell.graded.verdict, cell.override, cell.verdict) == (NONE, WRONG, WRONG)
    assert summarize(evaluation).messages[1].no_answer == 0 and summarize(evaluation).messages[1].wrong == 1
    fixed = evaluation.with_override(2, 0, RIGHT)
    assert summarize(fixed).messages[0].right == 3
    assert fixed.with_override(2, 0, None).cell(2, 0).override is None
    # Setting the rule's own verdict is no override.
    assert example().with_override(0, 0, RIGHT).cell(0, 0).override is None


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_the_csv_has_one_row_per_cell_with_overrides_marked():
    rows = csv_rows(to_csv(example().with_override(1, 1, WRONG)))
    assert len(rows) == 6
    assert [(row["question_id"], row["system_message_number"]) for row in rows][:2] == [("q1", "1"), ("q1", "2")]
    overridden = rows[3]
    assert (overridden["verdict"], overridden["rule_verdict"], overridden["overridden"]) == (
        "wrong",
        "no answer found",
        "yes",
    )
    assert rows[4]["choices"] == "carrot | apple" and rows[4]["extracted"] == "A"
    assert rows[0]["answer"] == "6 × 7 = 42.\nFinal answer: 42"


def test_no_csv_cell_starts_a_formula():
    evaluation = answered(example(), 0, 1, "+cmd|' /C calc'!A0")
    text = to_csv(evaluation)
    rows = csv_rows(text)
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value
    assert rows[2]["question"] == '\'=HYPERLINK("http://evil.example","click")'
    assert rows[2]["expected"] == "'-3" and rows[2]["level"] == "'@SUM(A1)"
    assert rows[4]["level"] == "'\tTab"
    assert rows[1]["answer"] == "'+cmd|' /C calc'!A0"


def test_the_json_export_carries_everything_to_run_it_again():
    evaluation = example().with_override(1, 1, WRONG)
    document = json.loads(to_json(evaluation))
    assert (document["format"], document["version"]) == (FORMAT, 1)
    assert document["model"] == MODEL and document["params"]["seed"] == 1234
    assert document["grading"] == {"rule": "final-answer", "pattern": None, "description": GRADING.describe()}
    assert document["system_messages"] == list(SYSTEMS)
    assert document["questions"]["items"][2] == {
        "id": "q3",
        "text": "Which is a fruit?",
        "expected": "B",
        "choices": ["carrot", "apple"],
        "metadata": [["level", "\tTab"]],
    }
    cell = document["cells"][3]
    assert cell["prompt_ids"] == [1, 32001, 1788] and cell["answer_ids"] == [13, 29871, 2]
    assert (cell["rule_verdict"], cell["override"], cell["verdict"]) == ("no answer found", "wrong", "wrong")
    assert document["summary"]["messages"][1]["wrong"] == 1


def test_json_round_trips_exactly():
    evaluation = example().with_override(1, 1, WRONG)
    evaluation = evaluation.with_cell(Cell(0, 1, "", Graded(None, NONE), error="The question is too long."))
    regex = replace(
        evaluation, grading=Grading(Rule.REGEX, r"#### (\d+)"), questions=replace(QUESTIONS, rule=Rule.FINAL)
    )
    for original in (evaluation, regex, Evaluation(QUESTIONS, SYSTEMS[:1], GRADING, PARAMS, MODEL)):
        again = from_json(to_json(original), max_rows=10, max_cell_chars=1000)
        assert again == original
        assert summarize(again) == summarize(original)


def broken(change) -> str:
    document = json.loads(to_json(example()))
    change(document)
    return json.dumps(document)


def refusal(text: str, max_rows: int = 10, max_cell_chars: int = 1000) -> str:
    with pytest.raises(InvalidRequest) as refused:
        from_json(text, max_rows, max_cell_chars)
    return str(refused.value)


def test_importing_something_else_is_refused_clearly():
    assert "Not JSON" in refusal("{nope")
    assert "must be an object" in refusal("[1, 2]")
    assert "Not an orca2-space evaluation" in refusal('{"format": "orca2-space/comparison", "version": 1}')
    assert "this app reads version 1" in refusal(broken(lambda d: d.update(version=2)))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d["questions"].update(items=[]), "questions.items is empty"),
        (lambda d: d["questions"]["items"][0].update(text=5), "questions.items[0].text must be text, got int"),
        (lambda d: d["questions"]["items"][0].update(text="x" * 1001), "at most 1000"),
        (lambda d: d["questions"]["items"][2].update(choices=["only"]), "1 options"),
        (lambda d: d.update(system_messages=["a"] * 5), "1 to 4"),
        (lambda d: d.update(grading={"rule": "vibes"}), "Unknown scoring rule"),
        (lambda d: d.update(grading={"rule": "regex", "pattern": "(unclosed"}), "not a regular expression"),
        (lambda d: d.update(params={"seed": {"nested": 1}}), "params.seed must be a plain value"),
        (lambda d: d["cells"][0].update(question=7), "cells[0].question: 7 is outside 0 to 2"),
        (lambda d: d["cells"][0].update(message=True), "cells[0].message must be a whole number, got bool"),
        (lambda d: d["cells"][0].update(answer_ids=[1, -2]), "cells[0].answer_ids must be a list of token ids"),
        (lambda d: d["cells"][0].update(answer_ids=list(range(100_001))), "at most 100000"),
        (lambda d: d["cells"][0].update(rule_verdict="maybe"), "'maybe' is no verdict"),
        (lambda d: d["cells"][1].update(question=0, message=0), "twice"),
        (lambda d: d["cells"].extend(d["cells"] * 2), "more than the 6"),
    ],
)
def test_a_malformed_import_is_refused_saying_where(change, says):
    assert says in refusal(broken(change))


def test_an_import_over_the_servers_row_cap_is_refused():
    assert "at most 2 per evaluation" in refusal(to_json(example()), max_rows=2)

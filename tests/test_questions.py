"""Questions come from a file (CSV, JSON Lines, JSON), from an API request's records, from the built-in sample
set or from a Hub dataset; a file that can't be used is refused with a message that says what is wrong."""

import json
import sys
from fractions import Fraction
from itertools import permutations

import pytest

from orca2_space.grading import Grading, Rule, Verdict, grade
from orca2_space.questions import (
    Columns,
    Question,
    hub_questions,
    questions_from_records,
    read_questions,
    sample_questions,
)
from orca2_space.settings import InvalidRequest

ROWS = 100
CELL = 2000


def read(data: bytes | str, filename: str = "questions.csv", **mapping: str):
    raw = data.encode() if isinstance(data, str) else data
    return read_questions(raw, filename, ROWS, CELL, mapping or None)


def refused(data: bytes | str, filename: str = "questions.csv", **mapping: str) -> str:
    with pytest.raises(InvalidRequest) as refusal:
        read(data, filename, **mapping)
    return str(refusal.value)


def test_a_csv_file_gives_its_questions_and_says_which_columns_it_took():
    questions = read("ID,Question,Answer,Topic\nq1,What is 2 + 2?,4,sums\nq2,Is 9 odd?,Yes,parity\n")
    assert questions.columns == Columns("Question", "Answer", None, "ID", ("Topic",))
    assert questions.questions == (
        Question("q1", "What is 2 + 2?", "4", (), (("Topic", "sums"),)),
        Question("q2", "Is 9 odd?", "Yes", (), (("Topic", "parity"),)),
    )
    assert questions.source == "questions.csv"


def test_column_names_are_guessed_case_insensitively_and_a_mapping_overrides_them():
    assert read("PROMPT,Target\nHi?,hello\n").columns.question == "PROMPT"
    assert read("input,gold\nHi?,hello\n").columns.expected == "gold"
    mapped = read("text,solution,answer\nHi?,hello,unused\n", question="text", expected="solution")
    assert mapped.questions[0].text == "Hi?" and mapped.questions[0].expected == "hello"
    assert mapped.columns.metadata == ("answer",)


def test_rows_without_an_id_are_numbered():
    assert [q.id for q in read("question,answer\na?,1\nb?,2\n").questions] == ["1", "2"]


def test_a_csv_cell_is_text_never_a_formula_and_html_or_markdown_stays_as_written():
    questions = read(
        'question,answer,note\n"=HYPERLINK(""http://evil.example"",""click"")",=1+1,@SUM(A1)\n'
        "<img src=x onerror=alert(1)> ![x](http://evil.example/x.png) **bold**?,-3,+1\n"
    ).questions
    assert questions[0].text == '=HYPERLINK("http://evil.example","click")'
    assert questions[0].expected == "=1+1" and questions[0].metadata == (("note", "@SUM(A1)"),)
    assert questions[1].text == "<img src=x onerror=alert(1)> ![x](http://evil.example/x.png) **bold**?"
    assert questions[1].expected == "-3"


def test_choices_in_a_csv_cell_one_per_line_separated_by_bars_or_as_a_json_list():
    questions = read(
        'question,choices,answer\nPick one,"red\ngreen\nblue",B\nPick,red | green,A\nPick,"[""x, y"", ""z""]",B\n'
    ).questions
    assert [q.choices for q in questions] == [("red", "green", "blue"), ("red", "green"), ("x, y", "z")]


def test_the_prompt_letters_the_options_beneath_the_question():
    question = Question("1", "Which is a fruit?", "B", ("carrot", "apple"))
    assert question.prompt == "Which is a fruit?\n\n(A) carrot\n(B) apple"
    assert Question("2", "What is 2 + 2?", "4").prompt == "What is 2 + 2?"


def test_json_lines_and_json_lists_are_read_with_their_values_as_text():
    lines = (
        '{"id": 7, "question": "How many?", "answer": 72, "level": 2}\n\n'
        '{"id": "b", "question": "Sure?", "answer": true, "level": null, "tags": ["x"]}\n'
    )
    questions = read(lines, "set.jsonl").questions
    assert questions[0] == Question("7", "How many?", "72", (), (("level", "2"),))
    assert questions[1] == Question("b", "Sure?", "Yes", (), (("level", ""), ("tags", '["x"]')))
    listed = read(
        '[{"question": "Which?", "choices": ["a", "b", "c"], "answer": 2}, {"question": "Q", "answer": "x"}]',
        "set.json",
    ).questions
    # MMLU's form: the answer is the option's 0-based index.
    assert listed[0].choices == ("a", "b", "c") and listed[0].expected == "C"
    assert listed[1].choices == ()


def test_a_file_without_a_known_suffix_is_read_by_its_first_character():
    assert read('[{"question": "Q", "answer": "a"}]', "upload").questions[0].text == "Q"
    assert read('{"question": "Q", "answer": "a"}\n', "upload").questions[0].text == "Q"
    assert read("question,answer\nQ,a\n", "upload").questions[0].text == "Q"
    assert read("question\tanswer\nQ, with a comma\ta\n", "set.tsv").questions[0].text == "Q, with a comma"


def test_a_missing_column_is_named_with_the_columns_seen():
    message = refused("prompt_text,reply\nhi,there\n")
    assert "no question column" in message and "'prompt_text', 'reply'" in message
    assert "no expected column" in refused("question,reply\nhi,there\n")
    assert "has no column 'nope'" in refused("question,answer\nhi,there\n", question="nope")


def test_bytes_that_are_not_utf8_are_refused_with_where():
    message = refused("question,answer\ncaf\xe9,1\n".encode("latin-1"))
    assert "not UTF-8" in message and "0xe9" in message


def test_an_empty_file_or_one_without_rows_is_refused():
    assert "is empty" in refused(b"")
    assert "is empty" in refused("  \n\n")
    assert "has no rows" in refused("question,answer\n")
    assert "has no rows" in refused("[]", "set.json")


def test_too_many_rows_are_refused_naming_the_cap():
    message = refused("question,answer\n" + "q,a\n" * (ROWS + 1))
    assert f"more than {ROWS} rows" in message and f"at most {ROWS}" in message
    assert len(read("question,answer\n" + "".join(f"q{i},a\n" for i in range(ROWS))).questions) == ROWS


@pytest.mark.parametrize(
    ("build", "filename"),
    [
        (lambda n: "question,answer\n" + "q,a\n" * n + "q,a,broken\n", "big.csv"),
        (lambda n: '{"question": "q", "answer": "a"}\n' * n + "not json\n", "big.jsonl"),
        (lambda n: "[" + ",".join(['{"question": "q", "answer": "a"}'] * n) + ", {broken", "big.json"),
    ],
)
def test_a_million_rows_are_refused_at_the_cap_without_reading_the_rest(build, filename):
    # Each file ends in a row that is broken: read to the end, it would be refused for that instead.
    assert f"more than {ROWS} rows" in refused(build(10**6), filename)


@pytest.mark.parametrize("filename", ["big.csv", "big.jsonl", "big.json"])
def test_a_ten_megabyte_cell_is_refused_naming_its_row_and_the_cap(filename):
    huge = "x" * 10_000_000
    data = {
        "big.csv": f"question,answer\nfine,1\n{huge},2\n",
        "big.jsonl": '{"question": "fine", "answer": 1}\n' + json.dumps({"question": huge, "answer": 2}) + "\n",
        "big.json": json.dumps([{"question": "fine", "answer": 1}, {"question": huge, "answer": 2}]),
    }[filename]
    message = refused(data, filename)
    assert "row 2" in message and f"{CELL}" in message


def test_malformed_files_are_refused_saying_where():
    assert "line 2" in refused('{"question": "q", "answer": "a"}\n{"question": \n', "set.jsonl")
    assert "must be an object" in refused('["just text"]', "set.json")
    assert "JSON list of objects" in refused('{"question": "q"}', "set.json")
    assert "row 1" in refused("question,answer\n,a\n") and "no question" in refused("question,answer\n,a\n")
    assert "no expected answer" in refused("question,answer\nq,\n")
    assert "3 cells" in refused("question,answer\nq,a,surprise\n")
    assert "is row 1's too" in refused("id,question,answer\nx,q,a\nx,r,b\n")
    assert "2 to 26 options" in refused('question,choices,answer\nq,"[""only""]",A\n')
    assert "no option's index" in refused('[{"question": "q", "choices": ["a", "b"], "answer": 5}]', "set.json")


def test_records_from_the_api_are_read_like_a_file():
    questions = questions_from_records([{"question": "Q?", "answer": "yes", "source": "mine"}], ROWS, CELL)
    assert questions.questions == (Question("1", "Q?", "yes", (), (("source", "mine"),)),)
    assert questions.source == "request"
    with pytest.raises(InvalidRequest, match="at most 1 per evaluation"):
        questions_from_records([{"question": "a", "answer": "b"}] * 2, 1, CELL)
    with pytest.raises(InvalidRequest, match="must be a record"):
        questions_from_records(["Q?"], ROWS, CELL)  # type: ignore[list-item]
    with pytest.raises(InvalidRequest, match="must be a list"):
        questions_from_records({"question": "Q"}, ROWS, CELL)  # type: ignore[arg-type]


def test_a_hub_dataset_needs_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InvalidRequest, match="needs the datasets package"):
        hub_questions("cais/mmlu", "test", {}, ROWS, CELL)


class FakeDatasets:
    """Stands in for the `datasets` package (never the hub in tests): what load_dataset was asked, and rows."""

    def __init__(self, rows, error=None):
        self.rows, self.error, self.asked = rows, error, []

    def load_dataset(self, dataset_id, split, streaming):
        self.asked.append((dataset_id, split, streaming))
        if self.error:
            raise self.error
        return iter(self.rows)


def test_a_hub_dataset_is_streamed_and_mapped(monkeypatch):
    rows = [{"question": "Which?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "B"}]
    fake = FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    questions = hub_questions("allenai/ai2_arc", "test", {"expected": "answerKey"}, ROWS, CELL)
    assert fake.asked == [("allenai/ai2_arc", "test", True)]
    assert questions.source == "hub:allenai/ai2_arc/test"
    assert questions.questions == (Question("1", "Which?", "B", ("x", "y")),)


def test_a_hub_dataset_over_the_cap_or_unreachable_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([{"question": "q", "answer": "a"}] * (ROWS + 5)))
    with pytest.raises(InvalidRequest, match=f"more than {ROWS} rows"):
        hub_questions("some/set", "train", {}, ROWS, CELL)
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets([], ConnectionError("offline")))
    with pytest.raises(InvalidRequest, match=r"Could not load some/set \(train\) from the Hub: offline"):
        hub_questions("some/set", "train", {}, ROWS, CELL)


# --- the sample set ---

SAMPLE = {question.id: question for question in sample_questions().questions}


def kind(question: Question) -> str:
    return dict(question.metadata)["kind"]


def test_the_sample_set_has_forty_questions_or_more_of_three_kinds_scored_by_the_final_answer_rule():
    sample = sample_questions()
    assert len(sample.questions) >= 40 and sample.source == "sample" and sample.rule is Rule.FINAL
    kinds = [kind(q) for q in sample.questions]
    assert {k: kinds.count(k) >= 10 for k in kinds} == {"arithmetic": True, "multiple choice": True, "yes/no": True}
    for question in sample.questions:
        assert 'Finish with a line "Final answer:' in question.text
        assert bool(question.choices) == (kind(question) == "multiple choice")


def test_every_sample_answer_scores_right_under_its_rule_written_as_a_model_would():
    for question in SAMPLE.values():
        shown = question.expected
        if question.choices:
            shown = f"({question.expected}) {question.choices['ABCDE'.index(question.expected)]}"
        answer = f"Let me work through this step by step.\n\nSo that settles it.\nFinal answer: {shown}"
        assert grade(Grading(Rule.FINAL), question, answer).verdict is Verdict.RIGHT, question.id


# Every arithmetic answer, worked out again here from the question's numbers, independently of the file.
ARITHMETIC = {
    "arithmetic-01": 4 * 12 - 31,
    "arithmetic-02": 3 * 7 + 5 * 4,
    "arithmetic-03": Fraction(80) * Fraction(5, 2),
    "arithmetic-04": Fraction(252, 18),
    "arithmetic-05": 40 - Fraction(40 * 25, 100),
    "arithmetic-06": Fraction(5 * 24, 8),
    "arithmetic-07": -4 + 11,
    "arithmetic-08": 2 * (13 + 7),
    "arithmetic-09": 3 * Fraction(84, 3 + 1),
    "arithmetic-10": 1200 - 45 * 20,
    "arithmetic-11": 1250 * 2 + 150,
    "arithmetic-12": Fraction(12 + 15 + 20 + 33, 4),
    "arithmetic-13": Fraction(3, 4) * 6,
    "arithmetic-14": 15 * 6 * 5,
    "arithmetic-15": Fraction(6 * 350, 100),
    "arithmetic-16": (11 * 60 + 15) - (9 * 60 + 40),
    "arithmetic-17": 3 * 12 + (20 - 12),
    "arithmetic-18": 60 - (35 + 28 - 10),
}


def test_every_arithmetic_answer_is_right():
    arithmetic = {id for id, question in SAMPLE.items() if kind(question) == "arithmetic"}
    assert arithmetic == set(ARITHMETIC)
    for id, value in ARITHMETIC.items():
        assert Fraction(SAMPLE[id].expected) == value, id


def choice_of(id: str) -> str:
    question = SAMPLE[id]
    return question.choices["ABCDEFGH".index(question.expected)]


def orders(names: str, *before: tuple[str, str]) -> list[tuple[str, ...]]:
    """Every order (first to last) of the names in which each (a, b) has a before b."""
    return [o for o in permutations(names.split()) if all(o.index(a) < o.index(b) for a, b in before)]


def test_every_multiple_choice_answer_that_can_be_worked_out_is_right():
    # Taller first: the shortest is last.
    assert {o[-1] for o in orders("Anna Ben Carl", ("Anna", "Ben"), ("Ben", "Carl"))} == {choice_of("choice-01")}
    differences = [6 - 2, 12 - 6, 20 - 12, 30 - 20]
    assert choice_of("choice-03") == str(30 + differences[-1] + 2)
    week = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    assert choice_of("choice-04") == week[(week.index("Wednesday") + 10) % 7]
    assert [blue for blue in range(19) if blue + 2 * blue == 18] == [int(choice_of("choice-05"))]
    race = [
        o for o in orders("Hal Fay Dana Eli Gus", ("Fay", "Dana"), ("Dana", "Eli")) if o[0] == "Hal" and o[-1] == "Gus"
    ]
    assert {o[2] for o in race} == {choice_of("choice-06")}
    # 3:00: the hands are 3 of the 12 hour marks apart, 30 degrees each.
    assert choice_of("choice-09") == f"{3 * 360 // 12} degrees"
    oldest_first = orders("Tom Sue Raj Lin", ("Tom", "Sue"), ("Sue", "Raj"), ("Raj", "Lin"))
    claims = {"Tom is older than Lin": ("Tom", "Lin"), "Sue is older than Lin": ("Sue", "Lin")}
    claims |= {"Raj is older than Tom": ("Raj", "Tom"), "Tom is older than Raj": ("Tom", "Raj")}
    false = [text for text, (a, b) in claims.items() if all(o.index(a) > o.index(b) for o in oldest_first)]
    assert false == [choice_of("choice-10")]
    # Knights and knaves: Ava is a knight exactly when what she says is true.
    worlds = [(ava, bo) for ava in (True, False) for bo in (True, False) if ava == (not ava and not bo)]
    names = {(True, True): "Both are knights", (True, False): "Ava is a knight and Bo is a knave"}
    names |= {(False, True): "Ava is a knave and Bo is a knight", (False, False): "Both are knaves"}
    assert [names[world] for world in worlds] == [choice_of("choice-11")]
    squares = {n * n for n in range(10)}
    assert [o for o in SAMPLE["choice-12"].choices if int(o) not in squares] == [choice_of("choice-12")]
    positions = [ord(letter) - ord("A") + 1 for letter in "ACFJO"]
    assert choice_of("choice-13") == chr(ord("A") + positions[-1] + (positions[-1] - positions[-2] + 1) - 1)
    # Checked by reading (syllogisms and a category), not computed: choice-02 (not red, so not a rose),
    # choice-07 (the carrot is the vegetable), choice-08 (the black cats absorb sunlight),
    # choice-14 (bloops ⊆ razzies ⊆ lazzies).


def test_every_yes_no_answer_that_can_be_worked_out_is_right():
    def said(id: str) -> bool:
        return {"Yes": True, "No": False}[SAMPLE[id].expected]

    assert said("yes-no-01") == all(91 % d for d in range(2, 91))
    assert said("yes-no-02") == (Fraction("0.5") > Fraction("0.45"))
    assert said("yes-no-04") == (30 > 4 * 7)
    assert said("yes-no-05") == (2024 % 8 == 0)
    assert said("yes-no-06") == (180 - 90 - 90 > 0)
    assert said("yes-no-08") == all((a + b) % 2 == 0 for a in range(1, 99, 2) for b in range(1, 99, 2))
    assert said("yes-no-09") == (Fraction("12.50") + 8 <= 20)
    assert said("yes-no-10") == (Fraction(1, 3) > Fraction("0.3"))
    assert said("yes-no-12") == (17 * 3 == 57)
    assert said("yes-no-13") == (2**10 > 1000)
    assert said("yes-no-14") == all(n % 3 == 0 for n in range(0, 6000, 6))
    # Checked by reading: yes-no-03 (a square is a rectangle), yes-no-07 (not wet, so not raining),
    # yes-no-11 (every bird there sings; Polly doesn't).
    assert [said(id) for id in ("yes-no-03", "yes-no-07", "yes-no-11")] == [True, False, False]

"""How an answer is scored, rule by rule, on answers written the way Orca 2 writes them: reasoning over
several lines, then an answer. What a rule can't find is "no answer found", never "wrong"."""

import pytest

from orca2_space.grading import (
    MAX_PATTERN_CHARS,
    Graded,
    Grading,
    Rule,
    Verdict,
    grade,
    parse_grading,
)
from orca2_space.questions import Question
from orca2_space.settings import InvalidRequest

RIGHT, WRONG, NONE = Verdict.RIGHT, Verdict.WRONG, Verdict.NO_ANSWER

APPLES = Question("a1", "Sarah has 5 boxes of 200 apples. How many apples?", "1000")
FRUIT = Question("c1", "Which is a fruit?", "B", ("carrot", "apple", "potato", "onion"))
PRIME = Question("y1", "Is 91 a prime number?", "No")


def verdict(rule: Rule, question: Question, answer: str, pattern: str | None = None) -> Graded:
    return grade(Grading(rule, pattern), question, answer)


@pytest.mark.parametrize(
    ("answer", "extracted"),
    [
        ("She has 1,000 apples.", "1000"),
        ("The total comes to $1000.00", "1000"),
        ("5 × 200 = 1000.", "1000"),
        ("Step 1: 5 boxes.\nStep 2: 200 apples each.\nStep 3: 5 × 200 = 1000\n\nSo, Sarah has 1000 apples.", "1000"),
        ("**Final answer: 1,000**", "1000"),
    ],
)
def test_the_number_rule_takes_the_last_number_normalised(answer, extracted):
    assert verdict(Rule.NUMBER, APPLES, answer) == Graded(extracted, RIGHT)


def test_the_number_rule_reads_signs_decimals_and_fractions_exactly():
    assert verdict(Rule.NUMBER, Question("t", "Temperature?", "-7"), "It fell to -7 degrees.").verdict is RIGHT
    assert verdict(Rule.NUMBER, Question("t", "Temperature?", "-7"), "It fell to −7 degrees.").verdict is RIGHT
    assert verdict(Rule.NUMBER, Question("h", "Half?", "0.5"), "That is 1/2 of it.") == Graded("0.5", RIGHT)
    assert verdict(Rule.NUMBER, Question("c", "Cups?", "4.5"), "6 × 3/4 = 4.50 cups") == Graded("4.5", RIGHT)
    assert verdict(Rule.NUMBER, Question("t", "Third?", "0.33"), "It is 1/3.") == Graded("1/3", WRONG)
    # A hyphen between numbers is a range or a minus sign of arithmetic, not a negative number.
    assert verdict(Rule.NUMBER, Question("r", "How many?", "5"), "Between 3-5 people.") == Graded("5", RIGHT)
    assert verdict(Rule.NUMBER, APPLES, "It is 999.") == Graded("999", WRONG)


def test_the_number_rule_takes_the_expected_number_after_gsm8ks_marks():
    gsm8k = Question("g", "Natalia sold clips…", "Natalia sold 48/2 = 24 clips in May.\n#### 72")
    assert verdict(Rule.NUMBER, gsm8k, "48 + 24 = 72 clips altogether.").verdict is RIGHT
    assert verdict(Rule.FINAL, gsm8k, "Final answer: 72").verdict is RIGHT


def test_an_answer_without_a_number_has_no_answer_found():
    assert verdict(Rule.NUMBER, APPLES, "I cannot tell how many apples there are.") == Graded(None, NONE)
    assert verdict(Rule.NUMBER, APPLES, "") == Graded(None, NONE)


@pytest.mark.parametrize(
    ("answer", "extracted", "result"),
    [
        ("First, 5 boxes times 200 apples is 1000 apples.\n\nFinal answer: 1000", "1000", RIGHT),
        ("Let's think. 5 × 200 = 1000.\nThe answer is 1,000 apples.", "1000", RIGHT),
        ("5 × 200 = 1000.\nAnswer: $1000", "1000", RIGHT),
        ("The answer is 900. Wait, let me recheck: 5 × 200 = 1000.\nFinal answer: 1000.", "1000", RIGHT),
        ("### Final Answer:\n1000", "1000", RIGHT),
        ("The final answer is $\\boxed{1000}$.", "1000", RIGHT),
        ("Final answer: 5 × 200 = 900", "900", WRONG),
    ],
)
def test_the_final_answer_rule_takes_what_follows_the_last_final_answer_phrase(answer, extracted, result):
    assert verdict(Rule.FINAL, APPLES, answer) == Graded(extracted, result)


def test_the_final_answer_rule_finds_nothing_without_the_phrase():
    assert verdict(Rule.FINAL, APPLES, "5 boxes of 200 apples make 1000 apples.") == Graded(None, NONE)
    assert verdict(Rule.FINAL, APPLES, "The answer isn't obvious: 1000?") == Graded(None, NONE)
    assert verdict(Rule.FINAL, APPLES, "Final answer: none, I can't count.") == Graded(None, NONE)


def test_the_final_answer_rule_compares_yes_and_no_as_text():
    answer = "91 = 7 × 13, so it has divisors other than 1 and itself.\n\nFinal answer: No, 91 is not prime."
    assert verdict(Rule.FINAL, PRIME, answer) == Graded("No, 91 is not prime", RIGHT)
    assert verdict(Rule.FINAL, PRIME, "The answer is: **yes**").verdict is WRONG
    assert verdict(Rule.FINAL, PRIME, "Final answer: Not sure").verdict is WRONG
    assert verdict(Rule.FINAL, PRIME, 'Final answer: "NO"') == Graded("NO", RIGHT)


@pytest.mark.parametrize(
    ("answer", "extracted", "result"),
    [
        (
            "(A) A carrot is a root vegetable.\n(B) An apple grows on a tree: a fruit.\n\nFinal answer: (B) apple",
            "B",
            RIGHT,
        ),
        ("Carrots, potatoes and onions are vegetables.\nThe correct answer is B) apple.", "B", RIGHT),
        ("Answer: B", "B", RIGHT),
        ("The answer is B because apples grow from flowers.", "B", RIGHT),
        ("**Final Answer:** (b)", "B", RIGHT),
        ("Final answer: apple", "B", RIGHT),
        ("Final answer: A", "A", WRONG),
        ("The answer is: option C.", "C", WRONG),
        ("An apple is a fruit, so the answer is (B).", "B", RIGHT),
        ("Of the four, only the apple is a fruit.\nB", "B", RIGHT),
    ],
)
def test_the_choice_rule_reads_a_letter_or_the_options_text(answer, extracted, result):
    assert verdict(Rule.CHOICE, FRUIT, answer) == Graded(extracted, result)


def test_the_choice_rule_finds_nothing_where_the_answer_does_not_settle():
    walk_through = "(A) carrot: a vegetable.\n(B) apple: a fruit.\n(C) potato: a vegetable.\n(D) onion: a vegetable."
    assert verdict(Rule.CHOICE, FRUIT, walk_through) == Graded(None, NONE)
    assert verdict(Rule.CHOICE, FRUIT, "Both the apple and the carrot are plants.") == Graded(None, NONE)
    assert verdict(Rule.CHOICE, FRUIT, "A fruit grows from a flower.") == Graded(None, NONE)
    assert verdict(Rule.CHOICE, FRUIT, "Final answer: (F)") == Graded(None, NONE)


def test_the_choice_rule_reads_the_option_the_last_line_names_when_no_letter_is_given():
    assert verdict(Rule.CHOICE, FRUIT, "Let me think about plants.\nIt is the apple.") == Graded("B", RIGHT)


def test_an_option_inside_a_longer_option_is_not_named_by_itself():
    counts = Question("n", "How many?", "B", ("2 apples", "12 apples", "20 apples"))
    assert verdict(Rule.CHOICE, counts, "She has 12 apples left.") == Graded("B", RIGHT)


def test_an_expected_answer_given_as_the_options_text_is_its_letter():
    by_text = Question("t", "Which is a fruit?", "apple", ("carrot", "apple"))
    assert verdict(Rule.CHOICE, by_text, "Final answer: (B)").verdict is RIGHT
    assert verdict(Rule.FINAL, by_text, "The answer is apple.").verdict is RIGHT


def test_a_letter_expected_without_options_is_still_a_choice():
    bare = Question("l", "Which option? (A) x (B) y (C) z", "(C)")
    assert verdict(Rule.FINAL, bare, "Final answer: C") == Graded("C", RIGHT)
    assert verdict(Rule.CHOICE, bare, "The answer is (C).") == Graded("C", RIGHT)


def test_exact_and_contains_ignore_case_and_whitespace():
    paris = Question("p", "Capital of France?", "Paris")
    assert verdict(Rule.EXACT, paris, "  paris \n") == Graded("paris", RIGHT)
    assert verdict(Rule.EXACT, paris, "Paris.") == Graded("Paris.", WRONG)
    assert verdict(Rule.EXACT, Question("n", "Name?", "New  York"), "new york").verdict is RIGHT
    assert verdict(Rule.CONTAINS, paris, "The capital of France is PARIS.") == Graded("Paris", RIGHT)
    assert verdict(Rule.CONTAINS, paris, "It is Lyon.") == Graded(None, WRONG)
    assert verdict(Rule.CONTAINS, Question("n", "Multi?", "new york"), "It is New\nYork.").verdict is RIGHT
    assert verdict(Rule.EXACT, paris, "   ") == Graded(None, NONE)
    assert verdict(Rule.CONTAINS, paris, "") == Graded(None, NONE)


def test_contains_needs_whole_words():
    assert verdict(Rule.CONTAINS, PRIME, "I do not know.").verdict is WRONG
    assert verdict(Rule.CONTAINS, PRIME, "No: 91 = 7 × 13.").verdict is RIGHT


def test_a_regex_takes_its_last_match_or_first_group_compared_as_the_question_asks():
    pattern = r"#### (\S+)"
    assert verdict(Rule.REGEX, APPLES, "5 × 200\n#### 900\n#### 1,000", pattern) == Graded("1000", RIGHT)
    assert verdict(Rule.REGEX, FRUIT, "My pick: [[B]]", r"\[\[(\w)\]\]") == Graded("B", RIGHT)
    assert verdict(Rule.REGEX, PRIME, "Verdict: no.", r"(?i)verdict: (\w+)") == Graded("no", RIGHT)
    assert verdict(Rule.REGEX, APPLES, "no marks here", pattern) == Graded(None, NONE)
    assert verdict(Rule.REGEX, APPLES, "1000", r"(x)?1000|(y)") == Graded(None, NONE)


def test_a_catastrophic_regex_ends_with_no_answer_found():
    # (a|aa)+$ on 60 a's and a b backtracks through about 10^12 ways: the timeout ends it.
    assert verdict(Rule.REGEX, APPLES, "a" * 60 + "b", r"(a|aa)+$") == Graded(None, NONE)


def test_rules_run_in_linear_time_on_hostile_answers():
    # Patterns a slow regex engine would backtrack on; each finishes (no timing asserted: it ends).
    hostile = "1," * 50_000 + "x" + " answer" * 20_000 + "(" * 20_000 + "-" * 20_000
    for rule in (Rule.CHOICE, Rule.NUMBER, Rule.FINAL, Rule.EXACT, Rule.CONTAINS):
        assert grade(Grading(rule), FRUIT if rule is Rule.CHOICE else APPLES, hostile).verdict in Verdict


def test_a_grading_is_described_in_one_line():
    for rule in Rule:
        grading = Grading(rule, r"#### (\d+)" if rule is Rule.REGEX else None)
        assert grading.describe() and "\n" not in grading.describe()
    assert "#### (\\d+)" in Grading(Rule.REGEX, r"#### (\d+)").describe()


def test_a_bad_grading_is_refused_with_a_reason():
    with pytest.raises(InvalidRequest, match="needs a pattern"):
        Grading(Rule.REGEX)
    with pytest.raises(InvalidRequest, match="not a regular expression"):
        Grading(Rule.REGEX, "(unclosed")
    with pytest.raises(InvalidRequest, match=f"at most {MAX_PATTERN_CHARS}"):
        Grading(Rule.REGEX, "a" * (MAX_PATTERN_CHARS + 1))
    with pytest.raises(InvalidRequest, match="regex rule only"):
        Grading(Rule.NUMBER, r"\d+")
    with pytest.raises(InvalidRequest, match="Unknown scoring rule 'fuzzy'; rules: choice, number, final-answer"):
        parse_grading("fuzzy")
    assert parse_grading("final-answer") == Grading(Rule.FINAL)
    assert parse_grading("regex", r"(\d+)") == Grading(Rule.REGEX, r"(\d+)")
    assert parse_grading("number", "") == Grading(Rule.NUMBER)

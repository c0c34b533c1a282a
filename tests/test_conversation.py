"""Conversation records: what the browser keeps, what an export holds, and what an import accepts."""

import json
from pathlib import Path

import pytest
from support import exchange

from orca2_space.backends.contract import Alternative, ModelInfo, TokenProbability
from orca2_space.conversation import (
    MAX_KEPT,
    MAX_KEPT_SCORED_TOKENS,
    Conversation,
    Exchange,
    LookedAt,
    ScoredToken,
    Stats,
    Store,
    answer_keys,
    export,
    export_comparison,
    parse_comparison,
    parse_export,
    to_markdown,
)
from orca2_space.presets import CAUTIOUS, SYSTEM_PRESETS
from orca2_space.prompt import Turn
from orca2_space.settings import GenerationParams, InvalidRequest

INFO = ModelInfo("microsoft/Orca-2-7b", "8bit", "auto", "NVIDIA A10G", 4096)
# A conversation as orca2-space 0.3.0 exported it, before exports carried token probabilities.
EXPORTED_BY_0_3_0 = Path(__file__).parent / "fixtures" / "conversation-0.3.0.json"


def test_only_answered_exchanges_go_back_to_the_model():
    conversation = Conversation(
        exchanges=[
            exchange("Q1", "A1"),
            exchange("Q2", "", withheld="[Content Filtered] …"),
            exchange("Q3", "", error="The model failed"),
            exchange("Q4", "A4"),
        ]
    )
    assert conversation.history() == [Turn("Q1", "A1"), Turn("Q4", "A4")]


def test_the_title_is_the_first_question_on_one_line():
    assert Conversation(exchanges=[exchange("  What is\n\n2+2? ")]).title == "What is 2+2?"
    assert Conversation().title == "New chat"
    assert len(Conversation(exchanges=[exchange("x" * 500)]).title) == 60


def test_saving_puts_the_conversation_first_and_open():
    first, second = Conversation(exchanges=[exchange("one")]), Conversation(exchanges=[exchange("two")])
    store = Store().save(first).save(second).save(first)
    assert [c.id for c in store.conversations] == [first.id, second.id]
    assert store.open == first.id and store.current() == first


def test_the_browser_keeps_at_most_max_kept_conversations():
    store = Store()
    for n in range(MAX_KEPT + 5):
        store = store.save(Conversation(exchanges=[exchange(f"question {n}")]))
    assert len(store.conversations) == MAX_KEPT
    assert store.conversations[0].exchanges[0].question == f"question {MAX_KEPT + 4}"


def test_deleting_the_open_conversation_opens_none():
    kept, deleted = Conversation(exchanges=[exchange("a")]), Conversation(exchanges=[exchange("b")])
    store = Store().save(kept).save(deleted).delete(deleted.id)
    assert [c.id for c in store.conversations] == [kept.id] and store.open is None


def test_an_unreadable_store_starts_afresh():
    assert Store.load({"conversations": "garbage"}) == Store()
    assert Store.load(None) == Store()


def test_an_export_holds_model_settings_seeds_and_ids_and_imports_back():
    answered = exchange(
        "2+2?", "4", settings=GenerationParams(do_sample=True, seed=7, temperature=0.3), answer_ids=[13, 29946]
    )
    conversation = Conversation(exchanges=[answered])
    exported = export(conversation, INFO, [[1, 29871, 32001]], LookedAt())
    data = json.loads(exported.model_dump_json())
    assert data["format"] == "orca2-space/conversation" and data["model"] == "microsoft/Orca-2-7b"
    assert data["weights"] == "8bit" and data["app_version"]
    (turn,) = data["exchanges"]
    assert turn["settings"]["seed"] == 7 and turn["settings"]["temperature"] == 0.3
    assert turn["prompt_ids"] == [1, 29871, 32001] and turn["answer_ids"] == [13, 29946]
    assert parse_export(exported.model_dump_json(), LookedAt()) == (conversation, LookedAt())


@pytest.mark.parametrize(
    "text, problem",
    [
        ("not json", "not a conversation exported from this app"),
        ('{"format": "something else"}', "format"),
        ('{"format": "orca2-space/conversation", "version": 1}', "model"),
    ],
)
def test_a_file_that_is_not_an_export_is_refused_clearly(text, problem):
    with pytest.raises(InvalidRequest, match=problem):
        parse_export(text, LookedAt())


def test_markdown_shows_every_question_and_answer_verbatim():
    tricky = "Use ```code``` and <div> & $5"
    conversation = Conversation(exchanges=[exchange(tricky, "````\nfenced\n````")])
    text = to_markdown(export(conversation, INFO, [[1]], LookedAt()))
    assert "`````\n````\nfenced\n````\n`````" in text
    assert f"````\n{tricky}\n````" in text


def test_a_conversation_emptied_by_undo_keeps_its_id():
    conversation = Conversation(exchanges=[exchange("only")])
    store = Store().save(conversation)
    emptied = store.current().model_copy(update={"exchanges": []})
    store = store.save(emptied)
    assert store.conversations == [] and store.current().id == conversation.id


def scored(*probabilities: float) -> list[ScoredToken]:
    """Tokens as the page scored them: each one's probability, with a likelier alternative."""
    return [
        ScoredToken.of(
            TokenProbability(100 + n, f"t{n}", p, (Alternative(7, "x", 1 - p), Alternative(100 + n, f"t{n}", p)))
        )
        for n, p in enumerate(probabilities)
    ]


def test_an_export_from_before_token_probabilities_still_imports():
    conversation, looked = parse_export(EXPORTED_BY_0_3_0.read_bytes(), LookedAt())
    (only,) = conversation.exchanges
    assert conversation.id == "0123456789abcdef" and only.question == "2+2?" and only.answer == "4"
    assert only.settings.seed == 7 and only.answer_ids == [13, 29946] and looked == LookedAt()


def looked_at(exchanges: list[Exchange], index: int, tokens: list[ScoredToken]) -> LookedAt:
    """What the browser keeps once the visitor has looked at one answer's tokens."""
    return LookedAt().add(answer_keys(exchanges)[index], tokens)


def test_the_token_probabilities_looked_at_travel_with_the_export_and_import_back():
    conversation = Conversation(exchanges=[exchange("2+2?", "4", answer_ids=[100, 101]), exchange("3+3?", "6")])
    looked = looked_at(conversation.exchanges, 0, scored(0.9712345678, 0.0123))
    data = json.loads(export(conversation, INFO, [[1], [1]], looked).model_dump_json())
    assert data["exchanges"][0]["tokens"][0] == {
        "id": 100,
        "text": "t0",
        "probability": 0.971235,
        "top": [{"id": 7, "text": "x", "probability": 0.0287654}, {"id": 100, "text": "t0", "probability": 0.971235}],
    }
    assert data["exchanges"][1]["tokens"] is None
    assert parse_export(json.dumps(data), LookedAt()) == (conversation, looked)


def test_an_answer_keeps_its_tokens_only_while_it_is_the_same_answer_to_the_same_prompt():
    first, second = exchange("Q1", "A1"), exchange("Q2", "A2")
    looked = looked_at([first, second], 1, scored(0.5))
    assert looked.tokens([first, second]) == [None, scored(0.5)]
    # Retried: another answer. Asked after another first turn: another prompt. Single turn: another prompt too.
    assert looked.tokens([first, exchange("Q2", "A2 again")]) == [None, None]
    assert looked.tokens([exchange("Q0", "A0"), second]) == [None, None]
    assert looked.tokens([first, second.model_copy(update={"single_turn": True})]) == [None, None]


def test_markdown_mentions_the_token_probabilities_looked_at_briefly():
    conversation = Conversation(exchanges=[exchange("2+2?", "4"), exchange("again?", "5")])
    looked = looked_at(conversation.exchanges, 0, scored(0.97, 0.012, 0.5, 0.2))
    text = to_markdown(export(conversation, INFO, [[1], [1]], looked))
    assert text.count("Token probabilities") == 1
    assert '4 tokens; the least likely: "t1" 1.20%, "t3" 20.00%, "t2" 50.00%.' in text


def test_the_browser_keeps_the_tokens_of_the_newest_answers_looked_at():
    half = MAX_KEPT_SCORED_TOKENS // 2
    looked = LookedAt().add("a", scored(0.5) * half).add("b", scored(0.5) * half).add("c", scored(0.5))
    assert [key for key, _ in looked.answers] == ["c", "b"]
    assert [key for key, _ in looked.add("a", scored(0.5) * half).answers] == ["a", "c"]


def compared(system_message: str, answer: str, **fields) -> Exchange:
    settings = GenerationParams(do_sample=True, seed=42, temperature=0.5)
    return exchange("Is 7 prime?", answer, system_message=system_message, single_turn=True, settings=settings, **fields)


def test_a_comparison_exports_as_one_question_and_a_column_per_system_message():
    stats = Stats(stop_reason="end_of_turn", n_tokens=2, seconds=0.5, tokens_per_second=4.0)
    answers = [
        compared(CAUTIOUS, "Yes.", answer_ids=[13, 3869], stats=stats),
        compared(SYSTEM_PRESETS["Step-by-step"], "7 has no divisors but 1 and 7, so yes."),
        compared("Answer like a pirate.", "Arr, aye."),
    ]
    looked = looked_at(answers, 1, scored(0.6))
    data = json.loads(export_comparison(answers, INFO, [[1, 2], [1, 3], [1, 4]], looked).model_dump_json())
    assert data["format"] == "orca2-space/comparison" and data["version"] == 1 and data["app_version"]
    assert (data["model"], data["weights"], data["backend"]) == ("microsoft/Orca-2-7b", "8bit", "local (NVIDIA A10G)")
    assert data["question"] == "Is 7 prime?" and data["settings"]["seed"] == 42
    columns = data["answers"]
    assert [c["preset"] for c in columns] == ["Cautious (model card default)", "Step-by-step", "typed"]
    assert [c["system_message"] for c in columns] == [a.system_message for a in answers]
    assert [c["prompt_ids"] for c in columns] == [[1, 2], [1, 3], [1, 4]]
    assert columns[0]["answer_ids"] == [13, 3869] and columns[0]["stats"]["n_tokens"] == 2
    assert columns[1]["tokens"][0]["probability"] == 0.6 and columns[2]["tokens"] is None
    assert "question" not in columns[0] and "settings" not in columns[0]
    assert parse_comparison(json.dumps(data), LookedAt()) == (answers, looked)


def test_a_conversation_and_a_comparison_are_each_refused_where_the_other_is_imported():
    nothing = LookedAt()
    comparison = export_comparison([compared("", "a"), compared("b", "b")], INFO, [[1], [1]], nothing)
    conversation = export(Conversation(exchanges=[exchange()]), INFO, [[1]], nothing)
    with pytest.raises(InvalidRequest, match=r"not a conversation exported from this app \(it is a comparison\)"):
        parse_export(comparison.model_dump_json(), nothing)
    with pytest.raises(InvalidRequest, match=r"not a comparison exported from this app \(it is a conversation\)"):
        parse_comparison(conversation.model_dump_json(), nothing)
    with pytest.raises(InvalidRequest, match="not a comparison exported from this app"):
        parse_comparison("[]", nothing)

"""Conversation records: what the browser keeps, what an export holds, and what an import accepts."""

import json
import random
from pathlib import Path

import pytest
from support import FakeBackend, as_messages, exchange

from orca2_space.backends.contract import Alternative, ModelInfo, TokenProbability
from orca2_space.chat import Chat
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
from orca2_space.prompt import CarriedPrompt, ConversationPrompts, PromptTooLong, Turn
from orca2_space.settings import GenerationParams, InvalidRequest, Settings

INFO = ModelInfo("microsoft/Orca-2-7b", "8bit", "auto", "NVIDIA A10G", 4096)
SETTINGS = Settings()
# A conversation as orca2-space 0.3.0 exported it (version 1), before exports carried token probabilities.
EXPORTED_BY_0_3_0 = Path(__file__).parent / "fixtures" / "conversation-0.3.0.json"


def plain(*prompts: list[int]) -> ConversationPrompts:
    """Prompts that carry no earlier turns, for exports whose ids don't matter."""
    return ConversationPrompts([CarriedPrompt(ids, len(ids), None) for ids in prompts], {})


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


def test_the_browser_keeps_at_most_max_kept_conversations_and_names_those_that_made_way():
    store = Store()
    for n in range(MAX_KEPT + 2):
        store, room = store.save(Conversation(exchanges=[exchange(f"question {n}")])).fit()
    assert len(store.conversations) == MAX_KEPT
    assert store.conversations[0].exchanges[0].question == f"question {MAX_KEPT + 1}"
    assert room.dropped == ("question 1",)


def test_deleting_the_open_conversation_opens_none():
    kept, deleted = Conversation(exchanges=[exchange("a")]), Conversation(exchanges=[exchange("b")])
    store = Store().save(kept).save(deleted).delete(deleted.id)
    assert [c.id for c in store.conversations] == [kept.id] and store.open is None


def test_an_unreadable_store_starts_afresh():
    assert Store.load({"conversations": "garbage"}, SETTINGS) == Store()
    assert Store.load(None, SETTINGS) == Store()


def test_an_export_holds_model_settings_seeds_and_ids_and_imports_back():
    answered = exchange(
        "2+2?", "4", settings=GenerationParams(do_sample=True, seed=7, temperature=0.3), answer_ids=[13, 29946]
    )
    conversation = Conversation(exchanges=[answered])
    exported = export(conversation, INFO, plain([1, 29871, 32001]), LookedAt())
    data = json.loads(exported.model_dump_json())
    assert data["format"] == "orca2-space/conversation" and data["model"] == "microsoft/Orca-2-7b"
    assert data["weights"] == "8bit" and data["app_version"]
    (turn,) = data["exchanges"]
    assert turn["settings"]["seed"] == 7 and turn["settings"]["temperature"] == 0.3
    assert turn["prompt_ids"] == [1, 29871, 32001] and turn["answer_ids"] == [13, 29946]
    assert parse_export(exported.model_dump_json(), LookedAt(), SETTINGS.max_exchanges) == (conversation, LookedAt())


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
        parse_export(text, LookedAt(), SETTINGS.max_exchanges)


def test_markdown_shows_every_question_and_answer_verbatim():
    tricky = "Use ```code``` and <div> & $5"
    conversation = Conversation(exchanges=[exchange(tricky, "````\nfenced\n````")])
    text = to_markdown(conversation, INFO, LookedAt())
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
    conversation, looked = parse_export(EXPORTED_BY_0_3_0.read_bytes(), LookedAt(), SETTINGS.max_exchanges)
    (only,) = conversation.exchanges
    assert conversation.id == "0123456789abcdef" and only.question == "2+2?" and only.answer == "4"
    assert only.settings.seed == 7 and only.answer_ids == [13, 29946] and looked == LookedAt()


def looked_at(exchanges: list[Exchange], index: int, tokens: list[ScoredToken]) -> LookedAt:
    """What the browser keeps once the visitor has looked at one answer's tokens."""
    return LookedAt().add(answer_keys(exchanges)[index], tokens)


def test_the_token_probabilities_looked_at_travel_with_the_export_and_import_back():
    conversation = Conversation(exchanges=[exchange("2+2?", "4", answer_ids=[100, 101]), exchange("3+3?", "6")])
    looked = looked_at(conversation.exchanges, 0, scored(0.9712345678, 0.0123))
    data = json.loads(export(conversation, INFO, plain([1], [1]), looked).model_dump_json())
    assert data["exchanges"][0]["tokens"][0] == {
        "id": 100,
        "text": "t0",
        "probability": 0.971235,
        "top": [{"id": 7, "text": "x", "probability": 0.0287654}, {"id": 100, "text": "t0", "probability": 0.971235}],
    }
    assert data["exchanges"][1]["tokens"] is None
    assert parse_export(json.dumps(data), LookedAt(), SETTINGS.max_exchanges) == (conversation, looked)


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
    text = to_markdown(conversation, INFO, looked)
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
    conversation = export(Conversation(exchanges=[exchange()]), INFO, plain([1]), nothing)
    with pytest.raises(InvalidRequest, match=r"not a conversation exported from this app \(it is a comparison\)"):
        parse_export(comparison.model_dump_json(), nothing, SETTINGS.max_exchanges)
    with pytest.raises(InvalidRequest, match=r"not a comparison exported from this app \(it is a conversation\)"):
        parse_comparison(conversation.model_dump_json(), nothing)
    with pytest.raises(InvalidRequest, match="not a comparison exported from this app"):
        parse_comparison("[]", nothing)


# --- Exported prompts ---------------------------------------------------------------------------


def _varied_conversation(seed: int, length: int) -> Conversation:
    """Single- and multi-turn questions of many lengths, some withheld or failed, under changing
    system messages and answer sizes: prompts that carry some earlier turns, all of them, or none."""
    rng = random.Random(seed)
    exchanges = []
    for number in range(length):
        question = f"q{number} " + "word " * rng.choice([1, 5, 40, 120])
        answer = f"a{number} " + "said " * rng.choice([0, 3, 30, 90])
        fate = rng.choice(["answered"] * 6 + ["withheld", "failed"])
        fields = dict(
            system_message=rng.choice(["", "sys", "Think step by step. " * 10]),
            single_turn=rng.random() < 0.3,
            settings=GenerationParams(max_new_tokens=rng.choice([1, 64, 300, 4096])),
            withheld="[Content Filtered] …" if fate == "withheld" else None,
            error="The model failed" if fate == "failed" else None,
        )
        exchanges.append(exchange(question, "" if fate != "answered" else answer, **fields))
    return Conversation(exchanges=exchanges)


def _inspected(chat: Chat, conversation: Conversation, index: int) -> list[int]:
    """What inspect() gives for an exchange, with the earlier turns as its history: the ids the model read."""
    e = conversation.exchanges[index]
    earlier = Conversation(exchanges=conversation.exchanges[:index]).history()
    history = [] if e.single_turn else as_messages([(t.user, t.assistant) for t in earlier])
    try:
        return chat.inspect(e.question, e.system_message, history, e.settings.max_new_tokens).input_ids
    except (InvalidRequest, PromptTooLong):
        return []


@pytest.mark.parametrize("seed", range(4))
def test_every_exported_prompt_is_the_one_the_model_read(tokenizer, seed):
    backend = FakeBackend(tokenizer, ["\n", "ok"])
    backend.info = ModelInfo("fake-orca2", "none", "a test double", "nowhere", 1024)  # turns get dropped
    chat = Chat(backend, Settings(max_message_chars=500, max_new_tokens_cap=512))
    conversation = _varied_conversation(seed, 40)
    exported = export(conversation, INFO, chat.prompts([e.asked for e in conversation.exchanges]), LookedAt())
    read_back = type(exported).model_validate_json(exported.model_dump_json())
    for index in range(len(conversation.exchanges)):
        assert read_back.prompt_ids_of(index) == _inspected(chat, conversation, index), index
    assert any(e.earlier_turns and e.earlier_turns.first > 1 for e in read_back.exchanges)  # some were dropped
    assert any(not e.prompt_ids for e in read_back.exchanges)  # and some refused


def test_an_export_names_the_earlier_turns_instead_of_repeating_them(tokenizer):
    chat = Chat(FakeBackend(tokenizer, ["\n", "ok"]), SETTINGS)
    conversation = Conversation(exchanges=[exchange(f"Question {n}?", f"Answer {n}.") for n in range(1, 4)])
    exported = export(conversation, INFO, chat.prompts([e.asked for e in conversation.exchanges]), LookedAt())
    first, second, third = exported.exchanges
    assert first.earlier_turns is None and second.earlier_turns.first == third.earlier_turns.first == 1
    assert third.turn_ids is None  # no later prompt carried it
    own = [
        len(tokenizer.frame("sys", f"Question {n}?").head + tokenizer.frame("sys", f"Question {n}?").tail)
        for n in (1, 2, 3)
    ]
    assert [len(e.prompt_ids) for e in exported.exchanges] == own
    whole = exported.prompt_ids_of(2)
    assert (
        whole
        == chat.inspect(
            "Question 3?", "sys", as_messages([("Question 1?", "Answer 1."), ("Question 2?", "Answer 2.")]), 512
        ).input_ids
    )


@pytest.mark.parametrize("spare", [0, 1])
def test_an_earlier_turn_that_just_fits_is_carried_and_one_id_more_is_dropped(tokenizer, spare):
    chat = Chat(FakeBackend(tokenizer, ["\n", "ok"]), Settings(max_new_tokens_cap=4096))
    frame = tokenizer.frame("sys", "Q2")
    room_for_the_turn = 4096 - len(frame.head) - len(frame.tail) - len(tokenizer.turn_ids(Turn("Q1", "A1")))
    later = exchange("Q2", "A2", settings=GenerationParams(max_new_tokens=room_for_the_turn + spare))
    conversation = Conversation(exchanges=[exchange("Q1", "A1"), later])
    exported = export(conversation, INFO, chat.prompts([e.asked for e in conversation.exchanges]), LookedAt())
    assert exported.prompt_ids_of(1) == _inspected(chat, conversation, 1)
    assert (exported.exchanges[1].earlier_turns is None) == bool(spare)


def test_a_version_1_export_still_imports():
    conversation = Conversation(exchanges=[exchange("Q1", "A1"), exchange("Q2", "A2")])
    exported = export(conversation, INFO, ConversationPrompts([CarriedPrompt([1, 2], 1, None)] * 2, {}), LookedAt())
    version_1 = json.loads(exported.model_dump_json(exclude={"exchanges": {"__all__": {"earlier_turns", "turn_ids"}}}))
    version_1["version"] = 1
    version_1["exchanges"][1]["prompt_ids"] = [1, 29871, 32001, 1404, 13, 29984, 29896]  # the whole prompt, as v1 had
    assert parse_export(json.dumps(version_1), LookedAt(), SETTINGS.max_exchanges) == (conversation, LookedAt())


# --- Caps ---------------------------------------------------------------------------------------


def test_a_store_larger_than_the_cap_is_refused_before_it_is_read():
    settings = Settings(max_store_chars=10_000)
    store = Store().save(Conversation(exchanges=[exchange("x" * 20_000)]))
    with pytest.raises(InvalidRequest, match=r"at most 10,000 \(--max-store-chars\)"):
        Store.load(store.model_dump(), settings)
    with pytest.raises(InvalidRequest, match="--max-store-chars"):
        Store.load({"conversations": "y" * 20_000}, settings)  # unreadable too, but refused for its size
    small = Store().save(Conversation(exchanges=[exchange("x" * 100)]))
    assert Store.load(small.model_dump(), settings) == small


def test_a_chat_longer_than_the_cap_is_refused_and_one_at_the_cap_takes_no_more():
    settings = Settings(max_exchanges=3)
    at_cap = Conversation(exchanges=[exchange(f"q{n}") for n in range(3)])
    assert Store.load(Store().save(at_cap).model_dump(), settings).current() == at_cap
    with pytest.raises(InvalidRequest, match=r"most this server keeps in one chat \(--max-exchanges\)"):
        at_cap.room_for_another(settings.max_exchanges)
    over = at_cap.model_copy(update={"exchanges": [*at_cap.exchanges, exchange("q3")]})
    with pytest.raises(InvalidRequest, match=r"4 exchanges .* at most 3 in one chat \(--max-exchanges\)"):
        Store.load(Store().save(over).model_dump(), settings)
    exported = export(over, INFO, ConversationPrompts([None] * 4, {}), LookedAt()).model_dump_json()
    with pytest.raises(InvalidRequest, match="at most 3 in one chat"):
        parse_export(exported, LookedAt(), settings.max_exchanges)


def test_a_store_with_more_conversations_than_a_browser_keeps_is_refused():
    crowded = {"conversations": [Conversation(exchanges=[exchange()]).model_dump() for _ in range(MAX_KEPT + 1)]}
    with pytest.raises(InvalidRequest, match=f"at most {MAX_KEPT}"):
        Store.load(crowded, SETTINGS)

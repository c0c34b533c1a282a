"""Conversation records: what the browser keeps, what an export holds, and what an import accepts."""

import json
import random

import pytest
from support import FakeBackend, as_messages, exchange

from orca2_space.backends.contract import ModelInfo
from orca2_space.chat import Chat
from orca2_space.conversation import MAX_KEPT, Conversation, Store, export, parse_export, to_markdown
from orca2_space.prompt import CarriedPrompt, ConversationPrompts, PromptTooLong, Turn
from orca2_space.settings import GenerationParams, InvalidRequest, Settings

INFO = ModelInfo("microsoft/Orca-2-7b", "8bit", "auto", "NVIDIA A10G", 4096)
SETTINGS = Settings()


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
    assert Store.load({"conversations": "garbage"}, SETTINGS) == Store()
    assert Store.load(None, SETTINGS) == Store()


def test_an_export_holds_model_settings_seeds_and_ids_and_imports_back():
    answered = exchange(
        "2+2?", "4", settings=GenerationParams(do_sample=True, seed=7, temperature=0.3), answer_ids=[13, 29946]
    )
    conversation = Conversation(exchanges=[answered])
    exported = export(conversation, INFO, ConversationPrompts([CarriedPrompt([1, 29871, 32001], 3, None)], {}))
    data = json.loads(exported.model_dump_json())
    assert data["format"] == "orca2-space/conversation" and data["model"] == "microsoft/Orca-2-7b"
    assert data["weights"] == "8bit" and data["app_version"]
    (turn,) = data["exchanges"]
    assert turn["settings"]["seed"] == 7 and turn["settings"]["temperature"] == 0.3
    assert turn["prompt_ids"] == [1, 29871, 32001] and turn["answer_ids"] == [13, 29946]
    assert parse_export(exported.model_dump_json(), SETTINGS.max_exchanges) == conversation


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
        parse_export(text, SETTINGS.max_exchanges)


def test_markdown_shows_every_question_and_answer_verbatim():
    tricky = "Use ```code``` and <div> & $5"
    conversation = Conversation(exchanges=[exchange(tricky, "````\nfenced\n````")])
    text = to_markdown(conversation, INFO)
    assert "`````\n````\nfenced\n````\n`````" in text
    assert f"````\n{tricky}\n````" in text


def test_a_conversation_emptied_by_undo_keeps_its_id():
    conversation = Conversation(exchanges=[exchange("only")])
    store = Store().save(conversation)
    emptied = store.current().model_copy(update={"exchanges": []})
    store = store.save(emptied)
    assert store.conversations == [] and store.current().id == conversation.id


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
    exported = export(conversation, INFO, chat.prompts([e.asked for e in conversation.exchanges]))
    read_back = type(exported).model_validate_json(exported.model_dump_json())
    for index in range(len(conversation.exchanges)):
        assert read_back.prompt_ids_of(index) == _inspected(chat, conversation, index), index
    assert any(e.earlier_turns and e.earlier_turns.first > 1 for e in read_back.exchanges)  # some were dropped
    assert any(not e.prompt_ids for e in read_back.exchanges)  # and some refused


def test_an_export_names_the_earlier_turns_instead_of_repeating_them(tokenizer):
    chat = Chat(FakeBackend(tokenizer, ["\n", "ok"]), SETTINGS)
    conversation = Conversation(exchanges=[exchange(f"Question {n}?", f"Answer {n}.") for n in range(1, 4)])
    exported = export(conversation, INFO, chat.prompts([e.asked for e in conversation.exchanges]))
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
    exported = export(conversation, INFO, chat.prompts([e.asked for e in conversation.exchanges]))
    assert exported.prompt_ids_of(1) == _inspected(chat, conversation, 1)
    assert (exported.exchanges[1].earlier_turns is None) == bool(spare)


def test_a_version_1_export_still_imports():
    conversation = Conversation(exchanges=[exchange("Q1", "A1"), exchange("Q2", "A2")])
    exported = export(conversation, INFO, ConversationPrompts([CarriedPrompt([1, 2], 1, None)] * 2, {}))
    version_1 = json.loads(exported.model_dump_json(exclude={"exchanges": {"__all__": {"earlier_turns", "turn_ids"}}}))
    version_1["version"] = 1
    version_1["exchanges"][1]["prompt_ids"] = [1, 29871, 32001, 1404, 13, 29984, 29896]  # the whole prompt, as v1 had
    assert parse_export(json.dumps(version_1), SETTINGS.max_exchanges) == conversation


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
    exported = export(over, INFO, ConversationPrompts([None] * 4, {})).model_dump_json()
    with pytest.raises(InvalidRequest, match="at most 3 in one chat"):
        parse_export(exported, settings.max_exchanges)


def test_a_store_with_more_conversations_than_a_browser_keeps_is_refused():
    crowded = {"conversations": [Conversation(exchanges=[exchange()]).model_dump() for _ in range(MAX_KEPT + 1)]}
    with pytest.raises(InvalidRequest, match=f"at most {MAX_KEPT}"):
        Store.load(crowded, SETTINGS)

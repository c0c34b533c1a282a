"""Conversation records: what the browser keeps, what an export holds, and what an import accepts."""

import json

import pytest
from support import exchange

from orca2_space.backends.contract import ModelInfo
from orca2_space.conversation import MAX_KEPT, Conversation, Store, export, parse_export, to_markdown
from orca2_space.prompt import Turn
from orca2_space.settings import GenerationParams, InvalidRequest

INFO = ModelInfo("microsoft/Orca-2-7b", "8bit", "auto", "NVIDIA A10G", 4096)


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
    exported = export(conversation, INFO, [[1, 29871, 32001]])
    data = json.loads(exported.model_dump_json())
    assert data["format"] == "orca2-space/conversation" and data["model"] == "microsoft/Orca-2-7b"
    assert data["weights"] == "8bit" and data["app_version"]
    (turn,) = data["exchanges"]
    assert turn["settings"]["seed"] == 7 and turn["settings"]["temperature"] == 0.3
    assert turn["prompt_ids"] == [1, 29871, 32001] and turn["answer_ids"] == [13, 29946]
    assert parse_export(exported.model_dump_json()) == conversation


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
        parse_export(text)


def test_markdown_shows_every_question_and_answer_verbatim():
    tricky = "Use ```code``` and <div> & $5"
    conversation = Conversation(exchanges=[exchange(tricky, "````\nfenced\n````")])
    text = to_markdown(export(conversation, INFO, [[1]]))
    assert "`````\n````\nfenced\n````\n`````" in text
    assert f"````\n{tricky}\n````" in text


def test_a_conversation_emptied_by_undo_keeps_its_id():
    conversation = Conversation(exchanges=[exchange("only")])
    store = Store().save(conversation)
    emptied = store.current().model_copy(update={"exchanges": []})
    store = store.save(emptied)
    assert store.conversations == [] and store.current().id == conversation.id

"""Nothing a visitor keeps is lost without a word, and the page's own events are admitted: what the
browser keeps stays within its storage (the oldest chats making way, named), an import never replaces
another chat nor stays on the server's disk, and every page event that does work is queued and takes a
place in the visitor's fair share. tests/test_storage_browser.py checks the same in Chromium."""

import json

import gradio as gr
import pytest
from support import exchange, page_request, uploaded

from orca2_space import ui
from orca2_space.chat import Chat
from orca2_space.conversation import (
    COMPARISON_ROOM,
    FULL_CHAT,
    LOCAL_STORAGE_CHARS,
    LOOKED_AT_ROOM,
    STORE_ROOM,
    Conversation,
    LookedAt,
    ScoredAlternative,
    ScoredToken,
    Store,
    json_room,
    json_size,
    stored_chars,
)
from orca2_space.settings import InvalidRequest, Settings
from orca2_space.ui.adapters import PAGE_CONCURRENCY_ID, read_upload
from orca2_space.ui.chat_tab import ChatEvents, layout

# A chat that takes about a quarter of the browser's room for chats.
QUARTER = json_room(STORE_ROOM) // 4


def chat(question: str, size: int = QUARTER) -> Conversation:
    return Conversation(exchanges=[exchange(question, "x" * size)])


def saved(*conversations: Conversation) -> Store:
    store = Store()
    for conversation in conversations:
        store = store.save(conversation)
    return store


# --- The browser's room ------------------------------------------------------------------------


def test_what_the_page_keeps_fits_one_sites_local_storage_with_room_to_spare():
    kept = STORE_ROOM + 2 * LOOKED_AT_ROOM + COMPARISON_ROOM
    assert kept <= 0.95 * LOCAL_STORAGE_CHARS


def test_stored_size_is_the_encrypted_json_in_base64():
    # 24 characters of IV and a colon, then base64 of 32 bytes: "Salted__", the salt, a block of padding.
    assert stored_chars(0) == 24 + 1 + 44
    assert stored_chars(15) == stored_chars(0) < stored_chars(16)
    assert 4 / 3 < stored_chars(3_000_000) / 3_000_000 < 1.34
    assert stored_chars(json_room(STORE_ROOM)) <= STORE_ROOM


def test_within_the_room_nothing_is_dropped():
    store = saved(chat("a"), chat("b"), chat("c"))
    fitted, room = store.fit()
    assert fitted == store and room.dropped == () and 0.7 < room.share <= 1 and not room.overflowing


def test_past_the_room_the_oldest_chats_make_way_and_are_named():
    store = saved(chat("a"), chat("b"), chat("c"), chat("d"), chat("e"))
    fitted, room = store.fit()
    assert [c.title for c in fitted.conversations] == ["e", "d", "c"]
    assert room.dropped == ("a", "b") and room.used <= STORE_ROOM
    assert stored_chars(json_size(fitted.model_dump())) == room.used


def test_the_open_chat_never_makes_way_even_when_it_is_the_oldest():
    oldest = chat("a")
    store = saved(oldest, chat("b"), chat("c"), chat("d")).model_copy(update={"open": oldest.id})
    fitted, room = store.fit()
    assert [c.title for c in fitted.conversations] == ["d", "c", "a"] and room.dropped == ("b",)


def test_an_open_chat_larger_than_the_room_drops_nothing_and_says_it_cant_be_kept():
    store = saved(chat("small", 10), chat("huge", json_room(STORE_ROOM)))
    fitted, room = store.fit()
    assert fitted == store and room.overflowing and room.dropped == ()


def test_a_chat_that_fills_the_room_takes_no_new_question():
    nearly = chat("long", int(FULL_CHAT * json_room(STORE_ROOM)))
    with pytest.raises(InvalidRequest, match="fills the room your browser has for chats"):
        nearly.room_for_another(500)
    chat("short").room_for_another(500)


def scored_tokens(n: int) -> list[ScoredToken]:
    alternatives = [ScoredAlternative(id=29871 + k, text=f" word{k}", probability=0.0123456) for k in range(5)]
    return [ScoredToken(id=1000 + i, text=" token", probability=0.123456, top=alternatives) for i in range(n)]


def test_token_views_looked_at_stay_within_their_room_newest_first():
    looked = LookedAt()
    for key in "abcdefgh":
        looked = looked.add(key, scored_tokens(500))
    assert stored_chars(json_size(looked.model_dump())) <= LOOKED_AT_ROOM
    assert [key for key, _ in looked.answers] == ["h", "g", "f", "e"][: len(looked.answers)]
    assert looked.kept("h") and not looked.kept("a")


def test_an_answers_tokens_too_many_to_keep_are_not_kept_and_the_others_stay():
    looked = LookedAt().add("small", scored_tokens(10))
    too_many = looked.add("large", scored_tokens(4000))
    assert not too_many.kept("large") and too_many.kept("small")


# --- Import ------------------------------------------------------------------------------------


def test_an_import_whose_id_is_taken_by_another_chat_keeps_both():
    mine = chat("mine", 10)
    theirs = Conversation(id=mine.id, exchanges=[exchange("theirs", "y")])
    store = saved(mine).save_imported(theirs)
    assert [c.title for c in store.conversations] == ["theirs", "mine"]
    assert store.current().title == "theirs" and store.open != mine.id


def test_importing_a_chat_already_kept_keeps_one_copy():
    mine = chat("mine", 10)
    store = saved(mine).save_imported(mine.model_copy(deep=True))
    assert store.conversations == [mine] and store.open == mine.id


def test_an_import_too_large_for_the_browser_is_refused_saying_why():
    with pytest.raises(InvalidRequest, match="can't be kept here"):
        Store().save_imported(chat("huge", json_room(STORE_ROOM)))


def test_an_uploaded_file_is_read_once_and_deleted_with_its_folder():
    path = uploaded("chat.json", b'{"format": "x"}')
    assert read_upload({"path": str(path)}) == b'{"format": "x"}'
    assert not path.exists() and not path.parent.exists()


def test_only_a_file_in_the_upload_folder_is_read(tmp_path):
    elsewhere = tmp_path / "secret.json"
    elsewhere.write_text("{}")
    with pytest.raises(InvalidRequest, match="upload from this page"):
        read_upload({"path": str(elsewhere)})
    assert elsewhere.exists()


# --- The page's events -------------------------------------------------------------------------


@pytest.fixture
def events(fake_backend):
    chat = Chat(fake_backend, Settings(visitor_limit=2))
    with gr.Blocks():
        tab = layout(chat)
    return ChatEvents(chat, tab)


def by_elem_id(update: dict) -> dict:
    return {component.elem_id: value for component, value in update.items()}


def test_an_import_says_which_chats_made_way_and_how_to_keep_them(events):
    store = saved(chat("a"), chat("b"), chat("c"))
    imported = chat("imported", QUARTER)
    exported = {
        "format": "orca2-space/conversation",
        "model": "m",
        "weights": "w",
        "backend": "b",
        "conversation_id": imported.id,
        "created": imported.created,
        "exchanges": [{**e.model_dump(), "prompt_ids": []} for e in imported.exchanges],
    }
    path = uploaded("import.json", json.dumps(exported).encode())
    shown = by_elem_id(
        events.import_(
            page_request("s"), file={"path": str(path)}, stored=store.model_dump(), looked=None, show_raw=False
        )
    )
    assert "“a”" in shown["storage-notice"] and "Export (⤓ JSON)" in shown["storage-notice"]
    assert [c["exchanges"][0]["question"] for c in shown[None]["conversations"]] == ["imported", "c", "b"]
    assert not path.exists()


def test_a_nearly_full_browser_is_told_before_anything_makes_way(events):
    store = saved(chat("a"), chat("b"), chat("c"), chat("d", QUARTER // 2))
    shown = by_elem_id(events.show(page_request("s"), stored=store.model_dump(), show_raw=False))
    assert "full" in shown["storage-notice"] and "make way" in shown["storage-notice"]
    assert (
        by_elem_id(events.show(page_request("s"), stored=saved(chat("a", 10)).model_dump(), show_raw=False))[
            "storage-notice"
        ]
        == ""
    )


def test_every_page_event_takes_a_place_in_the_visitors_fair_share(events):
    """A visitor with every place taken is told why by each of them; another visitor is not held up."""
    stored = saved(chat("a", 10)).model_dump()
    calls = {
        "show": lambda r: events.show(r, stored=stored, show_raw=False),
        "open": lambda r: events.open(r, conversation_id=None, stored=stored, show_raw=False),
        "new": lambda r: events.new(r, stored=stored),
        "delete": lambda r: events.delete(r, stored=stored),
        "undo": lambda r: events.undo(r, stored=stored, show_raw=False),
        "export_json": lambda r: events.export_json(r, stored=stored, looked=None),
        "export_markdown": lambda r: events.export_markdown(r, stored=stored, looked=None),
    }
    busy, other = page_request("busy"), page_request("other", address="10.0.0.2")
    with events.chat.fair_share.admit(ui.adapters.visitor_of(busy), 2):
        for name, call in calls.items():
            with pytest.raises(gr.Error, match="You already have 2 requests running or waiting"):
                call(busy)
            assert call(other) is not None, name
    path = uploaded("refused.json", b"{}")
    with events.chat.fair_share.admit(ui.adapters.visitor_of(busy), 2), pytest.raises(gr.Error, match="already"):
        events.import_(busy, file={"path": str(path)}, stored=stored, looked=None, show_raw=False)
    assert not path.exists()  # read (and deleted) before the refusal


# Events that do no work: a script in the browser (no function), Stop, a preset's text, which compared
# or evaluated columns show, whether the regular expression's field shows, Gradio's examples filling
# the message box, and the model's status line.
INSTANT = {None, "stop", "chosen", "shown_columns", "shown_pattern", "load_example", "refresh_model_status"}


def test_every_page_event_that_does_work_is_queued_in_a_group_of_its_own_or_the_answers(fake_backend):
    demo = ui.build(Chat(fake_backend, Settings()))
    for function in demo.fns.values():
        if function.name in INSTANT:
            continue
        assert function.queue, function.name
        assert function.concurrency_id in (PAGE_CONCURRENCY_ID, "generation") or function.api_visibility == "public"
    page = {f.name for f in demo.fns.values() if f.concurrency_id == PAGE_CONCURRENCY_ID}
    assert {"show", "open", "new", "delete", "undo", "import_", "export_json", "export_markdown"} <= page
    assert {"show_kept", "import_json"} <= page
    evaluate = {
        "load_sample",
        "load_file",
        "load_hub",
        "filtered",
        "open_cell",
        "override",
        "choose_kept",
        "export_csv",
    }
    assert evaluate <= page

"""One chat turn: request validation, history handling, streaming updates, Stop by owner."""

import functools
import threading

import pytest
from support import SAFETY_KEY, VIOLENT_ANSWER, FakeBackend, as_messages, finish_loading, slow_loading_model

from orca2_space.backends.contract import ModelLoading
from orca2_space.backends.local.engine import Engine
from orca2_space.chat import Chat, turns_from_messages
from orca2_space.prompt import Turn
from orca2_space.settings import InvalidRequest, Settings


@pytest.fixture
def chat(fake_backend):
    return Chat(fake_backend, Settings(max_new_tokens_cap=256, max_message_chars=5000))


def test_history_messages_become_turns():
    assert turns_from_messages(as_messages([("Q1", "A1"), ("Q2", "A2")])) == ([Turn("Q1", "A1"), Turn("Q2", "A2")], [])


def test_gradio_chatbot_content_parts_are_read_as_text():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}], "metadata": None},
    ]
    assert turns_from_messages(history)[0] == [Turn("Q", "A")]


def test_page_notices_are_never_sent_back_to_the_model():
    history = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "The model failed", "metadata": {"title": "Error"}},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    turns, notices = turns_from_messages(history)
    assert turns == [Turn("Q2", "A2")]
    assert "1 history message" in notices[0]


@pytest.mark.parametrize(
    "history, message",
    [
        ("not a list", "history must be a list"),
        ([["user", "hi"]], "history\\[0\\] must be a"),
        ([{"role": "system", "content": "x"}], "role must be"),
        ([{"role": "user", "content": 5}], "content must be text"),
    ],
)
def test_malformed_history_is_refused_clearly(history, message):
    with pytest.raises(InvalidRequest, match=message):
        turns_from_messages(history)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(message=5), "message must be text"),
        (dict(message="   "), "empty"),
        (dict(message="x" * 5001), "at most 5,000"),
        (dict(system_message=None), "system_message must be text"),
        (dict(system_message="x" * 5001), "system_message is 5,001 characters"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(chat, fields, message):
    values = {"message": "hi", "system_message": "", "history": [], **fields}
    with pytest.raises(InvalidRequest, match=message):
        chat.request(values.pop("message"), values.pop("system_message"), values.pop("history"))


def test_a_turn_streams_updates_and_ends_with_stats(chat):
    updates = list(chat.respond(chat.request("Hello?", "sys", [])))
    assert [u.answer for u in updates] == ["", "The", "The answer", "The answer"]
    final = updates[-1]
    assert final.done and final.error is None
    assert final.stats.stop_reason == "end_of_turn"


def test_clamped_settings_are_reported_with_the_answer(chat):
    final = list(chat.respond(chat.request("Hello?", "sys", [], max_new_tokens=10**9)))[-1]
    assert any("max_new_tokens" in n for n in final.notices)


def test_dropped_turns_are_reported(chat, fake_backend):
    long_history = as_messages([("word " * 1500, "ok")] * 4)  # about 1,500 tokens each
    final = list(chat.respond(chat.request("Hello?", "sys", long_history, max_new_tokens=256)))[-1]
    assert any("2 oldest turn(s) were left out" in n for n in final.notices)
    assert final.answer == "The answer"
    assert fake_backend.prompts[-1].dropped_turns == 2


def test_a_history_over_the_caps_is_refused_with_the_cap(fake_backend):
    chat = Chat(fake_backend, Settings(max_exchanges=3, max_store_chars=1000))
    chat.request("Hello?", "sys", as_messages([("Q", "A")] * 3))  # at the caps
    with pytest.raises(InvalidRequest, match="8 messages; this server takes at most 6 .3 questions and their answers"):
        chat.request("Hello?", "sys", as_messages([("Q", "A")] * 4))
    with pytest.raises(InvalidRequest, match="history is 1,001 characters; this server takes at most 1,000"):
        chat.inspect("Hello?", "sys", as_messages([("Q" * 500, "A" * 501)]))


def test_a_message_too_long_for_the_context_is_an_error_update(fake_backend):
    chat = Chat(fake_backend, Settings())
    final = list(chat.respond(chat.request("word " * 4500, "sys", [])))[-1]
    assert final.done and "Shorten the message" in final.error


def test_inspect_shows_the_exact_prompt(chat, tokenizer):
    prompt = chat.inspect("Q2", "sys", as_messages([("Q1", "A1")]))
    assert prompt.input_ids == tokenizer.build("sys", [Turn("Q1", "A1")], "Q2").input_ids


def test_while_the_model_loads_a_message_waits_for_it_and_is_then_answered(tmp_path, monkeypatch):
    model, tokenizer_bytes = slow_loading_model(tmp_path / "slow")
    monkeypatch.setattr(Chat, "LOADING_UPDATE_SECONDS", 0.05)
    chat = Chat(ModelLoading(str(model), functools.partial(Engine.load, str(model))), Settings(max_new_tokens_cap=8))
    with pytest.raises(InvalidRequest, match="Orca 2 is not ready. Loading .*reading the tokenizer"):
        chat.inspect("Hi", "sys", [])
    updates = chat.respond(chat.request("Hi", "sys", []))
    waiting = [next(updates) for _ in range(3)]
    assert all("waiting for the model" in u.waiting and not u.done for u in waiting)
    finish_loading(model, tokenizer_bytes)
    rest = list(updates)
    assert rest[-1].done and rest[-1].error is None and rest[-1].stats.n_tokens == 8
    assert chat.inspect("Hi", "sys", []).n_tokens > 0


def test_a_model_that_failed_to_load_answers_every_message_with_the_reason(tmp_path):
    chat = Chat(ModelLoading("missing", functools.partial(Engine.load, str(tmp_path / "missing"))), Settings())
    (update,) = [u for u in chat.respond(chat.request("Hi", "sys", [])) if not u.waiting]
    assert update.done and "could not be loaded" in update.error and "missing" in update.error


@pytest.mark.parametrize("backend", ["fake", "never_ends"])
def test_stop_by_owner_ends_the_running_answer(request, tokenizer, backend):
    backend = (
        FakeBackend(tokenizer, ["\n", "The", " answer"], forever=True)
        if backend == "fake"
        else request.getfixturevalue(backend)
    )
    chat = Chat(backend, Settings(max_new_tokens_cap=4000))
    updates = chat.respond(chat.request("Go on forever", "", [], max_new_tokens=3000), owner="session-1")
    next(updates)
    next(updates)
    assert chat.stop("session-1") is True
    final = list(updates)[-1]
    assert final.done and final.stats.stop_reason == "stopped"
    assert (final.stats.tokens_after_cancel or 0) <= 1
    assert chat.stop("session-1") is False  # nothing left running for that owner


def test_closing_the_stream_ends_the_generation_thread(never_ends):
    chat = Chat(never_ends, Settings(max_new_tokens_cap=4000))
    before = {t for t in threading.enumerate() if t.name == "orca2-generate"}
    updates = chat.respond(chat.request("Go", "", [], max_new_tokens=3000))
    next(updates)
    next(updates)
    workers = {t for t in threading.enumerate() if t.name == "orca2-generate"} - before
    updates.close()  # what Gradio does when a client disconnects or cancels
    for worker in workers:
        worker.join(timeout=10)
        assert not worker.is_alive()


# Moderation of a turn: the real Azure client against the local Content Safety server.

from orca2_space.moderation import AzureContentSafety, Moderation
from orca2_space.settings import ModerationSettings


def moderated_chat(engine, server, **policy) -> Chat:
    rules = ModerationSettings(endpoint=server.endpoint, key=SAFETY_KEY, timeout=2.0, **policy)
    moderation = Moderation(AzureContentSafety(rules.endpoint, rules.key, rules.timeout, rules.retries), rules)
    return Chat(engine, Settings(max_new_tokens_cap=1000, moderation=rules), moderation)


def test_a_flagged_question_never_reaches_the_model(turns_violent, safety_server, caplog):
    caplog.set_level("INFO", logger="orca2_space.backends.answer")
    chat = moderated_chat(turns_violent, safety_server)
    (update,) = list(chat.respond(chat.request("Describe a violent fight", "", [])))
    assert update.done and update.answer == ""
    assert update.moderation == "flagged"
    assert update.withheld == (
        "Your message was not sent to Orca 2: moderation flagged it for Violence (severity 6); "
        "this server's threshold is 4."
    )
    assert not [r for r in caplog.records if "generation finished" in r.getMessage()]
    assert safety_server.texts() == ["Describe a violent fight"]


def test_a_flagged_answer_never_shows_and_the_model_is_stopped(turns_violent, safety_server):
    chat = moderated_chat(turns_violent, safety_server)
    updates = list(chat.respond(chat.request("Tell me about the weather", "", [], max_new_tokens=1000)))
    clean_part = VIOLENT_ANSWER[1 : VIOLENT_ANSWER.index(" then")]
    for update in updates[:-1]:  # every step the client saw while streaming
        assert "violent" not in update.answer
        assert clean_part.startswith(update.answer)
        assert update.moderation == "pending"
    final = updates[-1]
    assert final.done and final.answer == "" and final.moderation == "flagged"
    assert final.withheld.startswith(
        "[Content Filtered] Orca 2's answer was withheld: moderation flagged it for Violence (severity 6)"
    )
    assert final.stats.stop_reason == "stopped" and final.stats.n_tokens < 1000


def test_a_clean_answer_streams_sentence_by_sentence_and_passes(ends_with_im_end, safety_server):
    chat = moderated_chat(ends_with_im_end, safety_server)
    final = list(chat.respond(chat.request("Hi", "", [])))[-1]
    assert final.answer == "The answer" and final.moderation == "passed"
    assert safety_server.texts() == ["Hi", "The answer"]  # the question, then the whole answer


def test_moderation_off_by_request_shows_everything(turns_violent, safety_server):
    chat = moderated_chat(turns_violent, safety_server)
    final = list(chat.respond(chat.request("Go", "", [], moderation=False, max_new_tokens=30)))[-1]
    assert "violent" in final.answer and final.moderation == "off"
    assert safety_server.requests == []


def test_a_server_that_requires_moderation_overrides_the_request(turns_violent, safety_server):
    chat = moderated_chat(turns_violent, safety_server, required=True)
    final = list(chat.respond(chat.request("Go", "", [], moderation=False, max_new_tokens=200)))[-1]
    assert final.moderation == "flagged" and final.answer == ""
    assert "Moderation is required on this server." in final.notices


def test_without_a_service_a_moderation_request_is_answered_unmoderated_with_a_notice(fake_backend):
    chat = Chat(fake_backend, Settings())
    final = list(chat.respond(chat.request("Hi", "", [], moderation=True)))[-1]
    assert final.answer == "The answer" and final.moderation == "off"
    assert any("not configured" in n for n in final.notices)


def test_a_failing_service_holds_the_answer_back_by_default(ends_with_im_end, safety_server):
    safety_server.behaviour.status = 500
    chat = moderated_chat(ends_with_im_end, safety_server)
    final = list(chat.respond(chat.request("Hi", "", [])))[-1]
    assert final.answer == "" and final.moderation == "unavailable"
    assert "the moderation service failed (HTTP 500)" in final.withheld


def test_fail_open_shows_the_answer_marked_not_moderated(ends_with_im_end, safety_server):
    safety_server.behaviour.status = 500
    chat = moderated_chat(ends_with_im_end, safety_server, fail_open=True)
    final = list(chat.respond(chat.request("Hi", "", [])))[-1]
    assert final.answer == "The answer" and final.moderation == "unavailable"
    assert "Not moderated: the moderation service failed (HTTP 500)." in final.notices


def test_a_withheld_answer_is_not_sent_back_to_the_model(ends_with_im_end, safety_server):
    chat = moderated_chat(ends_with_im_end, safety_server)
    history = [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "[Content Filtered] ...", "metadata": {"title": "🛡 Moderation"}},
    ]
    prompt = chat.inspect("next", "", history)
    assert "earlier question" not in prompt.text and "Content Filtered" not in prompt.text


def test_a_bad_moderation_value_is_refused(fake_backend):
    with pytest.raises(InvalidRequest, match="moderation must be true or false"):
        Chat(fake_backend, Settings()).request("Hi", "", [], moderation="yes")

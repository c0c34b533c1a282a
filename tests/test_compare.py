"""Comparing system messages: one question answered under 2 to 4 system messages at once, each answer
exactly what /chat gives for that system message alone."""

import itertools
import json
import threading

import pytest
from support import SAFETY_KEY, batched, content_safety, free_port

from orca2_space.chat import Chat
from orca2_space.conversation import LookedAt
from orca2_space.moderation import AzureContentSafety, Moderation
from orca2_space.presets import CAUTIOUS, SYSTEM_PRESETS
from orca2_space.settings import InvalidRequest, ModerationSettings, Settings
from orca2_space.ui.adapters import comparison_download, exchange_of

STEP_BY_STEP = SYSTEM_PRESETS["Step-by-step"]
SYSTEMS = [CAUTIOUS, "", STEP_BY_STEP]
QUESTION = "Order these events in time: the cake was eaten, the cake was baked, the guests arrived."


def final(updates) -> tuple:
    *_, last = updates
    assert all(update.done for update in last)
    return last


@pytest.fixture(scope="module")
def batched_chat(tiny_engine):
    engine = batched(tiny_engine)
    yield Chat(engine, Settings(max_new_tokens_cap=256))
    engine.close()


def test_greedy_answers_are_decoded_together_and_each_equals_its_answer_alone(batched_chat):
    compared = final(batched_chat.compare(batched_chat.compare_requests(QUESTION, SYSTEMS, max_new_tokens=24)))
    for system, update in zip(SYSTEMS, compared, strict=True):
        *_, alone = batched_chat.respond(batched_chat.request(QUESTION, system, [], max_new_tokens=24))
        assert update.answer_ids == alone.answer_ids and update.answer == alone.answer
        assert update.stats.batched and update.stats.n_tokens == 24
    assert len({update.answer for update in compared}) > 1  # the system message changes the (random) model's answer


def test_every_update_holds_each_answer_in_the_order_asked(batched_chat):
    updates = list(batched_chat.compare(batched_chat.compare_requests(QUESTION, SYSTEMS[:2], max_new_tokens=12)))
    assert all(len(update) == 2 for update in updates)
    for earlier, later in itertools.pairwise(updates):
        for before, after in zip(earlier, later):
            assert after.answer.startswith(before.answer)


def test_a_sampled_comparison_gives_every_system_message_the_same_seed(tiny_engine):
    chat = Chat(tiny_engine, Settings(max_new_tokens_cap=256))
    requests = chat.compare_requests(QUESTION, SYSTEMS[:2], do_sample=True, seed=-1, max_new_tokens=16)
    compared = final(chat.compare(requests))
    seeds = {update.stats.seed for update in compared}
    assert len(seeds) == 1 and None not in seeds
    (seed,) = seeds
    for system, update in zip(SYSTEMS, compared):
        alone = list(chat.respond(chat.request(QUESTION, system, [], do_sample=True, seed=seed, max_new_tokens=16)))
        assert update.answer_ids == alone[-1].answer_ids


@pytest.mark.parametrize(
    "system_messages, message",
    [
        (["only one"], "system_messages must be a list of 2 to 4 texts; got 1 of them"),
        (["a", "b", "c", "d", "e"], "got 5 of them"),
        ("a text", "got a str"),
        (["fine", 7], "system_messages\\[1\\] must be text, got int"),
    ],
)
def test_a_bad_list_of_system_messages_is_refused_clearly(fake_backend, system_messages, message):
    chat = Chat(fake_backend, Settings())
    with pytest.raises(InvalidRequest, match=message):
        chat.compare_requests("Hi", system_messages)


def test_compared_questions_are_answered_on_their_own(fake_backend):
    chat = Chat(fake_backend, Settings())
    final(chat.compare(chat.compare_requests("Hi", ["A", "B"])))
    assert [p.text.count("<|im_start|>user") for p in fake_backend.prompts] == [1, 1]


@pytest.fixture(scope="module")
def endless_chat(never_ends):
    """A chat over the batched model that writes until it is stopped."""
    engine = batched(never_ends)
    yield Chat(engine, Settings(max_new_tokens_cap=4000))
    engine.close()


def test_one_stop_stops_every_answer(endless_chat):
    updates = endless_chat.compare(
        endless_chat.compare_requests("Go on", SYSTEMS, max_new_tokens=3000), owner="session-1"
    )
    next(updates)
    assert endless_chat.stop("session-1") is True
    compared = final(updates)
    assert [update.stats.stop_reason for update in compared] == ["stopped"] * 3
    assert all((update.stats.tokens_after_cancel or 0) <= 1 for update in compared)


def test_leaving_ends_the_models_work_on_every_answer(endless_chat):
    before = set(threading.enumerate())
    updates = endless_chat.compare(endless_chat.compare_requests("Go", SYSTEMS, max_new_tokens=3000))
    next(updates)
    next(updates)
    updates.close()  # what Gradio does when a client disconnects or cancels
    for thread in set(threading.enumerate()) - before:
        if thread.name == "orca2-compare":
            thread.join(timeout=30)
            assert not thread.is_alive()


def test_moderation_checks_each_question_and_answer(turns_violent):
    with content_safety() as server:
        rules = ModerationSettings(endpoint=server.endpoint, key=SAFETY_KEY, timeout=2.0)
        moderation = Moderation(AzureContentSafety(rules.endpoint, rules.key, rules.timeout, rules.retries), rules)
        chat = Chat(turns_violent, Settings(max_new_tokens_cap=1000, moderation=rules), moderation)
        compared = final(chat.compare(chat.compare_requests("Tell me about the weather", SYSTEMS[:2])))
        assert server.texts().count("Tell me about the weather") == 2
    for update in compared:
        assert update.moderation == "flagged" and update.answer == "" and "withheld" in update.withheld


@pytest.fixture(scope="module")
def compare_client(batched_chat):
    from gradio_client import Client

    from orca2_space.cli import launch

    batched_chat.settings = Settings(host="127.0.0.1", port=free_port(), max_new_tokens_cap=256)
    demo = launch(batched_chat, block=False)
    yield Client(demo.local_url, verbose=False)
    demo.close()


def test_compare_api_streams_one_chat_update_per_system_message_matching_chat(compare_client):
    job = compare_client.submit(message=QUESTION, system_messages=SYSTEMS, max_new_tokens=20, api_name="/compare")
    updates = list(job)
    answers = job.result()["answers"]
    assert all(len(update["answers"]) == 3 for update in updates)
    for system, answer in zip(SYSTEMS, answers):
        alone = compare_client.predict(
            message=QUESTION, system_message=system, single_turn=True, max_new_tokens=20, api_name="/chat"
        )
        assert answer == alone | {"tokens_per_second": answer["tokens_per_second"]}


def test_compare_api_refuses_a_bad_list_clearly(compare_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="system_messages must be a list of 2 to 4 texts"):
        compare_client.predict(message="Hi", system_messages=["just one"], api_name="/compare")


def test_an_answer_that_fails_still_records_the_settings_it_was_asked_with(fake_backend, monkeypatch):
    chat = Chat(fake_backend, Settings())
    monkeypatch.setattr(fake_backend, "generate", lambda prompt, params: 1 / 0)
    requests = chat.compare_requests("Hi", ["A", "B"], do_sample=True, seed=11)
    failed = final(chat.compare(requests))
    assert all("This answer failed" in update.error for update in failed)
    assert [update.params.seed for update in failed] == [11, 11]


def test_a_comparison_exports_each_columns_whole_prompt(fake_backend):
    chat = Chat(fake_backend, Settings())
    compared = final(chat.compare(chat.compare_requests(QUESTION, SYSTEMS, max_new_tokens=24)))
    answers = [exchange_of(QUESTION, system, True, update) for system, update in zip(SYSTEMS, compared)]
    exported = json.loads(json.loads(comparison_download(chat, answers, LookedAt()))["text"])
    alone = [chat.prompt_for(QUESTION, system, [], 24).input_ids for system in SYSTEMS]
    assert [column["prompt_ids"] for column in exported["answers"]] == alone

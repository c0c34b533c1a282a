"""What the chat shows (orca2_space/ui/messages.py): each question and answer as written, why an answer
is missing (withheld, failed, still waiting), which bubble is whose answer, and the status line under
the answer for every way an answer ends. Fast: no page here (the browser tests drive the same)."""

import html
import re

import pytest
from support import exchange

from orca2_space.backends.contract import GenerationStats, StopReason
from orca2_space.chat import ChatUpdate
from orca2_space.conversation import Conversation
from orca2_space.moderation import ModerationState
from orca2_space.render import for_display, raw
from orca2_space.ui.messages import answer_messages, chat_messages, exchange_at, status

WITHHELD = (
    "Orca 2's answer was withheld: moderation flagged it for Violence (severity 6); this server's threshold is 4."
)


def user(text: str, show=for_display) -> dict:
    return {"role": "user", "content": show(text)}


def assistant(text: str, show=for_display) -> dict:
    return {"role": "assistant", "content": show(text)}


def notice(title: str, text: str) -> dict:
    return {"role": "assistant", "content": for_display(text), "metadata": {"title": title}}


# --- The conversation -----------------------------------------------------------------------------


def test_each_exchange_shows_its_question_then_its_answer_as_written():
    conversation = Conversation(
        exchanges=[exchange("What does <b> do in **HTML**?", "It makes text **bold**."), exchange("And $x$?", "x")]
    )
    assert chat_messages(conversation, show_raw=False) == [
        user("What does <b> do in **HTML**?"),
        assistant("It makes text **bold**."),
        user("And $x$?"),
        assistant("x"),
    ]


def test_the_raw_view_shows_the_same_messages_unrendered():
    conversation = Conversation(exchanges=[exchange("  **not bold**", "\tline one\n\n\nline two")])
    assert chat_messages(conversation, show_raw=True) == [
        user("  **not bold**", raw),
        assistant("\tline one\n\n\nline two", raw),
    ]


def test_a_withheld_exchange_shows_why_in_place_of_the_answer():
    conversation = Conversation(exchanges=[exchange("Tell me a story", "", withheld=WITHHELD)])
    assert chat_messages(conversation, show_raw=False) == [user("Tell me a story"), notice("🛡 Moderation", WITHHELD)]


def test_a_failed_answer_keeps_what_was_written_and_shows_the_error_after_it():
    failed_early = exchange("Q1", "", error="The model failed: out of memory")
    failed_midway = exchange("Q2", "The ans", error="The inference server went away; the answer so far is kept.")
    assert chat_messages(Conversation(exchanges=[failed_early, failed_midway]), show_raw=False) == [
        user("Q1"),
        notice("⚠️ Error", "The model failed: out of memory"),
        user("Q2"),
        assistant("The ans"),
        notice("⚠️ Error", "The inference server went away; the answer so far is kept."),
    ]


def test_notices_are_the_pages_own_formatted_text_even_in_the_raw_view():
    conversation = Conversation(exchanges=[exchange("Q", "", error="**Bad** request")])
    assert chat_messages(conversation, show_raw=True)[1] == notice("⚠️ Error", "**Bad** request")


def test_the_question_being_answered_follows_the_conversation_with_its_answer_so_far():
    conversation = Conversation(exchanges=[exchange("Q1", "A1")])
    messages = chat_messages(conversation, False, "Q2 <i>", ChatUpdate("The answer so"))
    assert messages == [user("Q1"), assistant("A1"), user("Q2 <i>"), assistant("The answer so")]


def test_before_its_first_token_a_question_has_an_empty_answer_bubble():
    assert chat_messages(Conversation(), False, "Hi") == [user("Hi"), {"role": "assistant", "content": ""}]
    assert chat_messages(Conversation(), False, "Hi", ChatUpdate("")) == [user("Hi"), assistant("")]


def test_while_the_model_loads_the_question_waits_without_an_answer_bubble():
    update = ChatUpdate("", waiting="Waiting for the model to load: reading the weights… (12 s)")
    assert chat_messages(Conversation(), False, "Hi", update) == [user("Hi")]


def test_an_answer_withheld_while_streaming_never_shows_the_part_already_written():
    update = ChatUpdate("The sky is blue. Then a violent", done=True, withheld=WITHHELD)
    assert chat_messages(Conversation(), False, "Hi", update) == [user("Hi"), notice("🛡 Moderation", WITHHELD)]


def test_each_answer_bubble_is_known_as_its_exchanges_and_nothing_else_is():
    conversation = Conversation(
        exchanges=[
            exchange("Q0", "A0"),
            exchange("Q1", "", withheld=WITHHELD),
            exchange("Q2", "partial", error="failed"),
            exchange("Q3", "A3"),
        ]
    )
    shown = chat_messages(conversation, show_raw=False)
    # Q0 A0 | Q1 withheld | Q2 partial error | Q3 A3, and one past the end.
    expected = [None, 0, None, None, None, 2, None, None, 3, None]
    assert [exchange_at(conversation, index) for index in range(len(shown) + 1)] == expected


# --- A compared answer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "messages"),
    [
        (ChatUpdate("Step 1: **read**"), [assistant("Step 1: **read**")]),
        (ChatUpdate(""), [assistant("")]),
        (ChatUpdate("", waiting="Waiting for the model to load"), []),
        (ChatUpdate("Half", done=True, error="failed"), [assistant("Half"), notice("⚠️ Error", "failed")]),
        (ChatUpdate("Half", done=True, withheld=WITHHELD), [notice("🛡 Moderation", WITHHELD)]),
    ],
    ids=["answer", "first token yet to come", "waiting", "error", "withheld"],
)
def test_a_compared_answer_shows_the_answer_alone_or_why_there_is_none(update, messages):
    assert answer_messages(update, show_raw=False) == messages


def test_a_compared_answer_has_a_raw_view_too():
    assert answer_messages(ChatUpdate("  **x**\n"), show_raw=True) == [assistant("  **x**\n", raw)]


# --- The status line ------------------------------------------------------------------------------


def read(markup: str) -> tuple[dict[str, str], list[str]]:
    """The status element's attributes, and its lines as a screen reader reads them."""
    match = re.fullmatch(r"<div ([^>]*)>(.*)</div>", markup, re.DOTALL)
    assert match, markup
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match[1])), [html.unescape(line) for line in match[2].split("<br>")]


def finished(reason: StopReason, seed: int | None = None, **fields) -> ChatUpdate:
    return ChatUpdate("The answer", done=True, stats=GenerationStats(12, 4.0, reason, seed), **fields)


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        (StopReason.END_OF_TURN, "✅ Done"),
        (StopReason.LENGTH, "✅ Done (max new tokens reached)"),
        (StopReason.STOPPED, "⏹ Stopped"),
    ],
)
def test_a_finished_answer_says_how_it_ended_how_long_and_how_fast_and_that_it_was_greedy(reason, says):
    attributes, lines = read(status(finished(reason)))
    assert attributes["data-state"] == "done" and attributes["data-outcome"] == reason.value
    assert lines == [f"{says} · 12 tokens · 3.0 tokens/s · greedy"]


def test_a_sampled_answer_gives_its_seed_so_it_can_be_redone():
    assert read(status(finished(StopReason.END_OF_TURN, seed=1234)))[1] == [
        "✅ Done · 12 tokens · 3.0 tokens/s · seed 1234"
    ]


@pytest.mark.parametrize(
    ("update", "state", "outcome", "line"),
    [
        (ChatUpdate("The"), "streaming", "streaming", "⏳ Generating…"),
        (
            ChatUpdate("", waiting="Waiting for the model to load"),
            "streaming",
            "waiting",
            "⏳ Waiting for the model to load",
        ),
        (ChatUpdate("Half", done=True, error="The model failed"), "done", "error", "⚠️ The model failed"),
        (ChatUpdate("", done=True, withheld=WITHHELD), "done", "withheld", WITHHELD),
    ],
    ids=["streaming", "waiting", "error", "withheld"],
)
def test_an_unfinished_failed_or_withheld_answer_says_so(update, state, outcome, line):
    attributes, lines = read(status(update))
    assert (attributes["data-state"], attributes["data-outcome"], lines) == (state, outcome, [line])


@pytest.mark.parametrize(
    ("single_turn", "note"),
    [
        (True, ["💬 Single turn: earlier turns were not sent"]),
        (False, ["💬 With the earlier turns"]),
        (None, []),
    ],
)
def test_a_finished_chat_answer_says_whether_the_earlier_turns_were_sent(single_turn, note):
    assert read(status(finished(StopReason.END_OF_TURN), single_turn))[1][1:] == note


@pytest.mark.parametrize(
    ("moderation", "note"),
    [
        (ModerationState.OFF, []),
        (ModerationState.PENDING, ["🛡 Each sentence is shown once moderation has passed it"]),
        (ModerationState.PASSED, ["🛡 Moderated"]),
        (ModerationState.FLAGGED, ["🛡 Withheld by moderation"]),
        (ModerationState.UNAVAILABLE, ["⚠️ Moderation unavailable"]),
    ],
)
def test_the_status_says_what_moderation_did(moderation, note):
    assert read(status(ChatUpdate("The", moderation=moderation)))[1][1:] == note


def test_the_lines_come_in_order_outcome_turns_moderation_then_each_notice():
    update = finished(
        StopReason.LENGTH, moderation=ModerationState.PASSED, notices=("max_new_tokens was clamped to 1000", "x < y")
    )
    assert read(status(update, single_turn=True))[1] == [
        "✅ Done (max new tokens reached) · 12 tokens · 3.0 tokens/s · greedy",
        "💬 Single turn: earlier turns were not sent",
        "🛡 Moderated",
        "ℹ️ max_new_tokens was clamped to 1000",
        "ℹ️ x < y",
    ]


def test_the_status_is_announced_to_screen_readers_and_its_text_is_never_markup():
    markup = status(ChatUpdate("", done=True, error='<img src=x onerror="alert(1)"> & more'))
    attributes, lines = read(markup)
    assert attributes["role"] == "status" and attributes["aria-live"] == "polite"
    assert "<img" not in markup and lines == ['⚠️ <img src=x onerror="alert(1)"> & more']

"""What the page shows of a conversation: the chat's messages and the answer's status line.

Records hold text exactly as typed and written; render.py turns it into HTML that shows those
characters, Markdown formatted, and loads nothing. The Chatbot's value is only this view: what the model reads comes from
the records, never back from the page.
"""

import html

from ..chat import ChatUpdate
from ..conversation import NOT_REDOABLE, Conversation
from ..moderation import ModerationState
from ..render import for_display, raw

_MODERATION_STATUS = {
    ModerationState.PENDING: "🛡 Each sentence is shown once moderation has passed it",
    ModerationState.PASSED: "🛡 Moderated",
    ModerationState.FLAGGED: "🛡 Withheld by moderation",
    ModerationState.UNAVAILABLE: "⚠️ Moderation unavailable",
}
_DONE = {"end_of_turn": "✅ Done", "length": "✅ Done (max new tokens reached)", "stopped": "⏹ Stopped"}


def chat_messages(
    conversation: Conversation, show_raw: bool, question: str | None = None, update: ChatUpdate | None = None
) -> list[dict]:
    """The Chatbot's messages: the conversation's exchanges, then the question being answered."""
    show = raw if show_raw else for_display
    messages = []
    for e in conversation.exchanges:
        messages += _exchange(show, e.question, e.answer, e.withheld, e.error, waiting=False)
    if question is not None:
        update = update or ChatUpdate("")
        messages += _exchange(show, question, update.answer, update.withheld, update.error, bool(update.waiting))
    return messages


def exchange_at(conversation: Conversation, message_index: int) -> int | None:
    """Which exchange's answer the Chatbot shows at message_index (None: a question or a notice)."""
    position = 0
    for number, e in enumerate(conversation.exchanges):
        for message in _exchange(raw, e.question, e.answer, e.withheld, e.error, waiting=False):
            if position == message_index:
                return number if message["role"] == "assistant" and "metadata" not in message else None
            position += 1
    return None


def answer_messages(update: ChatUpdate, show_raw: bool) -> list[dict]:
    """A compared answer's messages: the answer alone (the question is shared), or why there is none."""
    show = raw if show_raw else for_display
    return _exchange(show, "", update.answer, update.withheld, update.error, bool(update.waiting))[1:]


def _exchange(show, question: str, answer: str, withheld: str | None, error: str | None, waiting: bool) -> list[dict]:
    messages = [{"role": "user", "content": show(question)}]
    if withheld:
        return [*messages, _notice("🛡 Moderation", withheld)]
    if answer or not (error or waiting):
        messages.append({"role": "assistant", "content": show(answer)})
    if error:
        messages.append(_notice("⚠️ Error", error))
    return messages


def _notice(title: str, text: str) -> dict:
    return {"role": "assistant", "content": for_display(text), "metadata": {"title": title}}


def imported_status(conversation: Conversation) -> str:
    """The status line after an import: empty, unless a seed there can't redo its answer."""
    if all(e.redoable for e in conversation.exchanges):
        return ""
    return f'<div role="status" data-state="imported">ℹ️ {html.escape(NOT_REDOABLE)}</div>'


def status(update: ChatUpdate, single_turn: bool | None = None) -> str:
    """The answer's status line. data-state="done" is the stable "answer finished" signal for tests
    and scripts; role=status lets screen readers announce it."""
    if update.withheld:
        outcome, line = "withheld", update.withheld
    elif update.error:
        outcome, line = "error", f"⚠️ {update.error}"
    elif update.waiting:
        outcome, line = "waiting", f"⏳ {update.waiting}"
    elif not update.done:
        outcome, line = "streaming", "⏳ Generating…"
    else:
        s = update.stats
        assert s is not None, "a finished answer that did not fail has its stats (ChatUpdate)"
        outcome = s.stop_reason.value
        mode = f"seed {s.seed}" if s.seed is not None else "greedy"
        line = f"{_DONE.get(outcome, outcome)} · {s.n_tokens} tokens · {s.tokens_per_second:.1f} tokens/s · {mode}"
    lines = [line]
    if single_turn is not None:
        lines.append("💬 Single turn: earlier turns were not sent" if single_turn else "💬 With the earlier turns")
    if update.moderation in _MODERATION_STATUS:
        lines.append(_MODERATION_STATUS[update.moderation])
    lines += [f"ℹ️ {n}" for n in update.notices]
    state = "done" if update.done else "streaming"
    body = "<br>".join(html.escape(item) for item in lines)
    return f'<div role="status" aria-live="polite" data-state="{state}" data-outcome="{outcome}">{body}</div>'

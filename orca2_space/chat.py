"""One chat turn end to end: validate, build the exact prompt, stream the engine's answer.

The page and the ``/chat`` API both call ``Chat.respond``, so they cannot drift apart. Nothing
here imports gradio.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import GenerationParams, InvalidRequest, Settings, validate_params
from .engine import Engine, GenerationError, GenerationStats
from .prompt import Prompt, PromptTooLong, Turn, answer_text


@dataclass(frozen=True)
class ChatRequest:
    message: str
    system_message: str
    history: list[Turn]
    params: GenerationParams
    # Messages about the request itself (clamped settings, skipped history entries).
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatUpdate:
    """The answer so far; the last update of a turn has done=True and, unless it failed, stats."""

    answer: str
    done: bool = False
    stats: GenerationStats | None = None
    error: str | None = None
    notices: tuple[str, ...] = field(default_factory=tuple)

    def as_api_dict(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "answer": self.answer,
            "done": self.done,
            "error": self.error,
            "stop_reason": stats.stop_reason if stats else None,
            "n_tokens": stats.n_tokens if stats else None,
            "tokens_per_second": round(stats.tokens_per_second, 2) if stats else None,
            "seed": stats.seed if stats else None,
            "notices": list(self.notices),
        }


def _text(content: Any, where: str) -> str:
    """Text of a message's content: a string, or the text parts of a Gradio chatbot message."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise InvalidRequest(f"{where}: content must be text")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text, got {type(value).__name__}")
    return value


def turns_from_messages(messages: Any) -> tuple[list[Turn], list[str]]:
    """History as turns, from a list of {"role", "content"} messages.

    A user message counts only with the answer that follows it; messages with a metadata title are
    the page's notices (errors, filtered answers) and are never sent back to the model.
    """
    if messages is None:
        return [], []
    if not isinstance(messages, list):
        raise InvalidRequest(f"history must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
    turns: list[Turn] = []
    pending_user: str | None = None
    skipped = 0
    for index, message in enumerate(messages):
        where = f"history[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InvalidRequest(f"{where} must be a {{'role', 'content'}} message")
        role = message["role"]
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"{where}: role must be 'user' or 'assistant', got {role!r:.40}")
        text = _text(message["content"], where)
        if (message.get("metadata") or {}).get("title"):
            continue
        if role == "user":
            skipped += pending_user is not None
            pending_user = text
        elif pending_user is None:
            skipped += 1
        else:
            turns.append(Turn(pending_user, text))
            pending_user = None
    skipped += pending_user is not None
    notices = [f"{skipped} history message(s) without a question-answer pair were left out."] if skipped else []
    return turns, notices


class Chat:
    """The conversation service over one shared engine."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self._active: dict[str, Any] = {}
        self._active_lock = threading.Lock()

    def request(self, message: Any, system_message: Any, history: Any, **params: Any) -> ChatRequest:
        """A validated request from untrusted values; raises InvalidRequest with a clear message."""
        message, system_message, turns, history_notices = self._conversation(message, system_message, history)
        if not message.strip():
            raise InvalidRequest("The message is empty.")
        generation, param_notices = validate_params(params, self.settings.max_new_tokens_cap)
        return ChatRequest(message, system_message, turns, generation, tuple(param_notices + history_notices))

    def inspect(self, message: Any, system_message: Any, history: Any, max_new_tokens: Any = 0) -> Prompt:
        """The exact prompt the model would see for this message, with room for max_new_tokens."""
        message, system_message, turns, _ = self._conversation(message, system_message, history)
        reserved = 0
        if max_new_tokens:
            reserved = validate_params({"max_new_tokens": max_new_tokens}, self.settings.max_new_tokens_cap)[0].max_new_tokens
        return self._prompt(message, system_message, turns, reserved)

    def _conversation(self, message: Any, system_message: Any, history: Any) -> tuple[str, str, list[Turn], list[str]]:
        message = _string(message, "message")
        system_message = _string(system_message, "system_message")
        limit = self.settings.max_message_chars
        for name, text in (("message", message), ("system_message", system_message)):
            if len(text) > limit:
                raise InvalidRequest(f"The {name} is {len(text):,} characters; this server accepts at most {limit:,}.")
        turns, notices = turns_from_messages(history)
        return message, system_message, turns, notices

    def _prompt(self, message: str, system_message: str, history: list[Turn], max_new_tokens: int) -> Prompt:
        return self.engine.tokenizer.build(
            system_message, history, message, max_new_tokens=max_new_tokens, context_length=self.engine.info.context_length
        )

    def respond(self, request: ChatRequest, owner: str | None = None) -> Iterator[ChatUpdate]:
        """Stream the answer. Closing the iterator, or stop(owner), ends the model's work."""
        notices = list(request.notices)
        try:
            prompt = self._prompt(request.message, request.system_message, request.history, request.params.max_new_tokens)
        except PromptTooLong as error:
            yield ChatUpdate("", done=True, error=str(error), notices=tuple(notices))
            return
        if prompt.dropped_turns:
            notices.append(
                f"The {prompt.dropped_turns} oldest turn(s) were left out to fit Orca 2's "
                f"{self.engine.info.context_length}-token context."
            )
        generation = self.engine.generate(prompt.input_ids, request.params)
        if owner is not None:
            with self._active_lock:
                self._active[owner] = generation
        generated = ""
        try:
            for delta in generation:
                generated += delta
                yield ChatUpdate(answer_text(generated), notices=tuple(notices))
            yield ChatUpdate(answer_text(generated), done=True, stats=generation.stats, notices=tuple(notices))
        except GenerationError as error:
            yield ChatUpdate(answer_text(generated), done=True, error=str(error), notices=tuple(notices))
        finally:
            generation.cancel()
            if owner is not None:
                with self._active_lock:
                    if self._active.get(owner) is generation:
                        del self._active[owner]

    def stop(self, owner: str) -> bool:
        """End the owner's running answer after the current decode step; True if one was running."""
        with self._active_lock:
            generation = self._active.get(owner)
        if generation is None:
            return False
        generation.cancel()
        return True

"""One chat turn end to end: validate, build the exact prompt, stream the backend's answer.

The page and the ``/chat`` API both call ``Chat.respond``, so they cannot drift apart. Nothing
here imports gradio.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import queue
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import evaluator
from .backends.contract import AnswerStream, Backend, GenerationError, GenerationStats, ModelLoading
from .evaluator import EvaluationProgress, EvaluationRequest, EvaluationSlots
from .fairness import FairShare, Heavy, Limits, Refused, Visitor, sharer
from .moderation import Moderation, ModerationState, Verdict
from .presets import CAUTIOUS, SYSTEM_PRESETS
from .prompt import (
    Asked,
    CarriedPrompt,
    ConversationPrompts,
    Frame,
    OrcaTokenizer,
    Prompt,
    PromptTooLong,
    Turn,
    answer_text,
)
from .settings import MIB, GenerationParams, InvalidRequest, Settings, sign_in_offered, validate_params

log = logging.getLogger(__name__)

# A comparison sets 2 to 4 system messages side by side: enough to contrast strategies, few enough to read.
COMPARED = range(2, 5)


@dataclass(frozen=True)
class ChatRequest:
    message: str
    system_message: str
    history: list[Turn]
    params: GenerationParams
    # What the caller asked for; None leaves it to the server's default.
    moderation: bool | None = None
    # Messages about the request itself (clamped settings, skipped history entries).
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatUpdate:
    """The answer so far; the last update of a turn has done=True and, unless it failed, stats."""

    answer: str
    # The ids of the answer so far, where the backend knows them (an inference server may send text only).
    answer_ids: tuple[int, ...] | None = None
    done: bool = False
    stats: GenerationStats | None = None
    error: str | None = None
    notices: tuple[str, ...] = field(default_factory=tuple)
    moderation: ModerationState = ModerationState.OFF
    # Why moderation withheld the question or the answer; shown instead of it.
    withheld: str | None = None
    # Set while the request waits for the model to finish loading.
    waiting: str | None = None
    # On the last update: the settings the answer was made with, a sampled answer's seed included.
    params: GenerationParams | None = None

    def as_api_dict(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "answer": self.answer,
            "answer_ids": None if self.answer_ids is None else list(self.answer_ids),
            "done": self.done,
            "error": self.error,
            "stop_reason": stats.stop_reason.value if stats else None,
            "n_tokens": stats.n_tokens if stats else None,
            "tokens_per_second": round(stats.tokens_per_second, 2) if stats else None,
            "seed": stats.seed if stats else None,
            "notices": list(self.notices),
            "moderation": self.moderation.value,
            "withheld": self.withheld,
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


def system_message_for(system_message: Any, preset: Any) -> Any:
    """The system message an API caller means: their own, a preset's, or the model card's default."""
    if preset is None:
        return CAUTIOUS if system_message is None else system_message
    if system_message is not None:
        raise InvalidRequest("Give either system_message or preset, not both.")
    if not isinstance(preset, str) or preset not in SYSTEM_PRESETS:
        raise InvalidRequest(f"Unknown preset {preset!r:.60}; presets: {', '.join(SYSTEM_PRESETS)}.")
    return SYSTEM_PRESETS[preset]


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


# How long a blocked answer may take to stop: one decode step, with room for a busy machine.
STOP_GRACE_SECONDS = 10.0


class Chat:
    """The conversation service over one shared backend."""

    # How often a request that arrived while the model loads hears that it is still waiting.
    LOADING_UPDATE_SECONDS = 1.0

    def __init__(self, backend: Backend | ModelLoading, settings: Settings, moderation: Moderation | None = None):
        self.loading = backend if isinstance(backend, ModelLoading) else ModelLoading.loaded(backend)
        self.settings = settings
        self.moderation = moderation
        limits = Limits(
            settings.visitor_limit,
            settings.address_limit,
            settings.concurrency + settings.max_queue,
            per_anonymous_visitor=settings.anonymous_visitor_limit,
            sign_in_offered=sign_in_offered(),
            sign_in_for_heavy=settings.sign_in_for_heavy,
            address_bytes_per_second=settings.address_mib_per_minute * MIB / 60,
        )
        self.fair_share = FairShare(limits)
        # The answers each owner (a page session) has running, for stop(owner).
        self._active: dict[str, set[AnswerStream | _Comparison | evaluator.Run]] = {}
        self._active_lock = threading.Lock()
        self._evaluations = EvaluationSlots(settings.max_evaluations)

    def request(
        self,
        message: Any,
        system_message: Any,
        history: Any,
        moderation: Any = None,
        single_turn: Any = False,
        **params: Any,
    ) -> ChatRequest:
        """A validated request from untrusted values; raises InvalidRequest with a clear message.

        single_turn answers the message on its own, as Orca 2's card intends and its paper evaluates:
        the history is then not sent to the model."""
        message, system_message, turns, history_notices = self._conversation(message, system_message, history)
        if not message.strip():
            raise InvalidRequest("The message is empty.")
        for name, value in (("moderation", moderation), ("single_turn", single_turn)):
            if value is not None and not isinstance(value, bool):
                raise InvalidRequest(f"{name} must be true or false, got {value!r:.40}")
        if single_turn:
            turns, history_notices = [], []
        generation, param_notices = validate_params(params, self.settings.max_new_tokens_cap)
        notices = tuple(param_notices + history_notices)
        return ChatRequest(message, system_message, turns, generation, moderation, notices)

    def moderation_for(self, requested: bool | None) -> tuple[Moderation | None, str | None]:
        """The moderation that applies to a request, and a notice when the request didn't get its way."""
        if self.moderation is None:
            return (
                None,
                "Moderation is not configured on this server; the answer is not moderated." if requested else None,
            )
        rules = self.moderation.settings
        if rules.required:
            return self.moderation, "Moderation is required on this server." if requested is False else None
        on = rules.default_on if requested is None else requested
        return (self.moderation if on else None), None

    def inspect(
        self, message: Any, system_message: Any, history: Any, max_new_tokens: Any = 0, visitor: Visitor | None = None
    ) -> Prompt:
        """prompt_for, asked by a visitor: a place of their fair share while it is built (fairness.Refused
        over it), like every request."""
        with self.fair_share.admit(visitor):
            return self.prompt_for(message, system_message, history, max_new_tokens)

    def prompt_for(self, message: Any, system_message: Any, history: Any, max_new_tokens: Any = 0) -> Prompt:
        """The exact prompt the model would see for this message, with room for max_new_tokens; for the
        app's own use within a request (scoring, export), so it takes no place of the fair share."""
        message, system_message, turns, _ = self._conversation(message, system_message, history)
        return self._prompt(message, system_message, turns, self._reserved(max_new_tokens))

    def prompts(self, asked: Sequence[Asked]) -> ConversationPrompts:
        """Each question's prompt as inspect() gives it, with the earlier answered questions as its
        history (none for a single-turn one); None where inspect() refuses it.

        Each earlier turn is encoded once and carried by reference, so the cost and the size follow
        the conversation's length: inspect() for each question would encode every earlier turn again
        (an export of 1,200 short exchanges took 16 s and came to 58 MB)."""
        earlier = _EarlierTurns(self.backend.tokenizer)
        prompts: list[CarriedPrompt | None] = []
        for index, question in enumerate(asked):
            history_ok = not question.with_history or (
                earlier.count <= self.settings.max_exchanges and earlier.chars <= self.settings.max_store_chars
            )
            frame = self._frame(question) if history_ok else None
            if frame is None:
                prompts.append(None)
            else:
                first = earlier.carry(frame.room) if question.with_history else None
                prompts.append(CarriedPrompt(frame.head + frame.tail, len(frame.head), first))
            if question.answer is not None:
                earlier.add(index, Turn(question.message, question.answer))
        return ConversationPrompts(prompts, earlier.carried())

    def _frame(self, question: Asked) -> Frame | None:
        """The question's prompt around its earlier turns; None where inspect() refuses it."""
        if max(len(question.message), len(question.system_message)) > self.settings.max_message_chars:
            return None
        try:
            return self.backend.tokenizer.frame(
                question.system_message,
                question.message,
                max_new_tokens=self._reserved(question.max_new_tokens),
                context_length=self.backend.info.context_length,
            )
        except PromptTooLong:
            return None

    def _reserved(self, max_new_tokens: Any) -> int:
        """The room set aside for the answer: max_new_tokens within the server's cap."""
        if not max_new_tokens:
            return 0
        return validate_params({"max_new_tokens": max_new_tokens}, self.settings.max_new_tokens_cap)[0].max_new_tokens

    def _conversation(self, message: Any, system_message: Any, history: Any) -> tuple[str, str, list[Turn], list[str]]:
        message = _string(message, "message")
        system_message = _string(system_message, "system_message")
        limit = self.settings.max_message_chars
        for name, text in (("message", message), ("system_message", system_message)):
            if len(text) > limit:
                raise InvalidRequest(f"The {name} is {len(text):,} characters; this server accepts at most {limit:,}.")
        most = 2 * self.settings.max_exchanges
        if isinstance(history, list) and len(history) > most:
            raise InvalidRequest(
                f"The history holds {len(history):,} messages; this server takes at most {most:,} "
                f"({self.settings.max_exchanges:,} questions and their answers). Start a new chat, or send fewer."
            )
        turns, notices = turns_from_messages(history)
        size, most_chars = sum(len(t.user) + len(t.assistant) for t in turns), self.settings.max_store_chars
        if size > most_chars:
            raise InvalidRequest(f"The history is {size:,} characters; this server takes at most {most_chars:,}.")
        return message, system_message, turns, notices

    @property
    def backend(self) -> Backend:
        if self.loading.backend is None:
            raise InvalidRequest(f"Orca 2 is not ready. {self.loading.describe()}")
        return self.loading.backend

    def _wait_for_backend(self) -> Iterator[str]:
        """While the model loads: a line to show every LOADING_UPDATE_SECONDS."""
        while self.loading.wait(self.LOADING_UPDATE_SECONDS) is None and not self.loading.done:
            yield f"Your message is waiting for the model. {self.loading.describe()}"

    def _prompt(self, message: str, system_message: str, history: list[Turn], max_new_tokens: int) -> Prompt:
        return self.backend.tokenizer.build(
            system_message,
            history,
            message,
            max_new_tokens=max_new_tokens,
            context_length=self.backend.info.context_length,
        )

    def respond(
        self, request: ChatRequest, owner: str | None = None, visitor: Visitor | None = None
    ) -> Iterator[ChatUpdate]:
        """Stream the answer. Closing the iterator, or stop(owner), ends the backend's work. A visitor
        over their fair share is refused (fairness.Refused) before anything else happens."""
        with self.fair_share.admit(visitor):
            yield from self._respond(request, owner, sharer(visitor))

    def _respond(self, request: ChatRequest, owner: str | None, whose: str = "") -> Iterator[ChatUpdate]:
        moderation, notice = self.moderation_for(request.moderation)
        reply = _Reply([*request.notices, *([notice] if notice else [])], moderation, request.params)
        for waiting in self._wait_for_backend():
            yield reply("", waiting=waiting)
        if self.loading.backend is None:
            yield reply("", done=True, error=f"Orca 2 could not be loaded, so it can't answer. {self.loading.error}")
            return
        if moderation is not None:
            verdict = moderation.check(request.message)
            if not reply.heard(verdict):
                yield reply(
                    "", done=True, withheld=_withheld("Your message was not sent to Orca 2", verdict, moderation)
                )
                return
        try:
            prompt = self._prompt(
                request.message, request.system_message, request.history, request.params.max_new_tokens
            )
        except PromptTooLong as error:
            yield reply("", done=True, error=str(error))
            return
        if prompt.dropped_turns:
            reply.notices.append(
                f"The {prompt.dropped_turns} oldest turn(s) were left out to fit Orca 2's "
                f"{self.backend.info.context_length}-token context."
            )
        answer = self.backend.generate(prompt, request.params, whose)
        with self._owned(owner, answer):
            yield from _stream(answer, reply, moderation)

    @contextlib.contextmanager
    def _owned(self, owner: str | None, answer: AnswerStream | _Comparison | evaluator.Run) -> Iterator[None]:
        """While the answer streams, stop(owner) can reach it; afterwards the backend's work ends."""
        if owner is not None:
            with self._active_lock:
                self._active.setdefault(owner, set()).add(answer)
        try:
            yield
        finally:
            answer.cancel()
            if owner is not None:
                with self._active_lock:
                    running = self._active.get(owner, set())
                    running.discard(answer)
                    if not running:
                        self._active.pop(owner, None)

    def stop(self, owner: str) -> bool:
        """End the owner's running answers after the current decode step; True if any was running."""
        with self._active_lock:
            running = list(self._active.get(owner, ()))
        for answer in running:
            answer.cancel()
        return bool(running)

    def compare_requests(
        self, message: Any, system_messages: Any, moderation: Any = None, visitor: Visitor | None = None, **params: Any
    ) -> list[ChatRequest]:
        """One single-turn request per system message, validated, with the same settings: a sampled
        comparison draws one seed for all, so that the answers differ by their system message alone.
        A comparison runs one answer per system message, so it must fit a visitor's fair share (this
        visitor's, or a signed-in one's), and it is heavy (FairShare.check_heavy)."""
        if not isinstance(system_messages, list | tuple) or len(system_messages) not in COMPARED:
            raise InvalidRequest(
                f"system_messages must be a list of {COMPARED.start} to {COMPARED.stop - 1} texts; got {_describe(system_messages)}"
            )
        share = self.fair_share
        share.check_heavy(visitor, Heavy.COMPARISON)
        most = share.limits.per_visitor if visitor is None else share.limits.per(visitor)
        if len(system_messages) > most:
            raise Refused(
                f"A comparison runs one answer per system message, and this server lets one visitor run {most} "
                f"at a time: compare at most {most} system messages (got {len(system_messages)})."
                + ("" if visitor is None else share.sign_in_hint(visitor))
            )
        requests = [
            self.request(message, _string(system, f"system_messages[{index}]"), None, moderation, True, **params)
            for index, system in enumerate(system_messages)
        ]
        shared = requests[0].params
        if shared.do_sample and shared.seed is None:
            shared = shared.model_copy(update={"seed": secrets.randbelow(2**32)})
        return [dataclasses.replace(request, params=shared) for request in requests]

    def compare(
        self, requests: Sequence[ChatRequest], owner: str | None = None, visitor: Visitor | None = None
    ) -> Iterator[tuple[ChatUpdate, ...]]:
        """Stream the answers side by side: each update holds every answer's latest state, in order.

        Each answer is respond()'s, in a thread of its own, so greedy ones share the batch's decode
        steps. stop(owner), or closing the iterator, stops them all; each still ends with its final
        update. A comparison takes one place of the visitor's fair share per answer, and is heavy (where
        the server keeps heavy requests for signed-in visitors, others are refused)."""
        with self.fair_share.admit(visitor, len(requests), Heavy.COMPARISON):
            yield from self._compare(requests, owner, sharer(visitor))

    def _compare(
        self, requests: Sequence[ChatRequest], owner: str | None, whose: str = ""
    ) -> Iterator[tuple[ChatUpdate, ...]]:
        comparison = _Comparison(self, f"compare-{secrets.token_hex(8)}", whose)
        updates: queue.SimpleQueue = queue.SimpleQueue()
        for index, request in enumerate(requests):
            threading.Thread(
                target=comparison.answer_into,
                args=(index, request, updates),
                name="orca2-compare",
                daemon=True,
            ).start()
        latest = [ChatUpdate("") for _ in requests]
        running = len(requests)
        with self._owned(owner, comparison):
            while running:
                # A reader that fell behind gets the latest state of every answer in one update.
                for index, update in _drain(updates):
                    if update is None:
                        running -= 1
                    else:
                        latest[index] = update
                yield tuple(latest)

    def evaluation_request(
        self, questions: Any, system_messages: Any, grading: Any, moderation: Any = None, **params: Any
    ) -> EvaluationRequest:
        """A validated evaluation from untrusted values: questions (a list of records, or a QuestionSet),
        1 to 4 system messages, a grading.Grading and the generation settings every answer shares (a
        sampled evaluation draws one seed for all). InvalidRequest names what is wrong; a request over
        --max-evaluation-rows is refused (fairness.Refused) with the cap."""
        return evaluator.evaluation_request(self, questions, system_messages, grading, moderation, params)

    def evaluate(
        self, request: EvaluationRequest, visitor: Visitor | None = None, owner: str | None = None
    ) -> Iterator[EvaluationProgress]:
        """Answer every question under every system message, grading each answer as it finishes;
        stream the progress, partial results included. It is one request of the visitor's fair share,
        within --max-evaluations (fairness.Refused over either), and holds part of the batch while
        others wait (evaluator.py). stop(owner), or closing the iterator, ends all of its answers;
        what finished stays, and the last progress has finished=True."""
        with self._evaluations.hold(), self.fair_share.admit(visitor, heavy=Heavy.EVALUATION):
            yield from evaluator.Run(self, request, sharer(visitor)).progress(owner)


class _Comparison:
    """What stop(owner) reaches of a comparison: each of its answers, those still to start included."""

    def __init__(self, chat: Chat, key: str, whose: str):
        self._chat = chat
        self._key = key  # the owner its answers run under
        self._whose = whose
        self._stopped = threading.Event()

    def cancel(self) -> None:
        self._stopped.set()
        self._chat.stop(self._key)

    def answer_into(self, index: int, request: ChatRequest, updates: queue.SimpleQueue) -> None:
        """One answer's updates, put as (index, update), then (index, None)."""
        try:
            for update in self._chat._respond(request, self._key, self._whose):
                updates.put((index, update))
                if self._stopped.is_set():  # an answer that started after Stop stops now
                    self._chat.stop(self._key)
        except Exception as error:
            log.exception("a compared answer failed")
            failed = ChatUpdate("", done=True, error=f"This answer failed: {error}", params=request.params)
            updates.put((index, failed))
        finally:
            updates.put((index, None))


class _EarlierTurns:
    """A conversation's answered questions so far, each turn's ids encoded once, and the ones that
    prompts carried."""

    def __init__(self, tokenizer: OrcaTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[list[int]] = []
        self._owners: list[int] = []  # the question each turn is
        self._ends = [0]  # _ends[i]: how many ids the turns before i take
        self._carried = [0]  # +1 where a prompt's carried turns start, -1 past their end
        self.chars = 0  # what history inspect() would be sent: its characters, and its turns (count)

    @property
    def count(self) -> int:
        return len(self._ids)

    def add(self, owner: int, turn: Turn) -> None:
        self._ids.append(self._tokenizer.turn_ids(turn))
        self._owners.append(owner)
        self._ends.append(self._ends[-1] + len(self._ids[-1]))
        self._carried.append(0)
        self.chars += len(turn.user) + len(turn.assistant)

    def carry(self, room: int) -> int | None:
        """The question of the oldest turn a prompt with room for this many ids carries (the newest
        that fit, as OrcaTokenizer.build keeps them); None for none."""
        first = bisect.bisect_left(self._ends, self._ends[-1] - room)
        if first == self.count:
            return None
        self._carried[first] += 1
        self._carried[self.count] -= 1
        return self._owners[first]

    def carried(self) -> dict[int, list[int]]:
        """The ids of each turn a prompt carried, by its question."""
        running, ids = 0, {}
        for position, owner in enumerate(self._owners):
            running += self._carried[position]
            if running:
                ids[owner] = self._ids[position]
        return ids


def _drain(updates: queue.SimpleQueue) -> list:
    """The next item (waiting for it), and any that are already there."""
    items = [updates.get()]
    while not updates.empty():
        items.append(updates.get_nowait())
    return items


def _describe(value: Any) -> str:
    if isinstance(value, list | tuple):
        return f"{len(value)} of them"
    return f"a {type(value).__name__}"


def _ids(answer: AnswerStream) -> tuple[int, ...] | None:
    return None if answer.token_ids is None else tuple(answer.token_ids)


class _Reply:
    """The updates of one turn; notices and the moderation state accumulate as it goes."""

    def __init__(self, notices: list[str], moderation: Moderation | None, params: GenerationParams):
        self.notices = notices
        self.state = ModerationState.OFF if moderation is None else ModerationState.PENDING
        self.params = params

    def heard(self, verdict: Verdict) -> bool:
        """Take a moderation verdict into the turn; False if it withholds the text."""
        if not verdict.allowed:
            self.state = verdict.state
            return False
        if not verdict.moderated:
            self.notices.append(_unmoderated(verdict))
        return True

    def __call__(self, answer: str, **fields: Any) -> ChatUpdate:
        if fields.get("done"):
            stats = fields.get("stats")
            seed = None if stats is None else stats.seed
            fields["params"] = self.params if seed is None else self.params.model_copy(update={"seed": seed})
        return ChatUpdate(answer, notices=tuple(self.notices), **{"moderation": self.state, **fields})


def _stream(answer: AnswerStream, reply: _Reply, moderation: Moderation | None) -> Iterator[ChatUpdate]:
    """The answer's updates: as written without moderation, else only what the gate released."""
    gate = moderation.gate() if moderation is not None else None
    generated = shown = ""
    error = None
    try:
        for delta in answer:
            generated += delta
            if gate is None:
                shown = answer_text(generated)
                yield reply(shown, answer_ids=_ids(answer))
                continue
            gate.offer(answer_text(generated))
            if gate.blocked:
                answer.cancel()
                answer.wait(STOP_GRACE_SECONDS)  # one decode step
                break
            if (released := gate.released) != shown:
                shown = released
                yield reply(shown)  # no ids: they could spell out what moderation has not passed
    except GenerationError as failure:
        error = str(failure)
    finally:
        if gate is not None:
            gate.close()
    reply.notices += answer.notices
    text = answer_text(generated)
    if gate is not None and moderation is not None:
        verdict = gate.finish(text)
        reply.state = verdict.state
        if not reply.heard(verdict):
            withheld = _withheld("[Content Filtered] Orca 2's answer was withheld", verdict, moderation)
            yield reply("", done=True, stats=answer.stats, withheld=withheld)
            return
    yield reply(text, done=True, stats=answer.stats, error=error, answer_ids=_ids(answer))


def _withheld(what: str, verdict: Verdict, moderation: Moderation) -> str:
    if verdict.flagged:
        return f"{what}: moderation flagged it for {verdict.describe()}; this server's threshold is {moderation.settings.threshold}."
    return f"{what}: {verdict.error}, and this server does not let unmoderated text through."


def _unmoderated(verdict: Verdict) -> str:
    return f"Not moderated: {verdict.error}."

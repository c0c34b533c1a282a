"""A visitor's conversations and comparisons as records: what was asked and what Orca 2 wrote, with
the settings, seed and ids that reproduce each answer, and the token probabilities the visitor looked at.

The page keeps them in the visitor's browser (never on the server) and exports them as JSON (to
replay or share) or Markdown (to read). A record holds the text exactly as typed and written; how it
is shown is render.py's business.

A conversation's JSON export (version 2) holds the ids the model read for each exchange without repeating the earlier
turns a multi-turn prompt carried: those are named (earlier_turns) and each carried exchange's ids are
written once (turn_ids), so an export's size follows the conversation's (Export.prompt_ids_of puts a
prompt back together). Version 1 files, which repeated them, still import.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .backends.contract import GenerationStats, ModelInfo, TokenProbability
from .chat import COMPARED
from .moderation import ModerationState
from .presets import preset_of
from .prompt import Asked, ConversationPrompts, Turn
from .settings import GenerationParams, InvalidRequest, Settings

FORMAT = "orca2-space/conversation"
FORMAT_VERSION = 2
COMPARISON_FORMAT = "orca2-space/comparison"
COMPARISON_FORMAT_VERSION = 1
# The browser keeps this many conversations; the oldest go first.
MAX_KEPT = 50
# The browser sends what it keeps with the requests that read it, so it keeps the token probabilities
# of this many tokens at most, newest first (an older answer's can be scored again). One whole
# context, so the answer just scored keeps its own (if it fits LOOKED_AT_ROOM too).
MAX_KEPT_SCORED_TOKENS = 4096
# Said of an answer that is not Exchange.redoable.
NOT_REDOABLE = (
    "Sampled before answers were seeded per request: the same seed samples a new answer, not this one token for token."
)

# What the visitor's browser holds for this page. Chromium, Firefox and Safari give a site (an origin)
# 5 MiB of localStorage, counted in characters of its keys and values. A save past that fails with a
# QuotaExceededError the visitor never sees, and the browser goes on holding what it last saved.
LOCAL_STORAGE_CHARS = 5 * 1024 * 1024
# Each value the page keeps has its share (in characters as stored, stored_chars), so that together
# they always fit, with 0.34 M characters to spare for Gradio's own keys and for the numbers JavaScript
# writes a little longer than Python: the conversations most; the token probabilities looked at, in the
# chat and in the comparison, about 1,900 tokens each (with their alternatives, one answer at the
# default --max-new-tokens-cap); the last comparison.
STORE_ROOM = 3_000_000
LOOKED_AT_ROOM = 800_000
COMPARISON_ROOM = 300_000
# A chat takes no new question past this share of STORE_ROOM, so that its next exchange still fits.
FULL_CHAT = 0.9
_STRICT = ConfigDict(extra="forbid")


class Stats(BaseModel):
    model_config = _STRICT

    stop_reason: str
    n_tokens: int
    seconds: float
    tokens_per_second: float
    batched: bool = False
    # How a sampled answer was drawn (GenerationStats.sampling); None when greedy, and in exports made
    # before answers were seeded per request.
    sampling: str | None = None

    @classmethod
    def of(cls, stats: GenerationStats) -> Stats:
        return cls(
            stop_reason=stats.stop_reason.value,
            n_tokens=stats.n_tokens,
            seconds=round(stats.seconds, 3),
            tokens_per_second=round(stats.tokens_per_second, 2),
            batched=stats.batched,
            sampling=stats.sampling,
        )


class ScoredAlternative(BaseModel):
    """A token the model could have written at a position, and the probability it gave it."""

    model_config = _STRICT

    id: int
    text: str
    probability: float


class ScoredToken(ScoredAlternative):
    """One token of an answer as scored: its probability, and the most likely tokens at its position.
    Also the shape of /token_probabilities' tokens."""

    top: list[ScoredAlternative]

    @classmethod
    def of(cls, token: TokenProbability) -> ScoredToken:
        top = [ScoredAlternative(id=a.id, text=a.text, probability=_round(a.probability)) for a in token.top]
        return cls(id=token.id, text=token.text, probability=_round(token.probability), top=top)


def _round(probability: float) -> float:
    """To 6 significant digits: what a reader can use, a third of the characters in JSON."""
    return float(f"{probability:.6g}")


class Exchange(BaseModel):
    """One question and what came of it."""

    model_config = _STRICT

    question: str
    # Exactly what Orca 2 wrote; empty when moderation withheld it or the model failed first.
    answer: str
    system_message: str
    # Answered without the earlier turns (single-turn mode), or with them.
    single_turn: bool
    # As used: a sampled answer's seed is the one drawn, so the answer can be redone.
    settings: GenerationParams
    answer_ids: list[int] | None = None
    stats: Stats | None = None
    moderation: ModerationState = ModerationState.OFF
    withheld: str | None = None
    error: str | None = None

    @property
    def redoable(self) -> bool:
        """Whether its settings and seed redo this answer token for token: not for an answer sampled
        before sampling was seeded per request (its stats name no scheme), which drew from torch's
        shared generator in a way the app no longer runs."""
        return not (self.settings.do_sample and self.stats is not None and self.stats.sampling is None)

    @property
    def usable(self) -> bool:
        """Whether a later turn may send this one back to the model."""
        return self.withheld is None and bool(self.answer)

    @property
    def asked(self) -> Asked:
        """The question as its prompt was built: the earlier turns went with it unless single-turn."""
        answer = self.answer if self.usable else None
        return Asked(self.question, self.system_message, self.settings.max_new_tokens, not self.single_turn, answer)


class Conversation(BaseModel):
    model_config = _STRICT

    id: str = Field(default_factory=lambda: _new_id())
    created: str = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    exchanges: list[Exchange] = []

    @property
    def title(self) -> str:
        first = self.exchanges[0].question if self.exchanges else "New chat"
        line = " ".join(first.split())
        return line if len(line) <= 60 else line[:59] + "…"

    def history(self) -> list[Turn]:
        """The earlier turns a multi-turn question carries: moderation's and errors' notices never."""
        return [Turn(e.question, e.answer) for e in self.exchanges if e.usable]

    def within(self, max_exchanges: int) -> None:
        """Refuses (InvalidRequest) a conversation longer than the server shows and exports."""
        if len(self.exchanges) > max_exchanges:
            raise InvalidRequest(
                f"A chat of {len(self.exchanges):,} exchanges is longer than this server takes: at most "
                f"{max_exchanges:,} in one chat (--max-exchanges)."
            )

    def room_for_another(self, max_exchanges: int) -> None:
        """Refuses (InvalidRequest) a new question where the conversation is as long as the server
        takes, or fills the browser's room for chats."""
        if len(self.exchanges) >= max_exchanges:
            raise InvalidRequest(
                f"This chat has {len(self.exchanges):,} exchanges, the most this server keeps in one chat "
                "(--max-exchanges). Start a new chat to go on."
            )
        if self.stored_chars > FULL_CHAT * STORE_ROOM:
            raise InvalidRequest(
                f"This chat fills the room your browser has for chats ({_mb(STORE_ROOM)}). Start a new chat "
                "to go on; export this one (⤓ JSON) to keep it whole, since the oldest chats make way for new ones."
            )

    @property
    def stored_chars(self) -> int:
        """Its size in the browser's storage, on its own."""
        return stored_chars(json_size(self.model_dump()))


class Store(BaseModel):
    """Everything the browser keeps: the conversations, newest first, and which one is open."""

    model_config = _STRICT

    open: str | None = None
    conversations: list[Conversation] = []

    @classmethod
    def load(cls, value: object, settings: Settings) -> Store:
        """The store as the browser sent it; an unreadable one (an older format) starts afresh.

        A store over the server's caps is refused (InvalidRequest, naming the cap): its size before
        it is read, then its length. The browser sends it with every request, so a script can send
        anything; the page never sends more than a browser keeps."""
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        if size > settings.max_store_chars:
            raise InvalidRequest(
                f"Your browser sent {size:,} characters of conversations; this server reads at most "
                f"{settings.max_store_chars:,} (--max-store-chars)."
            )
        try:
            store = cls.model_validate(value or {})
        except ValidationError:
            return cls()
        if len(store.conversations) > MAX_KEPT:
            raise InvalidRequest(
                f"Your browser sent {len(store.conversations)} conversations; it keeps at most {MAX_KEPT}."
            )
        for conversation in store.conversations:
            conversation.within(settings.max_exchanges)
        return store

    def current(self) -> Conversation:
        """The open conversation; one emptied by Retry or Undo keeps its id (it is listed again once it
        has an exchange)."""
        for conversation in self.conversations:
            if conversation.id == self.open:
                return conversation
        return Conversation(id=self.open) if self.open else Conversation()

    def save(self, conversation: Conversation) -> Store:
        """The store with this conversation open and first in the list (fit says what the browser keeps)."""
        others = [c for c in self.conversations if c.id != conversation.id]
        kept = [conversation, *others] if conversation.exchanges else others
        return Store(open=conversation.id, conversations=kept)

    def save_imported(self, conversation: Conversation) -> Store:
        """The store with an imported conversation open. One whose id is taken by another chat gets a new
        id, so that both are kept; one too large for the browser is refused (InvalidRequest)."""
        if conversation.stored_chars > STORE_ROOM:
            raise InvalidRequest(
                f"This chat takes {conversation.stored_chars:,} characters of your browser's storage, more than "
                f"the {STORE_ROOM:,} it has for chats ({_mb(STORE_ROOM)}), so it can't be kept here."
            )
        if any(c.id == conversation.id and c != conversation for c in self.conversations):
            conversation = conversation.model_copy(update={"id": _new_id()})
        return self.save(conversation)

    def fit(self) -> tuple[Store, Room]:
        """The store as the browser can keep it: the oldest chats (never the open one) make way, past
        MAX_KEPT chats or STORE_ROOM. If the open chat alone is larger than the room, nothing is dropped
        (it can't be kept, and the browser goes on holding what it last saved)."""
        kept = list(self.conversations)
        sizes = [json_size(c.model_dump()) for c in kept]
        # The store's JSON: its fields around the conversations, and a comma between two.
        size = json_size(Store(open=self.open).model_dump()) + sum(sizes) + max(len(kept) - 1, 0)
        dropped = []
        for index in reversed(range(len(kept))):
            if len(kept) <= MAX_KEPT and stored_chars(size) <= STORE_ROOM:
                break
            if kept[index].id != self.open:
                size -= sizes[index] + 1
                dropped.append(kept.pop(index))
        used = stored_chars(size)
        if used > STORE_ROOM:
            return self, Room(stored_chars(json_size(self.model_dump())), overflowing=True)
        return Store(open=self.open, conversations=kept), Room(used, tuple(c.title for c in dropped))

    def delete(self, conversation_id: str | None) -> Store:
        kept = [c for c in self.conversations if c.id != conversation_id]
        return Store(open=None if self.open == conversation_id else self.open, conversations=kept)


@dataclass(frozen=True)
class Room:
    """How much of the browser's room for chats (STORE_ROOM) a store takes, and what didn't fit."""

    # Characters of storage.
    used: int
    # The titles of the oldest chats that made way, oldest last.
    dropped: tuple[str, ...] = ()
    # The open chat alone is larger than the room: the browser can't keep it.
    overflowing: bool = False

    @property
    def share(self) -> float:
        return self.used / STORE_ROOM


def json_size(value: object) -> int:
    """Bytes of UTF-8 in value's JSON as the browser writes it (JSON.stringify: compact, characters as
    they are)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def stored_chars(json_bytes: int) -> int:
    """Characters of localStorage that gr.BrowserState takes for a value whose JSON has this many bytes.
    It stores CryptoJS's AES encryption of the JSON: the IV in base64 (24 characters), a colon, then in
    base64 "Salted__", an 8-byte salt and the UTF-8 bytes padded to whole 16-byte blocks (a whole block
    more when they fill the last one): 4 characters for every 3 bytes."""
    encrypted = 16 + 16 * (json_bytes // 16 + 1)
    return 24 + 1 + 4 * math.ceil(encrypted / 3)


def json_room(chars: int) -> int:
    """The most bytes of JSON whose stored_chars fit in chars."""
    return (chars - 25) * 3 // 4 - 32


def _mb(chars: int) -> str:
    """Room in characters of storage as the megabytes of text it holds."""
    return f"about {json_room(chars) / 1e6:.1f} MB"


def _new_id() -> str:
    return secrets.token_hex(8)


def answer_keys(exchanges: Sequence[Exchange]) -> list[str]:
    """Each answer's key in LookedAt: a digest of what its token probabilities follow from (the
    system message, the earlier turns it was sent with, the question, and the answer's ids or text).
    The earlier turns enter as a running digest, so the keys of a conversation take time in step with it."""
    keys, earlier = [], hashlib.sha256()
    for e in exchanges:
        carried = "" if e.single_turn else earlier.hexdigest()
        scored = [e.system_message, carried, e.question, e.answer, e.answer_ids]
        keys.append(hashlib.sha256(json.dumps(scored).encode()).hexdigest()[:32])
        if e.usable:
            earlier.update(json.dumps([e.question, e.answer]).encode())
    return keys


class LookedAt(BaseModel):
    """The token probabilities the visitor looked at, by answer (answer_keys), newest first, for the
    exports. Kept apart from the conversations: scoring an earlier answer while the next one streams
    must never write an older copy of the conversation over the one being recorded."""

    model_config = _STRICT

    answers: list[tuple[str, list[ScoredToken]]] = []

    @classmethod
    def load(cls, value: object) -> LookedAt:
        try:
            return cls.model_validate(value or {})
        except ValidationError:
            return cls()

    def add(self, key: str, tokens: list[ScoredToken]) -> LookedAt:
        """With this answer's tokens first; the oldest go past MAX_KEPT_SCORED_TOKENS in all, or past
        LOOKED_AT_ROOM in the browser's storage (then not even this one's may be kept: kept says)."""
        kept, budget, room = [], MAX_KEPT_SCORED_TOKENS, json_room(LOOKED_AT_ROOM) - json_size(LookedAt().model_dump())
        for answer in [(key, tokens), *(a for a in self.answers if a[0] != key)]:
            size = json_size([answer[0], [t.model_dump() for t in answer[1]]]) + 1
            if len(answer[1]) <= budget and size <= room:
                kept.append(answer)
                budget, room = budget - len(answer[1]), room - size
        return LookedAt(answers=kept)

    def kept(self, key: str) -> bool:
        """Whether this answer's tokens are kept (for the exports)."""
        return any(k == key for k, _ in self.answers)

    def tokens(self, exchanges: Sequence[Exchange]) -> list[list[ScoredToken] | None]:
        """The tokens looked at of each of these answers (None: not looked at)."""
        looked = dict(self.answers)
        return [looked.get(key) for key in answer_keys(exchanges)]

    def with_imported(self, exchanges: Sequence[Exchange], tokens: Sequence[list[ScoredToken] | None]) -> LookedAt:
        looked = self
        for key, scored in zip(answer_keys(exchanges), tokens):
            looked = looked if scored is None else looked.add(key, scored)
        return looked


class _Exported(BaseModel):
    """What a reader of an export needs to judge or redo it: the model, its weights and the app."""

    model_config = _STRICT

    format: str
    version: int
    app_version: str = __version__
    model: str
    weights: str
    backend: str
    exported: str = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


class _MadeBy(TypedDict):
    model: str
    weights: str
    backend: str


def _made_by(info: ModelInfo) -> _MadeBy:
    if info.served_by:
        backend = f"inference server at {info.served_by}"
    else:
        backend = f"{info.runtime}, {info.device}" if info.runtime else f"local ({info.device})"
    return _MadeBy(model=info.name, weights=info.quantization, backend=backend)


class EarlierTurns(BaseModel):
    """Where a multi-turn prompt carried earlier turns: at index `at` of its prompt_ids go the turn_ids
    of every exchange numbered `first` (counting from 1) up to this one that has turn_ids."""

    model_config = _STRICT

    first: int = Field(ge=1)
    at: int = Field(ge=0)


class ExportedExchange(Exchange):
    # The exact ids the model read, recomputed when exporting (they follow from the record); without the
    # earlier turns, where earlier_turns says they go.
    prompt_ids: list[int]
    earlier_turns: EarlierTurns | None = None
    # This exchange's question and answer as a later prompt carried them (where one did).
    turn_ids: list[int] | None = None
    # The answer's token probabilities, if the visitor looked at them.
    tokens: list[ScoredToken] | None = None


class Export(_Exported):
    """A conversation, exchange by exchange."""

    format: Literal["orca2-space/conversation"] = FORMAT
    # 1: each prompt_ids held the whole prompt, earlier turns and all.
    version: Literal[1, 2] = FORMAT_VERSION
    conversation_id: str
    created: str
    exchanges: list[ExportedExchange]

    def prompt_ids_of(self, index: int) -> list[int]:
        """The whole prompt the model read for the exchange at index (from 0), earlier turns included."""
        e = self.exchanges[index]
        if e.earlier_turns is None:
            return e.prompt_ids
        at, carried = e.earlier_turns.at, self.exchanges[e.earlier_turns.first - 1 : index]
        return e.prompt_ids[:at] + [i for c in carried for i in c.turn_ids or ()] + e.prompt_ids[at:]


def export(conversation: Conversation, info: ModelInfo, prompts: ConversationPrompts, looked: LookedAt) -> Export:
    """The conversation with the prompts Chat.prompts gave for its exchanges (an exchange whose prompt
    the server would refuse exports no ids) and the token probabilities looked at."""
    exchanges = []
    tokens = looked.tokens(conversation.exchanges)
    for index, (e, prompt, scored) in enumerate(zip(conversation.exchanges, prompts.prompts, tokens)):
        carried = None if prompt is None or prompt.first is None else EarlierTurns(first=prompt.first + 1, at=prompt.at)
        exchanges.append(
            ExportedExchange(
                **e.model_dump(),
                prompt_ids=[] if prompt is None else prompt.ids,
                earlier_turns=carried,
                turn_ids=prompts.turn_ids.get(index),
                tokens=scored,
            )
        )
    return Export(**_made_by(info), conversation_id=conversation.id, created=conversation.created, exchanges=exchanges)


class ComparedAnswer(BaseModel):
    """One column of a comparison: the system message it was asked under, and what came of it."""

    model_config = _STRICT

    # The preset whose system message this is, or "typed" for one of the visitor's own.
    preset: str
    system_message: str
    prompt_ids: list[int]
    answer: str
    answer_ids: list[int] | None = None
    stats: Stats | None = None
    moderation: ModerationState = ModerationState.OFF
    withheld: str | None = None
    error: str | None = None
    tokens: list[ScoredToken] | None = None


class ComparisonExport(_Exported):
    """One question answered under several system messages, single turn, with the same settings (and
    the same seed when sampling)."""

    format: Literal["orca2-space/comparison"] = COMPARISON_FORMAT
    version: Literal[1] = COMPARISON_FORMAT_VERSION
    question: str
    settings: GenerationParams
    answers: list[ComparedAnswer] = Field(min_length=COMPARED.start, max_length=COMPARED.stop - 1)


_E = TypeVar("_E", bound=_Exported)
_COMPARED_FIELDS = set(ComparedAnswer.model_fields) - {"preset", "prompt_ids", "tokens"}


def export_comparison(
    answers: Sequence[Exchange], info: ModelInfo, prompt_ids: list[list[int]], looked: LookedAt
) -> ComparisonExport:
    """A comparison as the page keeps it (one exchange per column, all of one question and settings)."""
    columns = [
        ComparedAnswer(
            **e.model_dump(include=_COMPARED_FIELDS), preset=preset_of(e.system_message), prompt_ids=ids, tokens=scored
        )
        for e, ids, scored in zip(answers, prompt_ids, looked.tokens(answers))
    ]
    first = answers[0]
    return ComparisonExport(**_made_by(info), question=first.question, settings=first.settings, answers=columns)


def parse_export(text: str | bytes, looked: LookedAt, max_exchanges: int) -> tuple[Conversation, LookedAt]:
    """A conversation from an exported JSON file (either version), and what the browser has looked at
    with the file's token probabilities added; InvalidRequest says what is wrong with the file, or that
    it is longer than the server takes."""
    exported = _parsed(Export, text, "a conversation")
    exported_only = {"prompt_ids", "earlier_turns", "turn_ids", "tokens"}
    exchanges = [Exchange(**e.model_dump(exclude=exported_only)) for e in exported.exchanges]
    conversation = Conversation(id=exported.conversation_id, created=exported.created, exchanges=exchanges)
    conversation.within(max_exchanges)
    return conversation, looked.with_imported(exchanges, [e.tokens for e in exported.exchanges])


def parse_comparison(text: str | bytes, looked: LookedAt) -> tuple[list[Exchange], LookedAt]:
    """A comparison from an exported JSON file, as the page keeps it (one exchange per column), and
    what the browser has looked at with the file's token probabilities added."""
    exported = _parsed(ComparisonExport, text, "a comparison")
    answers = [
        Exchange(
            **a.model_dump(include=_COMPARED_FIELDS),
            question=exported.question,
            single_turn=True,
            settings=exported.settings,
        )
        for a in exported.answers
    ]
    return answers, looked.with_imported(answers, [a.tokens for a in exported.answers])


def _parsed(kind: type[_E], text: str | bytes, what: str) -> _E:
    try:
        return kind.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors()[:3])
        other = _format_of(text)
        if other in (FORMAT, COMPARISON_FORMAT) and other != kind.model_fields["format"].default:
            problems = f"it is {'a conversation' if other == FORMAT else 'a comparison'}"
        raise InvalidRequest(f"This is not {what} exported from this app ({problems}).") from None


def _format_of(text: str | bytes) -> object:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get("format") if isinstance(data, dict) else None


def to_markdown(conversation: Conversation, info: ModelInfo, looked: LookedAt) -> str:
    """The conversation for reading: each question and answer verbatim, in fenced blocks, and a line
    on the token probabilities looked at."""
    made_by = _made_by(info)
    lines = [
        f"# Orca 2 conversation ({conversation.created})",
        "",
        f"Model: {made_by['model']} · {made_by['weights']} · {made_by['backend']} · orca2-space {__version__}",
    ]
    tokens = looked.tokens(conversation.exchanges)
    for number, (e, scored) in enumerate(zip(conversation.exchanges, tokens), 1):
        mode = "single turn" if e.single_turn else "with the earlier turns"
        how = f"seed {e.settings.seed}" if e.settings.do_sample else "greedy"
        lines += ["", f"## {number}. Question ({mode}, {how})", "", _fenced(e.question)]
        lines += [] if e.redoable else ["", f"> {NOT_REDOABLE}"]
        lines += ["", "System message:", "", _fenced(e.system_message)]
        lines += ["", "Answer:", "", _fenced(e.answer)]
        lines += [f"\n> {notice}" for notice in (e.withheld, e.error) if notice]
        if scored:
            lines += ["", _scored_summary(scored)]
    return "\n".join(lines) + "\n"


def _scored_summary(tokens: list[ScoredToken], shown: int = 3) -> str:
    """A line on the token probabilities looked at; every number is in the JSON export."""
    least = sorted(tokens, key=lambda t: t.probability)[:shown]
    listed = ", ".join(f"{json.dumps(t.text, ensure_ascii=False)} {t.probability:.2%}" for t in least)
    return f"Token probabilities (all in the JSON export): {len(tokens)} tokens; the least likely: {listed}."


def _fenced(text: str) -> str:
    """Text in a code fence longer than any run of backticks in it, so that it reads verbatim."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}\n{text}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    run = best = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        best = max(best, run)
    return best

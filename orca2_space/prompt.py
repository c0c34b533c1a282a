"""Orca 2's ChatML prompt: rendering, exact encoding, truncation, and decoding of answers.

Ids must equal what the model card's code produced (the slow ``LlamaTokenizer`` of transformers
4.35, ``legacy=False``). transformers 5 can no longer produce them, so the rule is rebuilt here on
the SentencePiece model itself:

* the whole text is prefixed with "▁", which becomes the lone piece 29871 before the first
  ``<|im_start|>``;
* text between control tokens is encoded with no dummy prefix; a chunk that starts with a space
  is encoded behind "<unk>" whose pieces are then dropped, so the space stays a plain "▁";
* ``<|im_start|>``/``<|im_end|>`` ids come only from the template. The same characters inside a
  message are ordinary text, so no message can open or close a role.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import sentencepiece
from sentencepiece import sentencepiece_model_pb2

UNK, BOS, EOS = 0, 1, 2
PAD, IM_START, IM_END = 32000, 32001, 32002
CONTROL_TEXT = {IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
# <|im_end|> ends Orca 2's turn, </s> ends its text, and a new <|im_start|> can only mean the turn
# is over: generation stops on any of them.
STOP_IDS = (IM_END, EOS, IM_START)
# Ids that are never text: they are not shown even if a model emits them.
NON_TEXT_IDS = frozenset({UNK, BOS, EOS, PAD, IM_START, IM_END})

SPIECE_UNDERLINE = "▁"
DEFAULT_CONTEXT_LENGTH = 4096


@dataclass(frozen=True)
class Turn:
    """One finished exchange: what the user asked and what Orca 2 answered."""

    user: str
    assistant: str


@dataclass(frozen=True)
class Prompt:
    """The exact text and ids the model sees, and how many old turns were left out to fit."""

    text: str
    input_ids: list[int]
    dropped_turns: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Frame:
    """A prompt without its earlier turns: they go between head and tail, as many as room holds."""

    # <s>, "▁" and the system message.
    head: list[int]
    # The new user message and "<|im_start|>assistant", which the answer follows.
    tail: list[int]
    # Ids left for earlier turns, once the answer's max_new_tokens are set aside.
    room: int


@dataclass(frozen=True)
class Asked:
    """One question of a conversation, as its prompt was built (see Chat.prompts)."""

    message: str
    system_message: str
    max_new_tokens: int
    # Multi-turn: the prompt carried the earlier turns that fit.
    with_history: bool
    # What later prompts carry with the question: its answer; None where they leave it out (withheld, failed).
    answer: str | None


@dataclass(frozen=True)
class CarriedPrompt:
    """One prompt of a conversation, its earlier turns named, not repeated: the ids the model read
    are ids[:at], then the turn ids of every question from index `first` on that has an answer to
    carry, then ids[at:]."""

    ids: list[int]
    at: int
    # The index of the oldest question carried; None where the prompt carried no earlier turn.
    first: int | None


@dataclass(frozen=True)
class ConversationPrompts:
    """The prompts of a conversation's questions, each earlier turn's ids held once."""

    # One per question: None where the server refuses to build it.
    prompts: list[CarriedPrompt | None]
    # The ids of each question (by index) that a later prompt carried, as it carried them.
    turn_ids: dict[int, list[int]]


class PromptTooLong(ValueError):
    """The system message and the new message alone leave no room for the answer."""


class OrcaTokenizer:
    """Encodes ChatML conversations exactly as the reference and decodes generated ids."""

    def __init__(self, model_file: str | os.PathLike):
        # A protobuf class, made when the module is imported: the type checker can't see it.
        proto = sentencepiece_model_pb2.ModelProto()  # pyright: ignore[reportAttributeAccessIssue]
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
        # The slow tokenizer (legacy=False) loads the model this way and adds "▁" itself.
        proto.normalizer_spec.add_dummy_prefix = False
        self._load(proto.SerializeToString())

    def _load(self, model_proto: bytes) -> None:
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self._n_pieces = self._sp.get_piece_size()
        self._unk_prefix_len = len(self._sp.encode("<unk>"))

    def __reduce__(self):
        # Pickled as the sentencepiece model it loaded: the model's process sends the web server's
        # process its own (backends/local/process.py), so the file is read once.
        return _tokenizer_of, (self._sp.serialized_model_proto(),)

    @classmethod
    def for_model(cls, model: str) -> OrcaTokenizer:
        """The tokenizer of a local model folder or of a hub repository (through the HF cache)."""
        if os.path.isdir(model):
            return cls(os.path.join(model, "tokenizer.model"))
        from huggingface_hub import hf_hub_download

        return cls(hf_hub_download(model, "tokenizer.model"))

    def encode_text(self, text: str) -> list[int]:
        """Ids of text that contains no control tokens (every character is plain text)."""
        if not text:
            return []
        if text.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp.encode("<unk>" + text)[self._unk_prefix_len :]
        return self._sp.encode(text)

    def _message(self, role: str, content: str) -> list[int]:
        # "▁" in a message is read as a space, as the reference tokenizer does.
        text = f"{role}\n{content.replace(SPIECE_UNDERLINE, ' ')}"
        return [IM_START, *self.encode_text(text), IM_END, *self.encode_text("\n")]

    def turn_ids(self, turn: Turn) -> list[int]:
        """An earlier turn as every later prompt carries it: the same ids wherever it sits."""
        return self._message("user", turn.user) + self._message("assistant", turn.assistant)

    def frame(
        self, system: str, user: str, *, max_new_tokens: int = 0, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> Frame:
        """What the prompt for a new user message holds around its earlier turns, and the room left
        for them; PromptTooLong where there is none."""
        head = [BOS, *self.encode_text(SPIECE_UNDERLINE), *self._message("system", system)]
        tail = [*self._message("user", user), IM_START, *self.encode_text("assistant")]
        room = context_length - max_new_tokens - len(head) - len(tail)
        if room < 0:
            raise PromptTooLong(
                f"The message is {len(tail)} tokens and the system message {len(head)}; with "
                f"{max_new_tokens} new tokens that exceeds Orca 2's {context_length}-token context. "
                "Shorten the message or the system message, or lower max new tokens."
            )
        return Frame(head, tail, room)

    def build(
        self,
        system: str,
        history: list[Turn],
        user: str,
        *,
        max_new_tokens: int = 0,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> Prompt:
        """The prompt for a new user message, leaving room for max_new_tokens.

        Oldest whole turns are dropped until it fits; the system message and the new message
        are never cut. Turns are encoded newest first, up to the first that no longer fits: the
        cost follows what the prompt holds, not how long the history is.
        """
        frame = self.frame(system, user, max_new_tokens=max_new_tokens, context_length=context_length)
        kept: list[list[int]] = []
        used = 0
        for turn in reversed(history):
            ids = self.turn_ids(turn)
            used += len(ids)
            if used > frame.room:
                break
            kept.append(ids)
        dropped = len(history) - len(kept)
        ids = frame.head + [i for turn in reversed(kept) for i in turn] + frame.tail
        return Prompt(render(system, history[dropped:], user), ids, dropped)

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids; control ids are not text and are left out."""
        return self._sp.decode([i for i in ids if i not in NON_TEXT_IDS and i < self._n_pieces])

    @property
    def vocab_size(self) -> int:
        """How many ids there are: SentencePiece's pieces, then [PAD], <|im_start|>, <|im_end|>."""
        return max(self._n_pieces, IM_END + 1)

    def piece_text(self, token_id: int) -> str:
        """One id on its own as a reader would see it, for listing alternatives: "▁" as a space, a
        byte piece as its character when it is a whole one (else as the piece, "<0xE2>"), and a
        control id as its control text ("<|im_end|>": ending the turn is an alternative too)."""
        if token_id in CONTROL_TEXT:
            return CONTROL_TEXT[token_id]
        if token_id == PAD:
            return "[PAD]"
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            byte = int(piece[3:-1], 16)
            return chr(byte) if byte < 0x80 else piece
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return piece
        return piece.replace(SPIECE_UNDERLINE, " ")


def _tokenizer_of(model_proto: bytes) -> OrcaTokenizer:
    tokenizer = OrcaTokenizer.__new__(OrcaTokenizer)
    tokenizer._load(model_proto)
    return tokenizer


def render(system: str, history: list[Turn], user: str) -> str:
    """The ChatML text of a conversation, as the model card writes it."""
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for turn in history:
        parts.append(f"<|im_start|>user\n{turn.user}<|im_end|>\n")
        parts.append(f"<|im_start|>assistant\n{turn.assistant}<|im_end|>\n")
    parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant")
    return "".join(parts)


def answer_text(generated: str) -> str:
    """The answer as shown and kept: the prompt ends at "assistant", so the model's first
    character is the newline that ends its role line, which belongs to the template."""
    return generated.removeprefix("\n")


class StreamDecoder:
    """Turns generated ids into text deltas, holding back bytes of an unfinished UTF-8 character."""

    # A byte-fallback character takes at most 4 ids; past that, show what there is.
    _MAX_PENDING = 8

    def __init__(self, tokenizer: OrcaTokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self._MAX_PENDING:
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self._tokenizer.decode(self._pending)
        self._pending.clear()
        return text

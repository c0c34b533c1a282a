"""Token probabilities of a finished answer: how likely the model found each token it wrote, and
what else it might have written there.

The answer is re-scored, not remembered: the exact prompt it was written for plus its ids go
through the model in one forward pass (Backend.score), so the numbers are exact for the tokens
actually written, however they were chosen (greedy, sampled, batched or not). They are the model's
own distribution, at temperature 1, whatever the sampling settings were.

Which ids: `answer_ids` exactly, when given (/chat returns them); otherwise the answer's text is
encoded. Orca 2's answer starts with the newline that ends its "assistant" role line (the prompt
stops at "assistant"); the answer as shown has it removed (prompt.answer_text), so the text is
encoded with that newline put back in front: "\\n" + answer. The newline is always a token of its
own (<0x0A>: no SentencePiece piece holds a newline), so for an answer written the usual way this
gives the ids the model wrote; a model may also write a text in pieces that the tokenizer would
split differently, and then only answer_ids score what it really wrote.

Nothing here imports gradio or torch.
"""

from __future__ import annotations

from typing import Any

from .backends.contract import TokenProbability
from .chat import Chat
from .conversation import ScoredToken
from .fairness import Visitor
from .prompt import OrcaTokenizer, PromptTooLong, StreamDecoder, answer_text
from .settings import InvalidRequest

# The newline that ends Orca 2's role line: the first thing it writes, left out of the answer as shown.
ROLE_LINE_END = "\n"
# How many characters one token can stand for at most, to refuse a text past any context before encoding it.
MAX_CHARS_PER_TOKEN = 32


def token_probabilities(
    chat: Chat,
    message: Any,
    system_message: Any,
    history: Any,
    answer: Any,
    answer_ids: Any = None,
    top: int = 5,
    visitor: Visitor | None = None,
) -> list[TokenProbability]:
    """The probabilities of the answer's tokens, from untrusted values (as /chat takes them: history
    is the list of {"role", "content"} messages that was sent with the message). Raises
    InvalidRequest with a clear message, and ScoringUnavailable where the backend can't score.
    A scoring is a request of the visitor's fair share, like an answer: fairness.Refused over it."""
    with chat.fair_share.admit(visitor):
        return _token_probabilities(chat, message, system_message, history, answer, answer_ids, top)


def _token_probabilities(
    chat: Chat, message: Any, system_message: Any, history: Any, answer: Any, answer_ids: Any, top: int
) -> list[TokenProbability]:
    if answer is not None and not isinstance(answer, str):
        raise InvalidRequest(f"answer must be text, got {type(answer).__name__}")
    if answer is None and answer_ids is None:
        raise InvalidRequest("Give the answer (its text), or its answer_ids, or both.")
    backend = chat.backend
    context = backend.info.context_length
    ids = _ids(answer_ids, backend.tokenizer.vocab_size, context)
    if ids is None:
        text = answer or ""  # given, since answer_ids were not
        if len(text) > context * MAX_CHARS_PER_TOKEN:
            raise InvalidRequest(f"The answer is {len(text):,} characters, more than Orca 2's context can hold.")
        ids = backend.tokenizer.encode_text(ROLE_LINE_END + text) if text else []
    try:
        prompt = chat.prompt_for(message, system_message, history, max_new_tokens=len(ids))
    except PromptTooLong as error:
        raise InvalidRequest(_too_long(None, len(ids), context)) from error
    if prompt.n_tokens + len(ids) > context:
        raise InvalidRequest(_too_long(prompt.n_tokens, len(ids), context))
    if answer is not None and answer_ids is not None:
        written = answer_text(_text(backend.tokenizer, ids))
        if written != answer:
            raise InvalidRequest(
                f"answer_ids spell {_clip(written)}, not the answer given ({_clip(answer)}); "
                "send the ids and the answer of the same reply, or only one of them."
            )
    return backend.score(prompt, ids, top) if ids else []


def _text(tokenizer: OrcaTokenizer, ids: list[int]) -> str:
    """The text these ids stream as (what /chat's answer is made of)."""
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


def _ids(answer_ids: Any, vocab_size: int, context: int) -> list[int] | None:
    if answer_ids is None:
        return None
    if not isinstance(answer_ids, list):
        raise InvalidRequest(f"answer_ids must be a list of token ids or null, got {type(answer_ids).__name__}")
    if len(answer_ids) > context:
        raise InvalidRequest(f"answer_ids has {len(answer_ids):,} ids, more than Orca 2's {context}-token context.")
    for index, token in enumerate(answer_ids):
        if not isinstance(token, int) or isinstance(token, bool):
            raise InvalidRequest(f"answer_ids[{index}] must be a whole number, got {type(token).__name__}")
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"answer_ids[{index}] is {token}, not a token id (0 to {vocab_size - 1}).")
    return list(answer_ids)


def _too_long(prompt_tokens: int | None, answer_tokens: int, context: int) -> str:
    prompt = "The prompt" if prompt_tokens is None else f"The prompt ({prompt_tokens} tokens)"
    return f"{prompt} and the answer ({answer_tokens} tokens) don't fit Orca 2's {context}-token context together."


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def as_api_dict(tokens: list[TokenProbability]) -> dict[str, Any]:
    """/token_probabilities' answer: {"tokens": [{"id", "text", "probability", "top": [{"id", "text",
    "probability"}, ...]}, ...]}, probabilities to 6 significant digits (as an export keeps them)."""
    return {"tokens": [ScoredToken.of(token).model_dump() for token in tokens]}

"""Token probabilities on the page and in the API: a finished answer, each token coloured by the
probability the model gave it; clicking a token, or focusing it with the keyboard, shows the 5
tokens the model found most likely there.

`token_view(tokens, caption)` is HTML for a gr.HTML component, styled by `TOKEN_CSS` (which the page
adds to its CSS). It runs no script and loads nothing: the alternatives open with CSS :focus alone,
and every character of the answer is html-escaped and shown exactly (white-space: pre-wrap); marks
that make a newline or an unfinished character clickable are CSS ::before content, so copying the
text gives the answer exactly. `add_token_endpoint(chat)` registers /token_probabilities.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.events import api

from ..backends.contract import GenerationError, ScoringUnavailable, TokenProbability
from ..chat import Chat, system_message_for
from ..conversation import Conversation, ScoredToken
from ..fairness import Refused, Visitor
from ..scoring import as_api_dict, token_probabilities
from ..settings import InvalidRequest
from .adapters import SCORING_CONCURRENCY, history_messages, visitor_errors, visitor_of

NOTE = (
    "These are the model's own probabilities (temperature 1) for the tokens it wrote, whatever the sampling "
    "settings were. Click a token, or move to it with Tab, to see the 5 tokens it found most likely there."
)
# Lowest probability of each colour band, most likely first; the class is the band's.
BANDS = ((0.9, "p4", "90% or more"), (0.5, "p3", "50 to 90%"), (0.1, "p2", "10 to 50%"), (0.01, "p1", "1 to 10%"))
LOWEST_BAND = ("p0", "under 1%")

# Translucent colours over the theme's own background and text, so both stay legible in light and
# dark themes; the least likely tokens are also underlined, for readers who can't tell the colours apart.
TOKEN_CSS = """
.orca-tokens .tok-note { margin: 0 0 0.4em; font-size: 0.9em; opacity: 0.85; }
.orca-tokens .tok-caption { font-weight: 600; margin-bottom: 0.2em; }
.orca-tokens .tok-legend { display: flex; flex-wrap: wrap; gap: 0.3em 0.6em; margin: 0 0 0.6em; font-size: 0.85em; }
.orca-tokens .tok-key { padding: 0 0.35em; border-radius: 3px; }
.orca-tokens .tok-answer { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.7; }
.orca-tokens .tok { position: relative; border-radius: 2px; cursor: pointer;
  box-shadow: inset -1px 0 0 rgba(128, 128, 128, 0.35); }
.orca-tokens .p4 { background: rgba(34, 197, 94, 0.18); }
.orca-tokens .p3 { background: rgba(132, 204, 22, 0.30); }
.orca-tokens .p2 { background: rgba(234, 179, 8, 0.38); }
.orca-tokens .p1 { background: rgba(249, 115, 22, 0.42); }
.orca-tokens .p0 { background: rgba(239, 68, 68, 0.45); }
.orca-tokens .tok.p0, .orca-tokens .tok.p1 { text-decoration: underline dotted; }
.orca-tokens .tok.nl::before { content: "\\21B5"; opacity: 0.6; }
.orca-tokens .tok.part::before { content: "\\00B7"; opacity: 0.6; }
.orca-tokens .tok.ws { outline: 1px dashed rgba(128, 128, 128, 0.6); outline-offset: -1px; }
.orca-tokens .tok:focus { outline: 2px solid #6366f1; outline-offset: 0; z-index: 2; }
.orca-tokens .tok-alts { display: none; position: absolute; left: 0; top: 100%; z-index: 20; min-width: 14em; max-width: min(24em, 80vw);
  margin-top: 2px; padding: 0.4em 0.6em; white-space: normal; line-height: 1.4; font-size: 0.9em;
  text-decoration: none; user-select: none; cursor: auto;
  background: var(--background-fill-primary, #fff); color: var(--body-text-color, inherit);
  border: 1px solid var(--border-color-primary, #888); border-radius: 6px; box-shadow: 0 4px 12px rgba(0, 0, 0, 0.25); }
.orca-tokens .tok:focus > .tok-alts, .orca-tokens .tok:focus-within > .tok-alts { display: block; }
.orca-tokens .tok-alts-head { display: block; margin-bottom: 0.2em; }
.orca-tokens .tok-alt { display: flex; justify-content: space-between; gap: 1em; padding: 0 0.25em; }
.orca-tokens .tok-alt.chosen { font-weight: 600; outline: 1px solid rgba(99, 102, 241, 0.6); border-radius: 3px; }
.orca-tokens .tok-alts code { white-space: pre; }
/* Where the browser can place a box by another (CSS anchor positioning), the alternatives of a token
   near the screen's right edge or its bottom open to its left or above it; elsewhere they open below
   it, to its right. The @supports is nested in the rule because Gradio keeps only plain rules and
   @media from a page's CSS. */
.orca-tokens .tok:focus, .orca-tokens .tok:focus-within { anchor-name: --orca-token; }
.orca-tokens .tok-alts {
  @supports (position-try-fallbacks: flip-inline) {
    position: fixed; position-anchor: --orca-token; left: anchor(left); top: anchor(bottom);
    position-try-fallbacks: flip-inline, flip-block, flip-block flip-inline;
  }
}
@media (max-width: 640px) {
  /* A phone has no room beside a token: the alternatives open as a sheet along the bottom of the
     screen, whatever the token's place. */
  .orca-tokens .tok-alts { position: fixed; left: 0.5em; right: 0.5em; top: auto; bottom: 0.5em;
    min-width: 0; max-width: none; position-try-fallbacks: none; }
}
"""

_view_ids = itertools.count()
# Characters an alternative's text shows as visible marks (it is shown out of context).
_MARKS = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥", " ": "␣"})


def percent(probability: float) -> str:
    """As a reader sees it: 61.2%, 0.0061%, < 0.0001%."""
    value = probability * 100
    if value >= 1:
        return f"{value:.1f}%"
    if value >= 0.0001:
        return f"{value:.2g}%"
    return "< 0.0001%"


def band(probability: float) -> str:
    return next((name for lowest, name, _ in BANDS if probability >= lowest), LOWEST_BAND[0])


def _shown(text: str) -> str:
    """A token's text out of its context: whitespace as marks, other control characters escaped."""
    if not text:
        return "(part of a character)"
    marked = text.translate(_MARKS)
    return "".join(c if c.isprintable() or c in "↵␍⇥␣" else f"\\x{ord(c):02x}" for c in marked)


def _spoken(text: str) -> str:
    """A token's text for a screen reader."""
    if not text:
        return "part of a character"
    if not text.strip():
        return "newline" if "\n" in text else "space" if text == " " else "whitespace"
    return text


def _classes(token: TokenProbability) -> str:
    classes = ["tok", band(token.probability)]
    if not token.text:
        classes.append("part")
    elif "\n" in token.text and not token.text.strip():
        classes.append("nl")
    elif not token.text.strip():
        classes.append("ws")
    return " ".join(classes)


def _escape(text: str) -> str:
    """Text as HTML, on one line: newlines and tabs as character references."""
    return html.escape(text, quote=True).replace("\r", "&#13;").replace("\n", "&#10;").replace("\t", "&#9;")


def _alternatives(token: TokenProbability, popup_id: str) -> str:
    rows = [
        f'<span class="tok-alt{" chosen" if alt.id == token.id else ""}"><code>{_escape(_shown(alt.text))}</code>'
        f"<span>{percent(alt.probability)}</span></span>"
        for alt in token.top
    ]
    ranked = any(alt.id == token.id for alt in token.top)
    written = f"Written: <code>{_escape(_shown(token.text))}</code> {percent(token.probability)}"
    if not ranked:
        written += f", not among the {len(token.top)} most likely"
    return (
        f'<span class="tok-alts" id="{popup_id}" role="tooltip"><span class="tok-alts-head">{written}</span>'
        f'<span class="tok-alts-head">Most likely here:</span>{"".join(rows)}</span>'
    )


def _token(token: TokenProbability, popup_id: str) -> str:
    label = f"{_spoken(token.text)}, {percent(token.probability)}"
    return (
        f'<span class="{_classes(token)}" tabindex="0" role="button" aria-label="{_escape(label)}" '
        f'aria-describedby="{popup_id}"><span class="tok-text">{_escape(token.text)}</span>'
        f"{_alternatives(token, popup_id)}</span>"
    )


def _legend() -> str:
    keys = [f'<span class="tok-key {name}">{words}</span>' for _, name, words in BANDS]
    keys.append(f'<span class="tok-key {LOWEST_BAND[0]}">{LOWEST_BAND[1]}</span>')
    return f'<div class="tok-legend"><span>Colour: the probability of the token written.</span>{"".join(keys)}</div>'


def _frame(caption: str, body: str) -> str:
    head = f'<div class="tok-caption">{_escape(caption)}</div>' if caption else ""
    return f'<div class="orca-tokens">{head}{body}</div>'


def token_view(tokens: Sequence[TokenProbability], caption: str = "") -> str:
    """The answer's tokens coloured by probability, each with its alternatives on click or focus."""
    if not tokens:
        return _frame(caption, '<p class="tok-note">The answer has no tokens to show.</p>')
    view = f"tokv{next(_view_ids)}"
    spans = "".join(_token(token, f"{view}-{n}") for n, token in enumerate(tokens))
    return _frame(caption, f'<p class="tok-note">{_escape(NOTE)}</p>{_legend()}<div class="tok-answer">{spans}</div>')


def message_view(caption: str, message: str) -> str:
    """In place of the tokens: why there are none (unavailable on this backend, a bad request)."""
    return _frame(caption, f'<p class="tok-note">{_escape(message)}</p>')


@dataclass(frozen=True)
class TokenView:
    """What the page shows of an answer's token probabilities, and the tokens, to keep for the exports
    (None when there are none: the view says why)."""

    html: str
    tokens: list[ScoredToken] | None = None


def view_for(
    chat: Chat,
    message: str,
    system_message: str,
    history: list[dict] | None,
    answer: str | None,
    answer_ids: Sequence[int] | None,
    caption: str,
    visitor: Visitor,
) -> TokenView:
    """For the page: the token view of an answer, or a message saying why there is none."""
    try:
        ids = None if answer_ids is None else list(answer_ids)
        tokens = token_probabilities(chat, message, system_message, history, answer, ids, visitor=visitor)
    except (ScoringUnavailable, Refused) as error:
        return TokenView(message_view(caption, str(error)))
    except (InvalidRequest, GenerationError) as error:
        return TokenView(message_view(caption, f"Token probabilities could not be computed: {error}"))
    return TokenView(token_view(tokens, caption), [ScoredToken.of(token) for token in tokens])


def token_view_of(chat: Chat, conversation: Conversation, index: int, caption: str, visitor: Visitor) -> TokenView:
    """The token probabilities of an exchange's answer, scored on the prompt it was written for."""
    e = conversation.exchanges[index]
    if not e.answer:
        return TokenView(message_view(caption, "This answer has no text to score."))
    history = [] if e.single_turn else history_messages(Conversation(exchanges=conversation.exchanges[:index]))
    return view_for(chat, e.question, e.system_message, history, e.answer, e.answer_ids, caption, visitor)


def add_token_endpoint(chat: Chat) -> None:
    """Register /token_probabilities (call it inside the Blocks, as api.add_endpoints is)."""

    @visitor_errors
    def token_probabilities_endpoint(
        request: gr.Request,
        message: str,
        system_message: str | None = None,
        history: list[dict] | None = None,
        answer: str | None = None,
        answer_ids: list[int] | None = None,
    ) -> dict[str, Any]:
        """The probability Orca 2 gave each token of a finished answer (temperature 1: the model's own
        distribution, whatever the answer was sampled with) and the 5 most likely tokens at each position.
        message, system_message (None: the model card's cautious message) and history as sent to /chat;
        answer_ids: the answer's ids as /chat returned them, scored exactly; without them answer (its text)
        is encoded. Returns {"tokens": [{"id", "text", "probability", "top": [{"id", "text", "probability"}]}]}."""
        system = system_message_for(system_message, None)
        tokens = token_probabilities(chat, message, system, history, answer, answer_ids, visitor=visitor_of(request))
        return as_api_dict(tokens)

    api(token_probabilities_endpoint, api_name="token_probabilities", **SCORING_CONCURRENCY)

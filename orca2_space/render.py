"""What the chat shows for a message: exactly its text, with Markdown formatting rendered and nothing loaded.

The page's gr.Chatbot gets HTML made here, not Markdown: `for_display(text)` for each message and
`**CHATBOT_OPTIONS` on the Chatbot. The original text stays the source of truth (for the model, for
history); what these functions return is for display only.

Why HTML from here rather than Markdown for Gradio's renderer: Gradio's Chatbot runs `marked` (GFM) in
the browser, then a sanitizer that keeps <img>, <video>, <picture> and friends, so escaping the text
for marked is only safe if we predict marked's parse exactly. We can't: its URL autolinks, links and
emphasis can open a code span that any CommonMark reading leaves closed, e.g. "http://a/`<img src=…>`"
loads the image. Here markdown-it (CommonMark, with GFM tables and strikethrough) parses the text and
its renderer escapes every character of it, so the HTML holds no markup from the message at all,
whatever the parse. Gradio still sanitizes it (sanitize_html stays on) and KaTeX still renders math.

What is shown, for any text:
- Every character as written, in prose and in code: `<div>`, `a < b > c`, `&amp;` (five characters),
  `<script>…</script>`, backslashes (`\\*` shows both characters). Raw HTML is text; entities are text.
- Markdown formatting renders: emphasis, headings, lists, block quotes, tables, strikethrough, code
  spans and blocks (with Gradio's copy button), links (clickable), and bare http(s) URLs as links.
  As in any Markdown, runs of spaces and line indentation in prose collapse; `raw()` keeps them.
- Nothing loads: an image (`![alt](url)`, `![alt][ref]`) is shown as the text it was written as, its
  URL a plain link the visitor may click; HTML such as <img>, <iframe>, <style>, <link>, <svg> is text.
- Math: `$$…$$` and `\\[…\\]` (display) and `\\(…\\)` (inline) outside code are rendered by KaTeX
  (which runs untrusted: no \\href, \\url or \\includegraphics). A lone `$`, as in "$1.10", is text.

The output is one line (newlines and tabs as character references) because Gradio passes a string
message through inspect.cleandoc, which would otherwise strip indentation and expand tabs.
Gradio's per-message "copy" and "copy_all" buttons copy a message's content, that is this HTML; a
code block's own copy button, and selecting the text, copy what is shown.
"""

from __future__ import annotations

import bisect
import functools
import html
import re
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.rules_block import StateBlock
from markdown_it.rules_core import StateCore
from markdown_it.rules_inline import StateInline
from markdown_it.rules_inline.image import image as _markdown_image
from markdown_it.token import Token

__all__ = ["CHATBOT_OPTIONS", "for_display", "raw"]

# KaTeX finds math between these, in text the browser shows. They are Unicode noncharacters
# (reserved for a program's internal use), so no text can contain them: for_display replaces any it
# finds with U+FFFD. Text such as "$$" or "\(" in a message thus reaches KaTeX (which Gradio runs over
# the message with these delimiters) only where for_display marked math.
_DISPLAY = ("\ufdd0", "\ufdd1")
_INLINE = ("\ufdd2", "\ufdd3")
_SENTINELS = re.compile("[\ufdd0-\ufdd3]")

CHATBOT_OPTIONS: dict[str, Any] = dict(
    # The message is HTML made by for_display/raw; Gradio must not run its own Markdown on it.
    render_markdown=False,
    # Defence in depth: Gradio's sanitizer still runs over the HTML (it only trims the copy button's icons).
    sanitize_html=True,
    # No tags from the message are let through as tags (there are none: all of it is text).
    allow_tags=False,
    latex_delimiters=[
        {"left": _DISPLAY[0], "right": _DISPLAY[1], "display": True},
        {"left": _INLINE[0], "right": _INLINE[1], "display": False},
    ],
)

# Gradio's own code-block frame, so a code block looks like Gradio's and its copy button works
# (Gradio's click handler copies the frame's text).
_COPY_BUTTON = (
    '<button title="copy" class="copy_code_button"><span class="copy-text">'
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 15 15" color="currentColor" aria-hidden="true" '
    'aria-label="Copy" stroke-width="1.3" width="15" height="15"><path fill="currentColor" '
    'd="M12.728 4.545v8.182H4.545V4.545zm0 -0.909H4.545a0.909 0.909 0 0 0 -0.909 0.909v8.182a0.909 0.909 0 0 '
    '0 0.909 0.909h8.182a0.909 0.909 0 0 0 0.909 -0.909V4.545a0.909 0.909 0 0 0 -0.909 -0.909"/><path '
    'fill="currentColor" d="M1.818 8.182H0.909V1.818a0.909 0.909 0 0 1 0.909 -0.909h6.364v0.909H1.818Z"/>'
    '</svg></span><span class="check"><svg xmlns="http://www.w3.org/2000/svg" width="17" height="17" '
    'viewBox="0 0 17 17" aria-hidden="true" aria-label="Copied" fill="none" stroke="currentColor" '
    'stroke-width="1.3"><path d="m13.813 4.781 -7.438 7.438 -3.188 -3.188"/></svg></span></button>'
)

# With render_markdown=False, Gradio shows a message in a white-space: pre-line box without its "prose"
# typography; this frame gives the message the look of Gradio's own Markdown rendering back.
_FRAME = '<div class="prose" style="white-space: normal">'

_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_MATH_OPENERS = {"$$": ("$$", _DISPLAY), "\\[": ("\\]", _DISPLAY), "\\(": ("\\)", _INLINE)}
_BLOCK_MATH_OPENERS = ("$$", "\\[")
# A bare web address, as GFM links it: up to whitespace or <, less trailing punctuation (below).
_URL = re.compile(r"https?://[^\s<>\"]+", re.IGNORECASE)
_URL_TRAILING = ".,:;!?'\"*_~"
_NON_BLANK = re.compile(r"\S")  # what str.strip() keeps: the same Unicode whitespace
# Where the math rules keep what they found in one render (markdown-it's env lives as long as one).
_ENV_CLOSERS = "orca2_closers"
_ENV_CONTAINER_ENDS = "orca2_container_ends"


@functools.lru_cache(maxsize=256)
def for_display(text: str) -> str:
    """HTML for gr.Chatbot (with CHATBOT_OPTIONS) that shows `text` as written, Markdown formatted.

    See the module docstring for what is shown. Pure, and cached: a history re-rendered on every
    streamed token costs one render per new text.
    """
    body = _MARKDOWN.render(_SENTINELS.sub("\ufffd", text))
    return _one_line(_FRAME + body + "</div>") if body else ""


def raw(text: str) -> str:
    """HTML for gr.Chatbot (with CHATBOT_OPTIONS) that shows `text` exactly, unrendered: every
    character, space, tab and blank line, in a monospace block that wraps long lines."""
    if not text:
        return ""
    body = html.escape(text, quote=False)  # in <pre>, which KaTeX leaves alone
    return _one_line(f'{_FRAME}<pre style="white-space: pre-wrap"><code>{body}</code></pre></div>')


def _one_line(markup: str) -> str:
    # "&#10;" is a newline to the browser in text and in attribute values alike, and whitespace
    # between tags: the page is unchanged, and inspect.cleandoc has no lines to dedent.
    return markup.replace("\n", "&#10;").replace("\t", "&#9;")


# --- Inline rules -----------------------------------------------------------------------------


def _backslash_as_written(state: StateInline, silent: bool) -> bool:
    """Replaces Markdown's backslash escapes: a backslash is shown, and so is the character after it
    (which stays inert: `\\*` is not emphasis, `\\`` opens no code span)."""
    if state.src[state.pos] != "\\":
        return False
    following = state.src[state.pos + 1] if state.pos + 1 < state.posMax else ""
    taken = 2 if following in _ASCII_PUNCTUATION else 1
    if not silent:
        state.append_pending(state.src[state.pos : state.pos + taken])
    state.pos += taken
    return True


def _image_as_text(state: StateInline, silent: bool) -> bool:
    """Replaces Markdown images: where markdown-it would make an <img>, the text as written."""
    start = state.pos
    if not _markdown_image(state, True):  # finds the image's end (references included), makes nothing
        return False
    if not silent:
        state.append_pending(state.src[start : state.pos])
    return True


def _math_inline(state: StateInline, silent: bool) -> bool:
    """$$…$$, \\[…\\] and \\(…\\) within a paragraph (which may span its lines)."""
    opener = state.src[state.pos : state.pos + 2]
    if opener not in _MATH_OPENERS:
        return False
    closer, delimiters = _MATH_OPENERS[opener]
    end = _closers(state).find(closer, state.pos + 2, state.posMax)
    if end < 0 or not _NON_BLANK.search(state.src, state.pos + 2, end):
        return False
    if not silent:
        token = state.push("math", "", 0)
        token.content, token.info = state.src[state.pos + 2 : end], "".join(delimiters)
    state.pos = end + 2
    return True


# --- Block rule -------------------------------------------------------------------------------


def _math_block(state: StateBlock, start_line: int, end_line: int, silent: bool) -> bool:
    """Display math whose opening $$ or \\[ starts a line and whose closing one ends a line, with
    anything between (lines that would otherwise be list items or headings, say)."""
    if state.is_code_block(start_line):
        return False
    begin = state.bMarks[start_line] + state.tShift[start_line]
    opener = state.src[begin : begin + 2]
    if opener not in _BLOCK_MATH_OPENERS:
        return False
    closer, delimiters = _MATH_OPENERS[opener]
    closers = _closers(state)
    found = closers.find(closer, begin + 2, state.eMarks[end_line - 1])
    if found < 0:
        return False
    last = bisect.bisect_left(state.eMarks, found + 2, start_line, end_line)  # the closer's line
    if not closers.ends_line(found + 2, state.eMarks[last]):
        return False  # more text after it: a paragraph, where _math_inline finds the math
    if _leaves_container(state, start_line, last, (closer, found, end_line)):
        return False
    parts = [state.src[begin + 2 : found if last == start_line else state.eMarks[start_line]]]
    parts += [
        state.src[state.bMarks[line] + state.tShift[line] : state.eMarks[line]] for line in range(start_line + 1, last)
    ]
    if last > start_line:
        parts.append(state.src[state.bMarks[last] + state.tShift[last] : found])
    content = "\n".join(parts)
    if not content.strip():
        return False
    if not silent:
        token = state.push("math_block", "", 0)
        token.content, token.info, token.map = content, "".join(delimiters), [start_line, last + 1]
    state.line = last + 1
    return True


def _leaves_container(state: StateBlock, start_line: int, last: int, closing: tuple) -> bool:
    """Whether a line after start_line, up to last, is outside the container the math starts in (a
    list item, say).

    Every opener before one closer asks about the same lines (a paragraph checks each of its lines as
    a possible start): the line where the container was found to end is kept for the rest of the
    render, per closer and container, so that the lines are walked once, not once per opener.
    """
    ends: dict[tuple, int] = state.env.setdefault(_ENV_CONTAINER_ENDS, {})
    key = (*closing, state.blkIndent, state.level)
    if start_line < ends.get(key, -1):
        return True
    for line in range(start_line + 1, last + 1):
        if state.bMarks[line] + state.tShift[line] < state.eMarks[line] and state.sCount[line] < state.blkIndent:
            ends[key] = line
            return True
    return False


class _Closers:
    """Where each math closer occurs in one text, found in one pass when first asked for: a rule finds
    the next one after an opener by bisection. Searching the rest of the text for each opener instead
    costs the square of the text's length when the openers are never closed (an attacker's 200k
    characters of "\\(" took 13 s)."""

    def __init__(self, text: str):
        self.text = text
        self._at: dict[str, list[int]] = {}
        self._ends_line: dict[int, bool] = {}

    def find(self, closer: str, start: int, end: int) -> int:
        """As self.text.find(closer, start, end)."""
        if closer not in self._at:
            self._at[closer] = _occurrences(self.text, closer)
        at = self._at[closer]
        index = bisect.bisect_left(at, start)
        return at[index] if index < len(at) and at[index] + len(closer) <= end else -1

    def ends_line(self, position: int, line_end: int) -> bool:
        """Whether only blanks follow position up to line_end (every opener before a closer asks
        about the same line)."""
        if position not in self._ends_line:
            self._ends_line[position] = not _NON_BLANK.search(self.text, position, line_end)
        return self._ends_line[position]


def _closers(state: StateBlock | StateInline) -> _Closers:
    """The closers of the text this state parses (the document's, or one paragraph's)."""
    known: dict[str, _Closers] = state.env.setdefault(_ENV_CLOSERS, {})
    if state.src not in known:
        known[state.src] = _Closers(state.src)
    return known[state.src]


def _occurrences(text: str, sub: str) -> list[int]:
    """Every position of sub in text, overlapping ones too ("$$$" holds "$$" twice), in order."""
    positions, at = [], text.find(sub)
    while at >= 0:
        positions.append(at)
        at = text.find(sub, at + 1)
    return positions


# --- Core rule --------------------------------------------------------------------------------


def _link_bare_urls(state: StateCore) -> None:
    """Bare http(s) addresses in text become links, showing the address exactly as written."""
    for block in state.tokens:
        if block.type != "inline" or not block.children:
            continue
        children: list[Token] = []
        in_link = 0
        for token in block.children:
            if token.type == "link_open":
                in_link += 1
            elif token.type == "link_close":
                in_link -= 1
            if token.type != "text" or in_link or not _URL.search(token.content):
                children.append(token)
                continue
            children.extend(_split_urls(state, token))
        block.children = children


def _split_urls(state: StateCore, token: Token) -> list[Token]:
    pieces: list[Token] = []
    text, done = token.content, 0
    for match in _URL.finditer(text):
        url = _trim_url(match.group())
        href = state.md.normalizeLink(url)
        if not state.md.validateLink(href):
            continue
        if match.start() > done:
            pieces.append(_token("text", token.level, content=text[done : match.start()]))
        link_open = _token("link_open", token.level, tag="a", nesting=1, markup="linkify", info="auto")
        link_open.attrs = {"href": href}
        pieces += [
            link_open,
            _token("text", token.level + 1, content=url),
            _token("link_close", token.level, tag="a", nesting=-1, markup="linkify", info="auto"),
        ]
        done = match.start() + len(url)
    if done < len(text):
        pieces.append(_token("text", token.level, content=text[done:]))
    return pieces


def _trim_url(url: str) -> str:
    """GFM's rule: trailing punctuation and unbalanced closing parentheses are not part of a URL."""
    end, unbalanced = len(url), url.count(")") - url.count("(")
    while end and (url[end - 1] in _URL_TRAILING or (url[end - 1] == ")" and unbalanced > 0)):
        unbalanced -= url[end - 1] == ")"
        end -= 1
    return url[:end]


def _token(kind: str, level: int, **fields: Any) -> Token:
    fields.setdefault("tag", "")
    fields.setdefault("nesting", 0)
    token = Token(kind, **fields)
    token.level = level
    return token


# --- Renderer rules ---------------------------------------------------------------------------


def _render_math(self, tokens: list[Token], idx: int, options, env) -> str:
    token = tokens[idx]
    return token.info[0] + html.escape(token.content, quote=False) + token.info[1]


def _render_math_block(self, tokens: list[Token], idx: int, options, env) -> str:
    return f"<p>{_render_math(self, tokens, idx, options, env)}</p>\n"


def _render_code(self, tokens: list[Token], idx: int, options, env) -> str:
    token = tokens[idx]
    language = token.info.split(maxsplit=1)[0] if token.info.strip() else ""
    attribute = f' class="language-{html.escape(language)}"' if language else ""
    code = html.escape(token.content, quote=False)
    return f'<div class="code_wrap">{_COPY_BUTTON}<pre><code{attribute}>{code}</code></pre></div>\n'


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.disable("entity")  # "&amp;" is five characters of text
    md.inline.ruler.at("escape", _backslash_as_written)
    md.inline.ruler.at("image", _image_as_text)
    md.inline.ruler.before("escape", "math", _math_inline)
    md.block.ruler.before("fence", "math_block", _math_block, {"alt": ["paragraph", "reference", "blockquote", "list"]})
    md.core.ruler.push("bare_urls", _link_bare_urls)
    md.add_render_rule("math", _render_math)
    md.add_render_rule("math_block", _render_math_block)
    md.add_render_rule("fence", _render_code)
    md.add_render_rule("code_block", _render_code)
    return md


_MARKDOWN = _markdown()

"""What the chat shows for a message (orca2_space/render.py): the text as written, Markdown formatting
rendered, math by KaTeX, nothing loaded; and a raw view with every character. Fast: no browser here
(tests/test_render_browser.py checks the same in Chromium)."""

import html
import inspect
import random
import re
from html.parser import HTMLParser

import gradio as gr
import pytest
from support import AS_WRITTEN, LOADERS

from orca2_space.render import _COPY_BUTTON, _DISPLAY, _INLINE, CHATBOT_OPTIONS, for_display, raw

BLOCKS = {"div", "p", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "tr", "table", "ul", "ol"}


class _Page(HTMLParser):
    """What a browser would show, roughly: text with entities decoded, whitespace collapsed outside
    <pre>, a line break for <br> and between blocks; plus every tag with its attributes."""

    BLOCK, BREAK = "\x00", "\x01"

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._pre = 0
        self.feed(markup.replace(_COPY_BUTTON, ""))
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._pre += tag == "pre"
        self.parts.append(self.BLOCK if tag in BLOCKS else self.BREAK if tag == "br" else "")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        self._pre -= tag == "pre"
        self.parts.append(self.BLOCK if tag in BLOCKS else "")

    def handle_data(self, data):
        self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))

    @property
    def text(self) -> str:
        text = re.sub(r" *\x01 *", "\n", "".join(self.parts))
        return re.sub(r"[ \n]*\x00[\x00 \n]*", "\n", text).strip("\n")


def shown(text: str) -> str:
    return _Page(for_display(text)).text


def tags(markup: str) -> list[str]:
    return [tag for tag, _ in _Page(markup).tags]


# --- Text as written ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", AS_WRITTEN)
def test_every_character_of_plain_text_is_shown_as_written(text):
    assert shown(text) == text
    assert set(tags(for_display(text))) <= {"div", "p"}


def test_line_breaks_in_a_message_are_kept():
    assert shown("first line\nsecond <line>") == "first line\nsecond <line>"


def test_html_is_text_in_lists_code_spans_and_code_blocks():
    text = "- <div> item\n- a < b & &amp;\n\nUse `<span>&amp;</span>` or:\n\n```html\n<img src=x>\n  &amp; <b>\n```"
    page = _Page(for_display(text))
    assert page.text == ("<div> item\na < b & &amp;\nUse <span>&amp;</span> or:\n<img src=x>\n  &amp; <b>")
    assert [tag for tag, _ in page.tags].count("li") == 2
    assert ("code", {"class": "language-html"}) in page.tags


def test_code_is_never_markdown_and_never_math():
    text = "`**not bold** $$x$$ \\(y\\)`\n\n```\n**not bold**\n$$x^2$$ and \\(y\\) and ![i](http://h/i.png)\n```"
    markup = for_display(text)
    assert "strong" not in tags(markup)
    assert not any(d in markup for d in (*_DISPLAY, *_INLINE))
    assert (
        _Page(markup).text == "**not bold** $$x$$ \\(y\\)\n**not bold**\n$$x^2$$ and \\(y\\) and ![i](http://h/i.png)"
    )


# --- Markdown formatting still renders ------------------------------------------------------------


def test_markdown_formatting_renders():
    text = (
        "## Title\n\n**bold**, *em*, ~~gone~~\n\n- one\n- two\n\n1. first\n\n> quoted\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint(1)\n```\n\n---\n\n[a link](https://example.com)"
    )
    found = tags(for_display(text))
    for tag in ("h2", "strong", "em", "s", "ul", "ol", "li", "blockquote", "table", "td", "pre", "code", "hr", "a"):
        assert tag in found, tag


def test_code_blocks_keep_gradios_frame_and_copy_button():
    markup = for_display("```python\nx = 1\n```")
    assert (
        '<div class="code_wrap">' + _COPY_BUTTON + '<pre><code class="language-python">x = 1&#10;</code></pre></div>'
        in markup
    )


def test_links_and_bare_addresses_are_clickable_and_shown_as_written():
    page = _Page(for_display("[docs](https://example.com/a) and https://example.com/b_(c)."))
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a"]
    assert links == ["https://example.com/a", "https://example.com/b_(c)"]
    assert page.text == "docs and https://example.com/b_(c)."


def test_a_link_cannot_run_script():
    page = _Page(for_display("[x](javascript:alert(1)) [y](data:text/html,hi) [z](vbscript:msgbox)"))
    assert not [attrs for tag, attrs in page.tags if tag == "a"]


# --- Nothing loads ------------------------------------------------------------------------------

# What this module's HTML may hold: the frame, Markdown's elements, Gradio's copy button (removed
# before parsing). No element that loads, no attribute that loads or styles.
SAFE_TAGS = {"div", "p", "br", "a", "code", "pre", "strong", "em", "s", "ul", "ol", "li", "blockquote", "hr"}
SAFE_TAGS |= {"table", "thead", "tbody", "tr", "th", "td", "h1", "h2", "h3", "h4", "h5", "h6"}


def assert_loads_nothing(markup: str) -> None:
    for tag, attrs in _Page(markup).tags:
        assert tag in SAFE_TAGS, tag
        for name, value in attrs.items():
            assert name in {"href", "class", "style", "title", "start"}, name
            if name == "style":  # the frame's, raw's and a table column's alignment
                assert re.fullmatch("white-space: (normal|pre-wrap)|text-align:(left|center|right)", value), value
            if name == "href":
                assert tag == "a"


@pytest.mark.parametrize("text", LOADERS)
def test_no_message_can_load_anything(text):
    assert_loads_nothing(for_display(text))
    assert_loads_nothing(raw(text))


PIECES = ["<img src=http://h/i.png>", "<iframe src=x>", "`", "``", "```", "~~~", "![a](", "![", "](", ")", "[", "]"]
PIECES += ["*", "_", "~~", "http://h/", "<", ">", "&amp;", "&#60;", "\\", "$$", "\\(", "\\)", "\\[", "\\]", '"']
PIECES += ["\n", "\n\n", "    ", "- ", "> ", "1. ", "# ", "|", "---", " ", "a", "mermaid"]
PIECES += [":-", "-:", "[r]: http://h/r.png\n", "![r]", "<http://h/a.png>", "&lt;img src=x&gt;"]


def test_whatever_the_text_only_markdowns_own_elements_come_out():
    generator = random.Random(13)
    for _ in range(3000):
        text = "".join(generator.choices(PIECES, k=generator.randint(1, 30)))
        assert_loads_nothing(for_display(text))


def test_an_image_is_shown_as_written_and_its_address_is_a_plain_link():
    for text in ("![chart](http://h/a.png)", '<img src="http://h/a.png">', "![ref][r] [ref]"):
        assert shown(text + "\n\n[r]: http://h/a.png") == text
    page = _Page(for_display('See ![chart](http://h/a.png "t").'))
    assert [attrs["href"] for tag, attrs in page.tags if tag == "a"] == ["http://h/a.png"]


# --- Math ---------------------------------------------------------------------------------------


def display(math: str) -> str:
    return _DISPLAY[0] + math + _DISPLAY[1]


def inline(math: str) -> str:
    return _INLINE[0] + math + _INLINE[1]


def test_math_is_marked_for_katex_with_delimiters_no_text_can_contain():
    page = _Page(for_display("Area $$\\pi r^2$$, \\[a<b\\] and \\(x_1 * y_2 * z\\) done."))
    area = display("\\pi r^2")
    assert page.text == f"Area {area}, {display('a<b')} and {inline('x_1 * y_2 * z')} done."
    assert CHATBOT_OPTIONS["latex_delimiters"] == [
        {"left": _DISPLAY[0], "right": _DISPLAY[1], "display": True},
        {"left": _INLINE[0], "right": _INLINE[1], "display": False},
    ]


def test_display_math_on_its_own_lines_is_one_formula_whatever_its_lines_look_like():
    text = "Then\n$$\n\\begin{aligned}\na &= b\n+ c\n# d\n\\end{aligned}\n$$\nso."
    assert display("\n\\begin{aligned}\na &= b\n+ c\n# d\n\\end{aligned}\n") in html.unescape(for_display(text))
    assert "li" not in tags(for_display(text)) and "h1" not in tags(for_display(text))


@pytest.mark.parametrize("text", ["$1.10 and $2.20", "a lone $$ here", "\\( never closed", "$$ $$", "costs $5"])
def test_dollars_and_unclosed_delimiters_stay_text(text):
    assert shown(text) == text


def test_text_cannot_forge_the_math_delimiters():
    forged = display("x") + inline("y")
    assert shown(forged) == "\ufffdx\ufffd\ufffdy\ufffd"
    assert "".join(_Page(raw(forged)).parts[2:-2]) == forged  # raw shows them, in <pre>, which KaTeX skips


# --- Raw view -----------------------------------------------------------------------------------


def test_raw_shows_every_character_unrendered():
    text = "  two leading spaces\n\n\n\ttab, **not bold**, <b>&amp;</b>, $$x$$\n    indented  \n"
    markup = raw(text)
    assert "".join(_Page(markup).parts[2:-2]) == text  # inside <pre><code>, exactly
    assert tags(markup) == ["div", "pre", "code"]


# --- What Gradio does with it ---------------------------------------------------------------------


def test_the_options_are_chatbot_arguments_and_keep_sanitizing_on():
    parameters = inspect.signature(gr.Chatbot).parameters
    assert set(CHATBOT_OPTIONS) <= set(parameters)
    assert CHATBOT_OPTIONS["sanitize_html"] is True and CHATBOT_OPTIONS["render_markdown"] is False


@pytest.mark.parametrize(
    "text", ["\n\n  indented first\n    more\n\tand a tab\n\n", "```\n    code\n\tkept\n```", "x\n  y\n  z"]
)
def test_gradio_hands_the_browser_exactly_what_we_made(text):
    """gr.Chatbot runs a string message through inspect.cleandoc (dedent, tabs to spaces, blank
    lines trimmed): the HTML is one line with no tab, so nothing of it changes."""
    chatbot = gr.Chatbot(**CHATBOT_OPTIONS, render=False)
    for markup in (for_display(text), raw(text)):
        assert "\n" not in markup and "\t" not in markup
        sent = chatbot.postprocess([{"role": "assistant", "content": markup}]).model_dump()
        assert sent[0]["content"][0]["text"] == markup


def test_nothing_to_show_is_an_empty_message():
    assert for_display("") == "" and raw("") == "" and for_display("   \n") == ""


def test_the_same_text_is_rendered_once():
    text = "cached **once**"
    assert for_display(text) is for_display(text)

"""orca2_space/render.py as a visitor sees it: gr.Chatbots configured with CHATBOT_OPTIONS, holding
messages made by for_display and raw, served on loopback and opened in Debian's Chromium.

A small HTTP server on another loopback port stands for an attacker's: its address is in every way a
message could make the browser fetch something, and no request may reach it. A control Chatbot left
on Gradio's defaults shows the test would see one.
"""

import http.server
import threading

import gradio as gr
import pytest
from support import AS_WRITTEN, LOADERS, NO_CHROMIUM, NO_CHROMIUM_REASON, free_port, wait_for

from orca2_space.render import CHATBOT_OPTIONS, for_display, raw

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]

IN_CONTEXT = (
    "- <div> in a list\n- a < b & &amp;\n\nInline `<span>&amp;</span>` code.\n\n"
    "```html\n<img src=x>\n  &amp; <b>  indented\n\n\nafter blank lines\n```"
)
FORMATTED = (
    "## A heading\n\nSome **bold** and *emphasis*, ~~struck~~.\n\n1. first\n2. second\n\n"
    "| a | b |\n|---|---|\n| 1 | <i> |\n\n```python\nprint('<b>&amp;</b>')\n```\n\n"
    "[a link](https://example.com/docs) and https://example.com/bare."
)
MATH = "Area $$\\pi r^2$$, then \\[\\frac{a}{b} < 1\\] and inline \\(x_1 + y^2\\)."
PRICES = "Prices: $1.10 and $2.20."
RAW = "  two leading spaces\n\n\n\ttab, **not bold**, <b>&amp;</b>, $$x$$ \ufdd0y\ufdd1\n    indented  \n"
SHOWCASE = [
    ("user", for_display("In HTML, what does <div> do compared with <span>? And is a < b > c valid?")),
    (
        "assistant",
        for_display(
            "A `<div>` is a **block** element; a `<span>` is *inline*.\n\n"
            "- `<div>` starts on a new line\n- `<span>` flows with text, so `a < b > c` stays text\n\n"
            "```html\n<div>block</div>\n<span>inline</span> &amp; more\n```\n\n"
            "Math: $$\\sum_{i=1}^n i = \\frac{n(n+1)}{2}$$ and \\(e^{i\\pi} + 1 = 0\\); prices stay: $1.10 and $2.20.\n\n"
            "An image stays text: ![chart](https://example.com/chart.png)"
        ),
    ),
    ("user", raw("Show it raw:\n  <b>&amp;</b>\n\n\n\tindented $$x$$")),
]


class _Recorder(http.server.BaseHTTPRequestHandler):
    def _record(self):
        self.server.paths.append(self.path)
        self.send_response(204)
        self.end_headers()

    do_GET = do_POST = do_HEAD = do_OPTIONS = _record

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def attacker():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    server.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _both_roles(texts, render=for_display):
    return [{"role": role, "content": render(text)} for text in texts for role in ("user", "assistant")]


@pytest.fixture(scope="module")
def app(attacker):
    host = f"127.0.0.1:{attacker.server_port}"
    loaders = [text.replace("HOST", host) for text in LOADERS]
    with gr.Blocks() as demo:
        chat = dict(CHATBOT_OPTIONS, height=720)
        gr.Chatbot([{"role": r, "content": c} for r, c in SHOWCASE], elem_id="showcase", **chat)
        gr.Chatbot(_both_roles([*AS_WRITTEN, IN_CONTEXT]), elem_id="as-written", **chat)
        gr.Chatbot(_both_roles([FORMATTED]), elem_id="formatted", **chat)
        gr.Chatbot(_both_roles([MATH, PRICES]), elem_id="math", **chat)
        gr.Chatbot(_both_roles(loaders) + _both_roles(["\n".join(loaders)], raw), elem_id="loaders", **chat)
        gr.Chatbot([{"role": "assistant", "content": raw(RAW)}], elem_id="raw", **chat)
        # The control: Gradio's own Markdown, which loads a Markdown image.
        gr.Chatbot([{"role": "assistant", "content": f"![control](http://{host}/control.png)"}], elem_id="control")
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/", len(loaders)
    demo.close()


def open_page(browser, app, width=1280, height=800, **context):
    page = browser.new_context(viewport={"width": width, "height": height}, **context).new_page()
    page.set_default_timeout(60_000)
    page.goto(app[0])
    # Settled: every bubble is there and KaTeX (loaded on demand) has rendered the math.
    page.wait_for_function(f"document.querySelectorAll('#loaders [data-testid=bot]').length == {app[1] + 1}")
    page.wait_for_function("document.querySelectorAll('#math .katex').length == 6")
    page.wait_for_load_state("networkidle")
    return page


def bubbles(page, chatbot, role):
    # inner_text is the text as laid out: entities decoded, whitespace collapsed outside <pre>, a
    # newline for each <br> and between blocks. Nothing else is normalised.
    return page.locator(f"#{chatbot} [data-testid={role}]").all_inner_texts()


def test_every_character_is_shown_as_written_in_both_roles(browser, app):
    page = open_page(browser, app)
    for role in ("user", "bot"):
        shown = bubbles(page, "as-written", role)
        assert shown[: len(AS_WRITTEN)] == AS_WRITTEN
        in_context = page.locator(f"#as-written [data-testid={role}]").last
        assert in_context.locator("li").all_inner_texts() == ["<div> in a list", "a < b & &amp;"]
        assert in_context.locator("p code").inner_text() == "<span>&amp;</span>"
        assert (
            in_context.locator("pre code").inner_text() == "<img src=x>\n  &amp; <b>  indented\n\n\nafter blank lines\n"
        )
    page.context.close()


def test_markdown_formatting_still_renders(browser, app):
    page = open_page(browser, app)
    answer = page.locator("#formatted [data-testid=bot]")
    assert answer.locator("h2").inner_text() == "A heading"
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("em").inner_text() == "emphasis"
    assert answer.locator("s").inner_text() == "struck"
    assert answer.locator("ol li").all_inner_texts() == ["first", "second"]
    assert answer.locator("td").all_inner_texts() == ["1", "<i>"]
    assert answer.locator("pre code").inner_text() == "print('<b>&amp;</b>')\n"
    links = answer.locator("a")
    assert links.all_inner_texts() == ["a link", "https://example.com/bare"]
    assert [links.nth(i).get_attribute("href") for i in range(2)] == [
        "https://example.com/docs",
        "https://example.com/bare",
    ]
    assert links.first.get_attribute("target") == "_blank"  # Gradio's sanitizer opens links in a new tab
    page.context.close()


def test_the_copy_button_of_a_code_block_copies_the_code_as_written(browser, app):
    page = open_page(browser, app)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app[0].rstrip("/"))
    page.locator("#formatted [data-testid=bot] .copy_code_button").click()
    assert page.evaluate("navigator.clipboard.readText()") == "print('<b>&amp;</b>')"  # Gradio trims it
    page.context.close()


def test_math_renders_and_prices_stay_text(browser, app):
    page = open_page(browser, app)
    math, prices = page.locator("#math [data-testid=bot]").all()
    assert math.locator(".katex").count() == 3 and math.locator(".katex-display").count() == 2
    assert not any(c in math.inner_text() for c in "\ufdd0\ufdd1\ufdd2\ufdd3")
    assert prices.locator(".katex").count() == 0 and prices.inner_text() == PRICES
    page.context.close()


def test_no_message_loads_anything(browser, app, attacker):
    attacker.paths.clear()
    page = open_page(browser, app)
    # The control's request shows the page has rendered its messages.
    wait_for(lambda: "/control.png" in attacker.paths, "the control image's request", seconds=30)
    page.wait_for_load_state("networkidle")
    page.context.close()
    assert attacker.paths == ["/control.png"]


def test_the_raw_view_shows_every_character(browser, app):
    page = open_page(browser, app)
    assert page.locator("#raw [data-testid=bot] pre").inner_text() == RAW
    assert bubbles(page, "raw", "bot") == [RAW]
    assert page.locator("#raw .katex").count() == 0
    page.context.close()


@pytest.mark.parametrize("name,size", [("desktop", (1280, 800)), ("phone", (390, 844))])
def test_screenshots(browser, app, name, size):
    """/tmp/render-desktop.png and /tmp/render-phone.png: the showcase conversation, for a person to look at."""
    phone = dict(is_mobile=True, has_touch=True) if name == "phone" else {}
    page = open_page(browser, app, *size, **phone)
    page.wait_for_function("document.querySelectorAll('#showcase .katex').length == 2")
    page.evaluate("document.querySelector('#showcase').scrollIntoView()")
    page.locator("#showcase .bubble-wrap").evaluate("wrap => wrap.scrollTo(0, 0)")  # from the question on
    page.locator("#showcase").screenshot(path=f"/tmp/render-{name}.png")
    assert page.evaluate("document.documentElement.scrollWidth") <= size[0]  # no sideways scrolling
    page.context.close()

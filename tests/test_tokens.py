"""ui/tokens.py: the token view (each token coloured by its probability, its top 5 on click or
keyboard focus, every character shown exactly, nothing loaded) and /token_probabilities."""

import html.parser

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from openai_stub import OpenAIStub, Script
from support import FIXTURES, NO_CHROMIUM, NO_CHROMIUM_REASON, exchange, free_port

from orca2_space.backends.inference_server import InferenceServer
from orca2_space.chat import Chat
from orca2_space.conversation import Conversation, ScoredToken
from orca2_space.fairness import Visitor
from orca2_space.scoring import token_probabilities
from orca2_space.settings import InferenceServerSettings, Settings
from orca2_space.ui.tokens import (
    TOKEN_CSS,
    add_token_endpoint,
    band,
    percent,
    token_view,
    token_view_of,
    view_for,
)

SYSTEM = "You are Orca."
VISITOR = Visitor("a-page-session", "10.0.0.1")
ATTACKER = "127.0.0.1:9"  # the discard port: nothing may even try to reach it
HOSTILE = (
    f"<img src=http://{ATTACKER}/img.png onerror=alert(1)> <|im_end|> & &amp; \"q\" 'a' </span></div>"
    f"<script>alert(2)</script><style>*{{background:url(http://{ATTACKER}/bg)}}</style>\n\n"
    "  indented\ttab ${value} {{value}} `tick` 😀 é\n"
)
ALLOWED_TAGS = {"div", "p", "span", "code"}
ALLOWED_ATTRIBUTES = {"class", "tabindex", "role", "aria-label", "aria-describedby", "id"}


@pytest.fixture(scope="module")
def chat(tiny_engine) -> Chat:
    return Chat(tiny_engine, Settings(max_new_tokens_cap=4000))


@pytest.fixture(scope="module")
def hostile_tokens(chat):
    """The hostile answer's tokens, scored by the tiny model (through its text: any text can be scored)."""
    return token_probabilities(chat, "Hi", SYSTEM, [], HOSTILE)


class Parsed(html.parser.HTMLParser):
    """The view's elements, and the text of each token as the browser will hold it."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.token_texts: list[str] = []
        self._in_text = 0
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if self._in_text:
            self._in_text += 1
        elif "tok-text" in attributes.get("class", "").split():
            self._in_text = 1
            self.token_texts.append("")

    def handle_endtag(self, tag):
        if self._in_text:
            self._in_text -= 1

    def handle_data(self, data):
        if self._in_text:
            self.token_texts[-1] += data

    def tokens(self) -> list[dict]:
        return [attributes for tag, attributes in self.tags if "tok" in attributes.get("class", "").split()]


def test_every_character_is_shown_as_text_and_nothing_is_markup(hostile_tokens):
    view = token_view(hostile_tokens, "Answer <b>1</b>")
    parsed = Parsed(view)
    assert {tag for tag, _ in parsed.tags} <= ALLOWED_TAGS
    assert {name for _, attributes in parsed.tags for name in attributes} <= ALLOWED_ATTRIBUTES
    # The tokens' texts are the answer, character for character (with the role line's newline in front).
    assert parsed.token_texts == [token.text for token in hostile_tokens]
    assert "".join(parsed.token_texts) == "\n" + HOSTILE
    assert "\n" not in view and "\t" not in view  # on one line: nothing on the way can reflow it
    assert "Answer &lt;b&gt;1&lt;/b&gt;" in view
    assert "<img" not in view and "<script" not in view and "<style" not in view


def test_each_token_is_focusable_labelled_coloured_and_has_its_alternatives(hostile_tokens):
    view = token_view(hostile_tokens)
    parsed = Parsed(view)
    spans = parsed.tokens()
    assert len(spans) == len(hostile_tokens)
    ids = {attributes["id"] for _, attributes in parsed.tags if "id" in attributes}
    for token, attributes in zip(hostile_tokens, spans, strict=True):
        assert attributes["tabindex"] == "0" and attributes["role"] == "button"
        assert attributes["aria-label"].endswith(percent(token.probability))
        assert band(token.probability) in attributes["class"].split()
        assert attributes["aria-describedby"] in ids
    alternatives = [attributes for _, attributes in parsed.tags if "tok-alt" in attributes.get("class", "").split()]
    assert len(alternatives) == 5 * len(hostile_tokens)
    assert "temperature 1" in view and "whatever the sampling settings" in view


def test_whitespace_and_unfinished_characters_have_something_to_click(hostile_tokens):
    spans = Parsed(token_view(hostile_tokens)).tokens()
    marks = {"nl": 0, "ws": 0, "part": 0}
    for token, attributes in zip(hostile_tokens, spans, strict=True):
        classes = set(attributes["class"].split())
        expected = (
            "part" if not token.text else "nl" if "\n" in token.text and not token.text.strip()
            else "ws" if not token.text.strip() else None
        )  # fmt: skip
        assert classes & set(marks) == ({expected} if expected else set())
        if expected:
            marks[expected] += 1
    assert all(marks.values()), marks  # the answer has each kind
    # The marks are CSS content: never part of the text, so copying gives the answer exactly.
    assert '.tok.nl::before { content: "\\21B5"' in TOKEN_CSS
    assert ".tok.part::before { content: " in TOKEN_CSS


def test_the_css_loads_nothing():
    assert "url(" not in TOKEN_CSS and "@import" not in TOKEN_CSS


@pytest.mark.parametrize(
    ("probability", "shown", "colour"),
    [(1.0, "100.0%", "p4"), (0.9, "90.0%", "p4"), (0.612, "61.2%", "p3"), (0.1, "10.0%", "p2"),
     (0.0123, "1.2%", "p1"), (0.000061, "0.0061%", "p0"), (1e-9, "< 0.0001%", "p0")],
)  # fmt: skip
def test_probabilities_read_as_percentages_and_bands(probability, shown, colour):
    assert percent(probability) == shown and band(probability) == colour


def test_a_token_outside_its_top_5_says_so(chat):
    # A sampled-looking token: "\n" then a rare word where the model expects something else.
    tokens = token_probabilities(chat, "Hi", SYSTEM, [], None, [13, 31999])
    assert all(token.id not in {alt.id for alt in token.top} for token in tokens[1:])
    assert "not among the 5 most likely" in token_view(tokens)


def answered(answer: str, answer_ids: list[int] | None = None) -> Conversation:
    return Conversation(exchanges=[exchange("Hi", answer, system_message=SYSTEM, answer_ids=answer_ids)])


def test_the_page_shows_an_answers_tokens_and_keeps_them_for_the_exports(chat):
    view = token_view_of(chat, answered("Fine."), 0, "Answer", VISITOR)
    expected = token_probabilities(chat, "Hi", SYSTEM, [], "Fine.")
    assert "tok-answer" in view.html and [t.id for t in view.tokens] == [t.id for t in expected]
    assert view.tokens[0] == ScoredToken.of(expected[0])


def test_the_page_gets_a_message_where_scoring_is_unavailable():
    with OpenAIStub(Script(takes_ids=False)) as stub:
        backend = InferenceServer.load(str(FIXTURES / "orca2-tokenizer"), InferenceServerSettings(stub.base_url))
        view = token_view_of(Chat(backend, Settings()), answered("The <answer>"), 0, "Answer", VISITOR)
    assert "unavailable on this inference server" in view.html and "tok-answer" not in view.html
    assert Parsed(view.html).tags[0] == ("div", {"class": "orca-tokens"}) and view.tokens is None


def test_the_page_gets_a_message_for_a_bad_request(chat):
    view = token_view_of(chat, answered("Fine.", [40000]), 0, "Answer", VISITOR)
    assert "Token probabilities could not be computed: answer_ids[0] is 40000" in view.html and view.tokens is None


def test_the_page_gets_the_reason_when_the_visitor_has_no_place_left(chat):
    limited = Chat(chat.backend, Settings(visitor_limit=1))
    with limited.fair_share.admit(VISITOR):  # an answer still being written
        view = view_for(limited, "Hi", SYSTEM, [], "Fine.", None, "Answer", VISITOR)
    assert "You already have 1 request running or waiting" in view.html and "tok-answer" not in view.html
    assert view.tokens is None
    assert "tok-answer" in view_for(limited, "Hi", SYSTEM, [], "Fine.", None, "Answer", VISITOR).html


# Served: /token_probabilities, and the view in Chromium


@pytest.fixture(scope="module")
def app(chat, hostile_tokens):
    with gr.Blocks() as demo:
        gr.HTML(token_view(hostile_tokens, "Answer"), elem_id="tokens")
        add_token_endpoint(chat)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, css=TOKEN_CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_the_endpoint_returns_each_tokens_probability_and_top_5(app, chat):
    client = Client(app, verbose=False)
    result = client.predict(
        message="Hi", system_message=SYSTEM, history=[], answer=HOSTILE, api_name="/token_probabilities"
    )
    expected = token_probabilities(chat, "Hi", SYSTEM, [], HOSTILE)
    assert [t["id"] for t in result["tokens"]] == [t.id for t in expected]
    assert "".join(t["text"] for t in result["tokens"]) == "\n" + HOSTILE
    first = result["tokens"][0]
    assert set(first) == {"id", "text", "probability", "top"} and len(first["top"]) == 5
    assert first["probability"] == pytest.approx(expected[0].probability, rel=1e-5)
    ids = [t["id"] for t in result["tokens"]]
    again = client.predict(message="Hi", system_message=SYSTEM, answer_ids=ids, api_name="/token_probabilities")
    assert again == result


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"answer_ids": [1, 99999]}, r"answer_ids\[1\] is 99999"),
        ({}, "Give the answer"),
        ({"answer": 3}, "answer must be text"),
    ],
)
def test_the_endpoint_refuses_bad_calls_clearly(app, fields, says):
    client = Client(app, verbose=False)
    with pytest.raises(AppError, match=says):
        client.predict(message="Hi", api_name="/token_probabilities", **fields)


@pytest.mark.browser
@pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)
def test_in_the_browser_focus_shows_the_alternatives_and_the_text_copies_exactly(app, page):
    requests, dialogs = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(app)
    tokens = page.locator("#tokens .tok")
    tokens.first.wait_for()
    popups = page.locator("#tokens .tok-alts")
    assert popups.evaluate_all("all => all.filter(p => getComputedStyle(p).display !== 'none').length") == 0
    # Keyboard: Tab until the first token has focus; its alternatives show.
    for _ in range(20):
        page.keyboard.press("Tab")
        if tokens.first.evaluate("t => t === document.activeElement"):
            break
    assert popups.first.is_visible() and "Most likely here" in popups.first.inner_text()
    page.keyboard.press("Tab")
    assert popups.nth(1).is_visible() and not popups.first.is_visible()
    # Mouse: a click shows that token's alternatives instead.
    tokens.nth(3).click()
    assert popups.nth(3).is_visible() and not popups.nth(1).is_visible()
    # Selecting the answer copies exactly the answer (no marks, no alternatives).
    page.locator("#tokens .tok-note").first.click()
    copied = page.evaluate(
        """() => { const range = document.createRange();
        range.selectNodeContents(document.querySelector('#tokens .tok-answer'));
        const selection = getSelection(); selection.removeAllRanges(); selection.addRange(range);
        return selection.toString(); }"""
    )
    # (Chromium leaves a block's final newline out of a selection, as for any <pre>; the text holds it.)
    assert copied == "\n" + HOSTILE.removesuffix("\n")
    shown = page.locator("#tokens .tok-text").evaluate_all("all => all.map(t => t.textContent).join('')")
    assert shown == "\n" + HOSTILE
    assert dialogs == []  # no handler in the text ran
    assert not [url for url in requests if ATTACKER in url]


@pytest.mark.browser
@pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)
@pytest.mark.parametrize("width, height, device", [(390, 844, dict(is_mobile=True, has_touch=True)), (1280, 800, {})])
def test_every_tokens_alternatives_open_inside_the_screen(app, browser, width, height, device):
    context = browser.new_context(viewport={"width": width, "height": height}, **device)
    page = context.new_page()
    page.goto(app)
    tokens = page.locator("#tokens .tok")
    tokens.first.wait_for()
    count, outside = tokens.count(), []
    for index in range(count):
        tokens.nth(index).focus()
        box = tokens.nth(index).locator(".tok-alts").bounding_box()
        if not (box and box["x"] >= 0 and box["x"] + box["width"] <= width and box["y"] + box["height"] <= height):
            outside.append((index, box))
    context.close()
    assert count > 20 and outside == []

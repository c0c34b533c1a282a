"""What the visitor keeps, in Chromium: the browser's storage quota is what the page budgets for, a full
browser drops the oldest chats with a notice naming them (and keeps the rest across a reload), an
import with a taken id keeps both, a bad import says why, and an imported file is not left on the
server."""

import json
from pathlib import Path

import httpx
import pytest
from make_tiny_model import build_tiny_model
from support import ARTIFACTS, NO_CHROMIUM, NO_CHROMIUM_REASON, App, exchange, open_app

from orca2_space.backends.contract import ModelInfo
from orca2_space.conversation import (
    LOCAL_STORAGE_CHARS,
    STORE_ROOM,
    Conversation,
    LookedAt,
    Store,
    export,
    json_room,
    json_size,
    stored_chars,
)
from orca2_space.prompt import ConversationPrompts

pytestmark = [pytest.mark.browser, pytest.mark.skipif(NO_CHROMIUM, reason=NO_CHROMIUM_REASON)]
USER = "#chatbot [data-testid=user]"
STORE_KEY = "orca2-space-conversations"
INFO = ModelInfo("microsoft/Orca-2-7b", "8bit", "auto", "cpu", 4096)
# A chat that takes about a quarter of the browser's room for chats.
QUARTER = json_room(STORE_ROOM) // 4


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def app(tmp_path_factory, uploads):
    """The app with Gradio's upload folder where the test can look into it."""
    folder = tmp_path_factory.mktemp("storage")
    # Its tests import files near a browser's limit one after another from one address, faster than a
    # visitor would: the budget of bytes is tested on apps of its own (test_hardening.py).
    app = App(
        build_tiny_model(folder / "tiny"),
        folder / "app.log",
        {"GRADIO_TEMP_DIR": str(uploads)},
        "--address-mib-per-minute",
        "100000",
    )
    yield app
    app.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.console = []
    page.on("console", lambda message: page.console.append(message.text))
    open_app(page, app)
    yield page
    context.close()


def exported(folder: Path, question: str, answer: str = "An answer", conversation_id: str | None = None) -> Path:
    """A conversation as the page exports it, saved as a file to import."""
    conversation = Conversation(exchanges=[exchange(question, answer)])
    if conversation_id:
        conversation.id = conversation_id
    path = folder / f"{question.replace(' ', '-')}.json"
    path.write_text(export(conversation, INFO, ConversationPrompts([None], {}), LookedAt()).model_dump_json())
    return path


def import_file(page, path: Path, button: str = "#import-json") -> None:
    with page.expect_file_chooser() as chooser:
        page.click(button)
    chooser.value.set_files(str(path))


def import_chat(page, path: Path) -> None:
    question = json.loads(path.read_text())["exchanges"][0]["question"]
    import_file(page, path)
    page.wait_for_function(f"document.querySelector('{USER}')?.innerText == {json.dumps(question)}")


def chat_titles(page) -> list[str]:
    page.click("#chats input")
    titles = [title.removeprefix("✓").strip() for title in page.locator("[role=option]").all_inner_texts()]
    page.keyboard.press("Escape")
    return titles


def stored(page) -> dict[str, int]:
    """Characters each key of the page's localStorage holds, key and value."""
    return page.evaluate(
        "Object.fromEntries(Object.keys(localStorage).map(k => [k, k.length + localStorage.getItem(k).length]))"
    )


def test_the_browsers_storage_quota_is_the_one_the_page_budgets_for(page):
    """5 MiB characters of keys and values: the last one that fits, and one more that doesn't."""
    outcome = page.evaluate(
        """quota => { localStorage.clear();
        const attempt = n => { try { localStorage.setItem('q', 'x'.repeat(n - 1)); return 'kept'; }
                               catch (e) { return e.name; } };
        const result = [attempt(quota), attempt(quota + 1)];
        localStorage.clear();
        return result; }""",
        LOCAL_STORAGE_CHARS,
    )
    assert outcome == ["kept", "QuotaExceededError"]


def test_a_chat_takes_the_storage_the_page_reckons(page, tmp_path):
    path = exported(tmp_path, "Measured", "x" * 10_000)
    import_chat(page, path)
    conversation = Conversation.model_validate(
        {
            "id": json.loads(path.read_text())["conversation_id"],
            "created": json.loads(path.read_text())["created"],
            "exchanges": [exchange("Measured", "x" * 10_000).model_dump()],
        }
    )
    reckoned = stored_chars(json_size(Store(open=conversation.id, conversations=[conversation]).model_dump()))
    page.wait_for_function(f"(localStorage.getItem('{STORE_KEY}') || '').length > 10000")
    actual = page.evaluate(f"localStorage.getItem('{STORE_KEY}').length")
    # Python writes a whole float as 1.0 where JavaScript writes 1: the reckoning errs a little high.
    assert actual <= reckoned <= actual * 1.01


def test_a_full_browser_drops_the_oldest_chats_naming_them_and_keeps_the_rest(page, tmp_path):
    notice = page.locator("#storage-notice")
    for name in "abc":
        import_chat(page, exported(tmp_path, f"Chat {name}", "x" * QUARTER))
    assert not notice.is_visible()  # three quarters full: not yet nearly
    import_chat(page, exported(tmp_path, "Chat d", "x" * QUARTER))
    assert "no longer kept here: “Chat a”." in notice.inner_text() and "Export (⤓ JSON)" in notice.inner_text()
    import_chat(page, exported(tmp_path, "Chat e", "x" * QUARTER))
    assert "no longer kept here: “Chat b”." in notice.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    notice.scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "storage-notice-1280.png")
    page.set_viewport_size({"width": 390, "height": 844})
    notice.scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "storage-notice-390.png")
    kept = stored(page)
    assert kept[STORE_KEY] <= STORE_ROOM and sum(kept.values()) <= LOCAL_STORAGE_CHARS

    page.reload()
    page.wait_for_function(f"document.querySelector('{USER}')?.innerText == 'Chat e'")
    assert chat_titles(page) == ["Chat e", "Chat d", "Chat c"]
    assert not [m for m in page.console if "localStorage" in m or "QuotaExceeded" in m]


def test_an_import_whose_id_is_taken_keeps_both(page, tmp_path):
    import_chat(page, exported(tmp_path, "Mine", conversation_id="0123456789abcdef"))
    import_chat(page, exported(tmp_path, "Theirs", conversation_id="0123456789abcdef"))
    assert chat_titles(page) == ["Theirs", "Mine"]


def test_a_bad_import_says_why(page, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "orca2-space/conversation", "exchanges": "none"}')
    import_file(page, bad)
    toast = page.locator(".toast-body").first
    toast.wait_for()
    assert "This is not a conversation exported from this app" in toast.inner_text()

    page.click("#compare-tab-button")
    import_file(page, exported(tmp_path, "A chat"), "#compare-import")
    page.wait_for_selector(".toast-body:has-text('it is a conversation')")


def test_an_imported_file_is_not_left_on_the_server(page, app, uploads, tmp_path):
    marker = "Only in this visitor's browser 7f3a"
    with page.expect_response("**/gradio_api/upload**") as response:
        import_file(page, exported(tmp_path, marker))
    (path,) = response.value.json()
    page.wait_for_function(f"document.querySelector('{USER}')?.innerText == {json.dumps(marker)}")
    assert not Path(path).exists()
    assert not [f for f in uploads.rglob("*") if f.is_file() and marker.encode() in f.read_bytes()]
    assert httpx.get(f"{app.url}gradio_api/file={path}").status_code in (403, 404)

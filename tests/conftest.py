"""Fixtures: tiny Orca-2-shaped models built on the fly, the app launched in-process or as a
subprocess, a Content Safety server, and Chromium. What they are made of is in support.py.

Nothing here touches a hub: HF_HUB_OFFLINE is set before transformers or huggingface_hub load.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathlib import Path

import pytest
from make_tiny_model import build_tiny_model
from support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FIXTURES,
    SAFETY_KEY,
    SCRIPT,
    VIOLENT_ANSWER,
    App,
    FakeBackend,
    batched,
    content_safety,
    free_port,
)

from orca2_space.backends.local.engine import Engine
from orca2_space.chat import Chat
from orca2_space.prompt import EOS, IM_END, OrcaTokenizer
from orca2_space.settings import Settings


@pytest.fixture(scope="session")
def tokenizer() -> OrcaTokenizer:
    return OrcaTokenizer(FIXTURES / "orca2-tokenizer" / "tokenizer.model")


@pytest.fixture
def fake_backend(tokenizer) -> FakeBackend:
    """Answers "\nThe answer" (the newline ends the role line, as Orca 2 writes it)."""
    return FakeBackend(tokenizer, ["\n", "The", " answer"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Random weights: answers are noise, but every code path is the real one."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> Engine:
    return Engine.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def batched_tiny(tiny_engine):
    """The tiny model through the batch (one batch per test module)."""
    engine = batched(tiny_engine)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def ends_with_im_end(tmp_path_factory) -> Engine:
    """Answers "\\nThe answer" then <|im_end|>."""
    return Engine.load(str(build_tiny_model(tmp_path_factory.mktemp("im_end"), script=[*SCRIPT, IM_END])))


@pytest.fixture(scope="session")
def ends_with_eos(tmp_path_factory) -> Engine:
    """Answers "\\nThe answer" then </s>."""
    return Engine.load(str(build_tiny_model(tmp_path_factory.mktemp("eos"), script=[*SCRIPT, EOS])))


@pytest.fixture(scope="session")
def never_ends(tmp_path_factory) -> Engine:
    """Repeats "\\nThe answer" until max_new_tokens or Stop."""
    return Engine.load(str(build_tiny_model(tmp_path_factory.mktemp("loop"), script=SCRIPT, loop=True)))


@pytest.fixture(scope="session")
def turns_violent(tmp_path_factory, tokenizer) -> Engine:
    """Repeats VIOLENT_ANSWER until max_new_tokens or Stop."""
    script = tokenizer.encode_text(VIOLENT_ANSWER)
    return Engine.load(str(build_tiny_model(tmp_path_factory.mktemp("violent"), script=script, loop=True)))


@pytest.fixture
def safety_server():
    """Azure AI Content Safety's wire protocol on loopback; "violent" rates Violence 6."""
    with content_safety() as server:
        yield server


@pytest.fixture(scope="session")
def moderated_app(turns_violent):
    """The app launched with moderation on, over the model whose answer turns violent."""
    from orca2_space.cli import launch, moderation_service
    from orca2_space.settings import ModerationSettings

    with content_safety() as server:
        rules = ModerationSettings(endpoint=server.endpoint, key=SAFETY_KEY)
        settings = Settings(host="127.0.0.1", port=free_port(), max_new_tokens_cap=1000, moderation=rules)
        demo = launch(Chat(turns_violent, settings, moderation_service(rules)), block=False)
        yield server, demo.local_url
        demo.close()


@pytest.fixture(scope="session")
def app_settings() -> Settings:
    # A cap close to the context, so that an answer nobody stops runs for many seconds. Every module of the
    # suite shares this app from one address, far past what one visitor moves: the budget of bytes is
    # tested on apps of its own (test_hardening.py).
    return Settings(
        model="tiny", host="127.0.0.1", port=free_port(), max_new_tokens_cap=4000, address_mib_per_minute=100_000
    )


@pytest.fixture(scope="session")
def launched_chat(never_ends, app_settings):
    """The real app (page + API) served on loopback, over the model that runs until stopped."""
    from orca2_space.cli import launch

    chat = Chat(never_ends, app_settings)
    demo = launch(chat, block=False)
    yield chat, demo.local_url
    demo.close()


@pytest.fixture(scope="session")
def client(launched_chat):
    from gradio_client import Client

    return Client(launched_chat[1], verbose=False)


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def plain_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    app = App(build_tiny_model(folder / "tiny"), folder / "app.log")
    yield app
    app.close()

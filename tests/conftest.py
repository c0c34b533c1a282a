"""Shared fixtures: tiny Orca-2-shaped models built on the fly, and the app launched in-process.

Nothing here touches a hub: HF_HUB_OFFLINE is set before transformers or huggingface_hub load.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny_model import build_tiny_model

from orca2_space.backends.contract import GenerationStats, ModelInfo, StopReason
from orca2_space.backends.local.batching import BatchingSettings
from orca2_space.backends.local.engine import Engine
from orca2_space.chat import Chat
from orca2_space.prompt import EOS, IM_END, OrcaTokenizer, Prompt
from orca2_space.settings import (
    GenerationParams,
    Settings,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS = 180
# Answers left running ask for 4000 tokens; a quarter of that is far above any free server's wait.
STEPS_OF_A_FREE_SERVER = 1000
# "\n", "The", "▁answer": what the scripted models write after "assistant".
SCRIPT = [13, 1576, 1234]
# A third clause that moderation flags; every token id is distinct, as scripts require.
VIOLENT_ANSWER = "\nThe sky looks blue today. Birds sing in green trees; then a violent attack erupts nearby! Done"


@pytest.fixture(scope="session")
def tokenizer() -> OrcaTokenizer:
    return OrcaTokenizer(FIXTURES / "orca2-tokenizer" / "tokenizer.model")


class FakeAnswer:
    """An AnswerStream that writes scripted pieces, one per token, in the reader's thread."""

    notices: tuple[str, ...] = ()
    token_ids: list[int] | None = None  # it writes text, like an inference server

    def __init__(self, pieces: list[str], max_tokens: int, forever: bool):
        self._pieces, self._max_tokens, self._forever = pieces, max_tokens, forever
        self._cancelled = False
        self._started = time.perf_counter()
        self.stats: GenerationStats | None = None

    def __iter__(self):
        n = 0
        reason = StopReason.END_OF_TURN
        while not self._cancelled:
            if n == self._max_tokens:
                reason = StopReason.LENGTH
                break
            if n == len(self._pieces) and not self._forever:
                break
            yield self._pieces[n % len(self._pieces)]
            n += 1
        if self._cancelled:
            reason = StopReason.STOPPED
        self.stats = GenerationStats(n, time.perf_counter() - self._started, reason, seed=None)

    def cancel(self) -> None:
        self._cancelled = True

    def wait(self, timeout: float) -> bool:
        return True  # nothing runs outside the reader's thread


class FakeBackend:
    """A backend with no model, like simonw/llm's MockModel: it answers a script and keeps the
    prompts it was given, so the chat layer's tests run in milliseconds."""

    def __init__(self, tokenizer: OrcaTokenizer, pieces: list[str], forever: bool = False):
        self.tokenizer = tokenizer
        self.info = ModelInfo("fake-orca2", "none", "a test double", "nowhere", 4096)
        self.pieces, self.forever = pieces, forever
        self.prompts: list[Prompt] = []

    def generate(self, prompt: Prompt, params: GenerationParams) -> FakeAnswer:
        self.prompts.append(prompt)
        return FakeAnswer(self.pieces, params.max_new_tokens, self.forever)

    def close(self) -> None:
        pass


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


def batched(engine: Engine, max_concurrent: int = 4) -> Engine:
    """The same loaded model, served through the batcher."""
    return Engine(
        engine.model, engine.tokenizer, engine.info, BatchingSettings(max_concurrent=max_concurrent, cache_tokens=8192)
    )


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


def _safety_server():
    from content_safety_server import Behaviour, ContentSafetyServer

    return ContentSafetyServer(Behaviour(key=SAFETY_KEY, triggers={"violent": ("Violence", 6)}))


@pytest.fixture
def safety_server():
    """Azure AI Content Safety's wire protocol on loopback; "violent" rates Violence 6."""
    with _safety_server() as server:
        yield server


@pytest.fixture(scope="session")
def moderated_app(turns_violent):
    """The app launched with moderation on, over the model whose answer turns violent."""
    from orca2_space.cli import launch, moderation_service
    from orca2_space.settings import ModerationSettings

    with _safety_server() as server:
        rules = ModerationSettings(endpoint=server.endpoint, key=SAFETY_KEY)
        settings = Settings(host="127.0.0.1", port=free_port(), max_new_tokens_cap=1000, moderation=rules)
        demo = launch(Chat(turns_violent, settings, moderation_service(rules)), block=False)
        yield server, demo.local_url
        demo.close()


SAFETY_KEY = "sk-test-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_settings() -> Settings:
    # A cap close to the context, so that an answer nobody stops runs for many seconds.
    return Settings(model="tiny", host="127.0.0.1", port=free_port(), max_new_tokens_cap=4000)


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


def slow_loading_model(folder: Path) -> tuple[Path, bytes]:
    """A model whose tokenizer file is a FIFO: loading it waits until the test writes the bytes."""
    model = build_tiny_model(folder)
    tokenizer = (model / "tokenizer.model").read_bytes()
    (model / "tokenizer.model").unlink()
    os.mkfifo(model / "tokenizer.model")
    return model, tokenizer


def finish_loading(model: Path, tokenizer: bytes) -> None:
    # Non-blocking open: fails at once (instead of hanging) if the app is not reading the file.
    fd = os.open(model / "tokenizer.model", os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as fifo:
        fifo.write(tokenizer)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, what: str) -> None:
    """Poll url until it answers 200; if the process dies or takes too long, stop it and fail with its log."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise AssertionError(f"{what} did not come up at {url}:\n{log.read_text()[-3000:]}")


class App:
    """`python app.py` in a subprocess, with its log kept for checks on the server side."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict | None = None, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self._log = open(log_path, "a")  # noqa: SIM115 - open while the app runs; close() closes it
        command = [
            sys.executable,
            "app.py",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--max-new-tokens-cap",
            "4000",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        wait_until_up(self.url, self.process, log_path, "the app")

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


class TransformersServe:
    """`transformers serve` as a subprocess; with `pinned`, it serves only that folder."""

    def __init__(self, log: Path, pinned: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", *([str(pinned)] if pinned else [])]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32"]
        self.log = log
        with open(log, "wb") as out:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_until_up(f"http://127.0.0.1:{self.port}/health", self.process, log, "transformers serve")

    def steps_a_new_answer_waits(self, model: Path) -> float:
        """How long a new answer waits for its first piece, counted in the server's decode steps (its time
        per token, measured on the same answer, so that a busy machine slows both alike).

        transformers serve writes one answer at a time per model, on one thread (its log says "CB: False":
        no continuous batching), so an earlier answer still being written holds a new one back until it
        ends: thousands of steps for an abandoned 4000-token answer, a few for a server that stopped it."""
        assert f"Model: {model}@main, CB: False" in self.log.read_text()
        client = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=300)
        started, arrivals, usage = time.perf_counter(), [], None
        for chunk in client.completions.create(model=str(model), prompt="Hi", max_tokens=64, stream=True):
            arrivals.append(time.perf_counter())
            usage = chunk.usage or usage
        per_token = (arrivals[-1] - arrivals[0]) / (usage.completion_tokens - 1)
        return (arrivals[0] - started) / per_token

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# Debian's Chromium, driven by Playwright (never `playwright install`); browser tests skip without it.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


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

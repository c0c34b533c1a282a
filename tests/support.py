"""What the tests share: constants, test doubles, tiny-model helpers, servers launched for a test, and
the steps of driving the page in Chromium. Fixtures are in conftest.py; no test module imports another.

Nothing here touches a hub: conftest.py sets HF_HUB_OFFLINE before this module loads transformers.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gradio_client.exceptions
import httpx
import openai
from content_safety_server import Behaviour, ContentSafetyServer
from make_tiny_model import build_tiny_model

from orca2_space.backends.contract import GenerationStats, ModelInfo, StopReason, TokenProbability, scored_tokens
from orca2_space.backends.local.batching import BatchingSettings
from orca2_space.backends.local.engine import Engine
from orca2_space.conversation import Exchange
from orca2_space.presets import PRESET_CHOICES
from orca2_space.prompt import OrcaTokenizer, Prompt
from orca2_space.settings import GenerationParams

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
ROOT = TESTS.parent
# Screenshots the browser tests take, for a person to look at.
ARTIFACTS = TESTS / "artifacts"
# The model card's prompts and the ids its slow tokenizer gives them: ours must equal them exactly.
REFERENCE = json.loads((FIXTURES / "orca2_reference_ids.json").read_text())["cases"]
SERVER_START_SECONDS = 180
# Answers left running ask for 4000 tokens; a quarter of that is far above any free server's wait.
STEPS_OF_A_FREE_SERVER = 1000
# "\n", "The", "▁answer": what the scripted models write after "assistant".
SCRIPT = [13, 1576, 1234]
# A third clause that moderation flags; every token id is distinct, as scripts require.
VIOLENT_ANSWER = "\nThe sky looks blue today. Birds sing in green trees; then a violent attack erupts nearby! Done"
SAFETY_KEY = "sk-test-0123456789abcdef"


# --- A backend with no model ----------------------------------------------------------------------


class Held:
    """Where a held FakeBackend's requests wait until the test releases them: requests that stay in progress
    for exactly as long as a test needs, without a clock."""

    # Bounds a broken test's wait; a working one releases long before.
    LONGEST_SECONDS = 120

    def __init__(self):
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.waiting = 0

    def hold(self) -> None:
        with self._lock:
            self.waiting += 1
        self._released.wait(self.LONGEST_SECONDS)
        with self._lock:
            self.waiting -= 1

    def release(self) -> None:
        self._released.set()


class FakeAnswer:
    """An AnswerStream that writes scripted pieces, one per token, in the reader's thread."""

    notices: tuple[str, ...] = ()
    token_ids: list[int] | None = None  # it writes text, like an inference server

    def __init__(self, pieces: list[str], max_tokens: int, forever: bool, held: Held | None = None):
        self._pieces, self._max_tokens, self._forever, self._held = pieces, max_tokens, forever, held
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
            if n == 1 and self._held is not None:
                self._held.hold()
        if self._cancelled:
            reason = StopReason.STOPPED
        self.stats = GenerationStats(n, time.perf_counter() - self._started, reason, seed=None)

    def cancel(self) -> None:
        self._cancelled = True

    def wait(self, timeout: float) -> bool:
        return True  # nothing runs outside the reader's thread


class FakeBackend:
    """A backend with no model, like simonw/llm's MockModel: it answers a script, scores by a rule, and
    keeps what it was asked, so the chat layer's tests run in milliseconds. With `held`, each answer
    writes its first piece and each scoring starts, then waits for held.release()."""

    def __init__(self, tokenizer: OrcaTokenizer, pieces: list[str], forever: bool = False, held: Held | None = None):
        self.tokenizer = tokenizer
        self.info = ModelInfo("fake-orca2", "none", "a test double", "nowhere", 4096)
        self.pieces, self.forever, self.held = pieces, forever, held
        self.prompts: list[Prompt] = []
        self.whose: list[str] = []
        self.scored: list[tuple[Prompt, list[int], int]] = []

    def generate(self, prompt: Prompt, params: GenerationParams, whose: str = "") -> FakeAnswer:
        self.prompts.append(prompt)
        self.whose.append(whose)
        return FakeAnswer(self.pieces, params.max_new_tokens, self.forever, self.held)

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        self.scored.append((prompt, list(answer_ids), top))
        if self.held is not None:
            self.held.hold()
        return scored_tokens(
            self.tokenizer,
            answer_ids,
            [fake_probability(token) for token in answer_ids],
            [fake_alternatives(token, top) for token in answer_ids],
        )

    def close(self) -> None:
        pass


def fake_probability(token: int) -> float:
    """The probability FakeBackend gives a token: a rule of its id, so a test can say what to expect."""
    return 1 / (2 + token % 7)


def fake_alternatives(token: int, top: int) -> list[tuple[int, float]]:
    """FakeBackend's `top` alternatives at a token: the token itself, then the ids after it, halving."""
    return [(token + rank, fake_probability(token) / 2**rank) for rank in range(top)]


def as_messages(pairs: list[tuple[str, str]]) -> list[dict]:
    """(question, answer) pairs as the {"role", "content"} history /chat takes."""
    return [
        message
        for question, answer in pairs
        for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    ]


def exchange(question="Q", answer="A", **fields) -> Exchange:
    """A conversation's exchange as the page records it, with the fields a test doesn't care about filled in."""
    values = dict(
        question=question, answer=answer, system_message="sys", single_turn=False, settings=GenerationParams()
    )
    return Exchange(**{**values, **fields})


# --- Tiny models ----------------------------------------------------------------------------------

QUESTIONS = ["How are you?", "What is 2 + 2?", "Name a colour.", "Why is the sky blue?"]


def prompt_for(engine: Engine, message: str = "How are you?") -> Prompt:
    return engine.tokenizer.build("You are Orca.", [], message, max_new_tokens=64)


def answer(engine: Engine, question: str, **params) -> tuple[str, GenerationStats]:
    generation = engine.generate(prompt_for(engine, question), GenerationParams(**{"max_new_tokens": 40, **params}))
    return "".join(generation), generation.stats


def batched(engine: Engine, max_concurrent: int = 4) -> Engine:
    """The same loaded model, served through the batcher."""
    return Engine(
        engine.model, engine.tokenizer, engine.info, BatchingSettings(max_concurrent=max_concurrent, cache_tokens=8192)
    )


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


# --- Servers a test launches ----------------------------------------------------------------------


class Clock:
    """A clock a test moves by hand (clock.now += seconds), for what takes a clock= to read the time."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll until condition() holds. The deadline bounds a broken program (it is no speed test): past
    it the test fails saying what never happened, instead of hanging."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {seconds:.0f} s waiting for {what}")
        time.sleep(0.01)


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


def content_safety() -> ContentSafetyServer:
    """Azure AI Content Safety's wire protocol on loopback (enter it to serve); "violent" rates Violence 6."""
    return ContentSafetyServer(Behaviour(key=SAFETY_KEY, triggers={"violent": ("Violence", 6)}))


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


# --- The page in Chromium -------------------------------------------------------------------------

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
NO_CHROMIUM = not Path(CHROMIUM).exists()
NO_CHROMIUM_REASON = "Debian's chromium is not installed (apt-get install chromium)"
# Waits are on the page's own signals (the status line's data-state), never fixed sleeps.
DONE = "#answer-status [data-state=done]"
NEW_DONE = "#answer-status [data-state=done]:not([data-seen])"


def open_app(page, app: App, model_ready: bool = True) -> None:
    page.goto(app.url)
    page.wait_for_selector("#message textarea")
    if model_ready:  # the page is up before the model is loaded (in its own process: on a busy machine, a while)
        page.wait_for_selector("#model-status:has-text('Weights')", timeout=SERVER_START_SECONDS * 1000)


def mark_status_seen(page) -> None:
    """Mark the current status so that waiting for NEW_DONE waits for the next answer."""
    page.evaluate("document.querySelectorAll('#answer-status [data-state]').forEach(e => e.dataset.seen = '1')")


def click_and_wait_for_answer(page, selector: str) -> None:
    mark_status_seen(page)
    page.click(selector)
    page.wait_for_selector(NEW_DONE)


def send(page, text: str) -> None:
    page.fill("#message textarea", text)
    click_and_wait_for_answer(page, "#send")


def answers(page) -> list[str]:
    return page.locator("#chatbot [data-testid=bot]").all_inner_texts()


def open_sampling(page) -> None:
    page.get_by_text("Sampling", exact=True).click()
    page.wait_for_selector("#max-new-tokens input[type=number]")


def set_number(page, selector: str, value: float) -> None:
    field = page.locator(selector)
    field.fill(str(value))
    field.blur()


def download(page, button: str) -> str:
    with page.expect_download() as started:
        page.click(button)
    return open(started.value.path()).read()


def fits(page, selector: str) -> bool:
    """Whether the text of the input (its value, or its placeholder when empty) shows in full: none of
    it past the input's padding or under a dropdown's caret (which Gradio lays over the input's end)."""
    return page.locator(selector).evaluate(
        """field => { const style = getComputedStyle(field);
        const text = field.value || field.placeholder;
        const measure = document.createElement('canvas').getContext('2d');
        measure.font = style.font;
        const box = field.getBoundingClientRect();
        const caret = field.parentElement.querySelector('.icon-wrap');
        const end = caret ? Math.min(caret.getBoundingClientRect().left, box.right) : box.right;
        const room = end - box.left - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        return field.scrollWidth <= field.clientWidth && measure.measureText(text).width <= room; }"""
    )


def preset_labels_shown(page, dropdown: str) -> list[tuple[str, bool]]:
    """Each preset chosen in turn: its label, and whether it reads in full."""
    shown = []
    for label, _ in PRESET_CHOICES:
        page.click(f"{dropdown} input")
        page.get_by_role("option", name=label, exact=True).click()
        page.wait_for_function(f"document.querySelector('{dropdown} input').value == {json.dumps(label)}")
        shown.append((label, fits(page, f"{dropdown} input")))
    return shown


# --- Texts a message may hold ---------------------------------------------------------------------

# Shown exactly as written, character for character.
AS_WRITTEN = [
    "In HTML, what does <div> do compared with <span>?",
    "a < b > c",
    "&amp; is five characters; &lt; and &#60; and &nbsp; too",
    "AT&T & co",
    "<script>alert(1)</script>",
    "<b>not bold</b> <!-- not a comment --> <?php echo 1; ?> <![CDATA[x]]>",
    "\\*not emphasis\\* and \\`not code\\` and C:\\temp\\new\\",
    "a \\ backslash, \\\\ two, \\n and \\d+\\.\\d+",
    "Prices: $1.10 and $2.20, a lone $$ too",
    "emoji 🙂 and CJK 漢字 and RTL שלום",
]

# Every way a message could make the browser fetch something. HOST stands for an attacker's server.
LOADERS = [
    "![chart](http://HOST/md.png)",
    '![chart](http://HOST/md-title.png "title")',
    "![ref][r]\n\n[r]: http://HOST/ref.png",
    "![r2]\n\n[r2]: http://HOST/shortcut.png",
    "[![nested](http://HOST/nested.png)](http://example.com)",
    '<img src="http://HOST/img.png">',
    '<img srcset="http://HOST/srcset.png 1x">',
    '<picture><source srcset="http://HOST/source.png"></picture>',
    '<iframe src="http://HOST/frame"></iframe>',
    '<link rel="stylesheet" href="http://HOST/style.css">',
    "<style>@import url(http://HOST/import.css);</style>",
    '<video poster="http://HOST/poster.png" src="http://HOST/video.mp4"></video>',
    '<audio src="http://HOST/audio.mp3" autoplay></audio>',
    '<object data="http://HOST/object"></object> <embed src="http://HOST/embed">',
    '<svg><image href="http://HOST/svg.png"/></svg>',
    '<div style="background:url(http://HOST/bg.png)">x</div>',
    '<input type="image" src="http://HOST/input.png">',
    "&lt;img src=http://HOST/entity.png&gt;",
    "<http://HOST/autolink.png>",
    "http://HOST/bare.png",  # a whole message that is an image's address (Gradio 6 keeps a string as text)
    "http://example.com/`<img src=http://HOST/after-url.png>`",
    "$$\\includegraphics{http://HOST/katex.png}$$ \\(\\href{http://HOST/href}{x}\\)",
    "```mermaid\ngraph TD\n  A[\"<img src='http://HOST/mermaid.png'>\"]\n```",
]


# The front end of an inference server without torch (test_torch_free.py, bench/startup.py)

# What requirements.txt has and requirements-remote.txt leaves out.
LOCAL_ONLY = ("torch", "transformers", "accelerate", "bitsandbytes")
# Python imports sitecustomize at start-up from the first folder on PYTHONPATH that has one.
SITECUSTOMIZE = '''"""These packages look uninstalled: importing one raises ModuleNotFoundError, find_spec finds
nothing, and importlib.metadata doesn't list them, as in an environment that never had them."""

import importlib.machinery
import sys

HIDDEN = {hidden!r}


def _hidden(name):
    return (name or "").partition(".")[0].lower().replace("-", "_") in HIDDEN


class Uninstalled(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        return None if _hidden(fullname) else super().find_spec(fullname, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (d for d in super().find_distributions(*args, **kwargs) if not _hidden(d.metadata["Name"]))


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Uninstalled
'''


def environment_without(folder: Path, packages: tuple[str, ...] = LOCAL_ONLY) -> dict[str, str]:
    """Environment variables for a Python process in which `packages` are not installed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=set(packages)))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def page_request(session: str | None, address: str = "10.16.3.80"):
    """A page event's gr.Request, as Gradio hands it to a handler: a session, from an address."""
    import gradio as gr
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "client": (address, 50000)}
    return gr.Request(request=Request(scope), session_hash=session)


def uploaded(name: str, data: bytes) -> Path:
    """A file where Gradio puts an upload: in a folder of its own in the upload folder."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / f"test-upload-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def refusal(job) -> str:
    """Why a gradio_client job was refused: by the fair share in the app (an AppError), or at the door,
    once the address's places were all taken or it had as many waiting in the queue as it may (guard.py:
    a 429 whose detail says why)."""
    try:
        job.result()
    except gradio_client.exceptions.AppError as error:
        return str(error)
    except httpx.HTTPStatusError as error:
        assert error.response.status_code == 429 and error.response.headers["retry-after"] == "1"
        return error.response.json()["detail"]
    raise AssertionError("the job was not refused")

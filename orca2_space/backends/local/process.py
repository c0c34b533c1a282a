"""The local model in a process of its own, as vLLM's engine core runs apart from its API server.

In one process, the web server's Python work (reading a large request's JSON, rendering a long
conversation, writing a stream) holds the interpreter's lock while it runs, and the model's thread
needs that lock between every two torch calls of a decode step: a script sending such requests one
after another made an honest visitor's first token 4-7 times slower (docs/performance.md, "Under
attack"). Here the web server's process keeps the tokenizer and the answers' streams; the model's
process runs the Engine, and the two share only the machine's cores.

What crosses between them, over one pipe: the ids of a prompt and its settings one way, each id the
model writes and how its answer ended the other; a scoring's ids and its result; Stop.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ...prompt import OrcaTokenizer, Prompt
from ...settings import GenerationParams
from ..answer import Answer, Feed
from ..contract import (
    GenerationError,
    GenerationStats,
    ModelInfo,
    ModelLoadError,
    TokenProbability,
    load_failure_message,
)
from .batching import BatchingSettings

log = logging.getLogger(__name__)

# Seconds the model's process has to finish its answers and end once the app closes, before it is killed.
CLOSE_SECONDS = 10.0


class ModelProcess:
    """A Backend whose model runs in a child process (spawned: a fork would copy the web server's threads
    and locks). Answers stream from it through Feeds here, decoded here with the same tokenizer."""

    def __init__(self, process: Any, connection: Connection, tokenizer: OrcaTokenizer, info: ModelInfo):
        self.tokenizer, self.info = tokenizer, info
        self._process, self._connection = process, connection
        self._sending = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._answers: dict[int, Feed] = {}
        self._scorings: dict[int, concurrent.futures.Future] = {}
        self._ended: str | None = None  # why the model's process is gone, once it is
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="orca2-model-process", daemon=True)
        self._reader.start()
        # Before multiprocessing's own exit handler (registered earlier, so run later) would kill it.
        atexit.register(self.close)

    @classmethod
    def load(
        cls,
        model_name: str,
        quantization: str = "auto",
        on_phase: Callable[[str], None] = lambda phase: None,
        batching: BatchingSettings | None = None,
    ) -> ModelProcess:
        """Start the model's process and wait until its model is ready; on_phase hears its phases."""
        on_phase("starting the model's process")
        context = multiprocessing.get_context("spawn")
        connection, theirs = context.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        process = context.Process(
            target=_serve, args=(theirs, model_name, quantization, batching, level), name="orca2-model", daemon=True
        )
        process.start()
        theirs.close()
        try:
            while True:
                kind, said = connection.recv()
                if kind == "phase":
                    on_phase(said)
                elif kind == "failed":
                    raise ModelLoadError(said)
                else:
                    info, tokenizer = said
                    break
        except EOFError as error:
            process.join(CLOSE_SECONDS)
            raise ModelLoadError(load_failure_message(model_name, _ended(process))) from error
        except BaseException:
            process.kill()
            raise
        return cls(process, connection, tokenizer, info)

    def generate(self, prompt: Prompt, params: GenerationParams, whose: str = "") -> Answer:
        """Start answering in the model's process; the Answer streams its text (Engine.generate)."""
        feed = Feed(None)
        number = next(self._ids)
        with self._lock:
            self._answers[number] = feed
        feed.on_cancel = lambda: self._send("cancel", number)
        feed.alive = self._reader.is_alive
        self._send("generate", number, prompt.input_ids, params, whose)
        return Answer(feed, self.tokenizer)

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        """Engine.score, in the model's process; its errors (ScoringUnavailable) are raised here."""
        result: concurrent.futures.Future = concurrent.futures.Future()
        number = next(self._ids)
        with self._lock:
            self._scorings[number] = result
        self._send("score", number, prompt, list(answer_ids), top)
        return result.result()

    def close(self) -> None:
        """End the model's process: it closes its engine (answers in flight end with an error)."""
        if self._closing:
            return
        self._closing = True
        self._send("close")
        self._process.join(CLOSE_SECONDS)
        if self._process.is_alive():
            self._process.kill()
        self._reader.join(CLOSE_SECONDS)

    def _send(self, *message) -> None:
        try:
            with self._sending:
                self._connection.send(message)
        except (OSError, ValueError):  # the pipe is closed: the reader ends what waits, and says why
            self._end_all()

    def _read(self) -> None:
        """Deliver what the model's process sends until it ends; then end what still waits for it."""
        try:
            while True:
                kind, number, *said = self._connection.recv()
                if kind == "ids":
                    if (feed := self._answers.get(number)) is not None:
                        feed.push(said[0])
                elif kind == "end":
                    self._finish(number, *said)
                else:
                    self._scored(number, *said)
        except (EOFError, OSError):
            pass
        self._process.join(CLOSE_SECONDS)
        self._ended = _ended(self._process)
        if not self._closing:
            log.error("the model's process has ended: %s", self._ended)
        self._end_all()

    def _finish(self, number: int, stats: GenerationStats, failure: str | None, notices: tuple[str, ...]) -> None:
        with self._lock:
            feed = self._answers.pop(number, None)
        if feed is None:
            return
        feed.notices = notices
        feed.close(GenerationError(failure) if failure else None, stats=stats)

    def _scored(self, number: int, result: list[TokenProbability] | None, error: BaseException | None) -> None:
        with self._lock:
            future = self._scorings.pop(number, None)
        if future is None:
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _end_all(self) -> None:
        """End every answer and scoring still waiting: the model's process can't finish them."""
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            return  # the reader does it once the process is gone
        error = GenerationError(
            f"The model's process has stopped ({self._ended or 'it ended'}): the server needs a restart "
            "before it can answer again."
        )
        with self._lock:
            answers, self._answers = list(self._answers.values()), {}
            scorings, self._scorings = list(self._scorings.values()), {}
        for feed in answers:
            feed.close(error)
        for future in scorings:
            future.set_exception(error)


def _ended(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "it stopped answering"
    if code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    return f"exit code {code}"


# --- The model's process ----------------------------------------------------------------------------


def _serve(
    connection: Connection, model_name: str, quantization: str, batching: BatchingSettings | None, level: int
) -> None:
    """The model's process: load the Engine, then answer what the web server's process sends."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl+C in a terminal reaches the whole process group: the web server's process decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .engine import Engine

    sending = threading.Lock()

    def send(*message) -> None:
        try:
            with sending:
                connection.send(message)
        except OSError:  # the web server's process is gone: the loop below ends too
            pass

    try:
        engine = Engine.load(model_name, quantization, lambda phase: send("phase", phase), batching)
    except ModelLoadError as error:
        send("failed", str(error))
        return
    send("ready", (engine.info, engine.tokenizer))
    answers: dict[int, Feed] = {}
    try:
        while True:
            kind, *said = connection.recv()
            if kind == "generate":
                _start(engine, answers, send, *said)
            elif kind == "cancel":
                if (feed := answers.get(said[0])) is not None:
                    feed.cancel()
            elif kind == "score":
                threading.Thread(target=_score, args=(engine, send, *said), daemon=True).start()
            else:
                break
    except (EOFError, OSError):  # the web server's process is gone, however it ended
        pass
    finally:
        engine.close()
        # transformers' batch manager runs a thread that isn't a daemon, which would keep this process
        # (and the model's memory) alive once its web server is gone: nothing is left to do here.
        logging.shutdown()
        os._exit(0)


def _start(engine, answers: dict[int, Feed], send: Callable[..., None], number: int, *request) -> None:
    relay = functools.partial(_Relayed, send, number, lambda: answers.pop(number, None))
    try:
        answers[number] = feed = engine.produce(*request, feed=relay)
    except Exception as error:  # the answer fails, the process goes on serving
        log.exception("generation failed to start")
        relay(None).close(error)
        return
    if feed.done.is_set():  # it ended before it was listed
        answers.pop(number, None)


class _Relayed(Feed):
    """An answer's Feed in the model's process: each id, and how the answer ended, go to the web
    server's process as they are written."""

    def __init__(self, send: Callable[..., None], number: int, forget: Callable[[], object], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._send, self._number, self._forget = send, number, forget

    def push(self, token: int) -> None:
        super().push(token)
        self._send("ids", self._number, token)

    def _close(self, error, reason, stats) -> None:
        super()._close(error, reason, stats)
        self._forget()
        failure = None if self.failure is None else str(self.failure)
        self._send("end", self._number, self.stats, failure, self.notices)


def _score(engine, send: Callable[..., None], number: int, prompt: Prompt, answer_ids: list[int], top: int) -> None:
    try:
        send("scored", number, engine.score(prompt, answer_ids, top), None)
    except Exception as error:  # noqa: BLE001 - the caller's to raise (ScoringUnavailable, a failed pass)
        try:
            send("scored", number, None, error)
        except (pickle.PicklingError, TypeError, AttributeError):  # an error that doesn't pickle goes as its words
            send("scored", number, None, RuntimeError(f"{type(error).__name__}: {error}"))

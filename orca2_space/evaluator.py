"""An evaluation run: every (question × system message) answer goes through the backend as a compared
answer does (the chat's own _respond: /chat's prompt, moderation and stream), and is graded as it
finishes. Chat.evaluation_request and Chat.evaluate are the way in, for the page and /evaluate alike.

An evaluation is one request of the fair share, however many answers it runs, and it keeps at most N
of them in flight: the batch's places (--concurrency) while it is alone, the part --evaluation-share
gives it while other requests hold places, so that a chat visitor's answer joins the batch at the next
decode step instead of waiting for an evaluation's answers to end. When others arrive, the answers over
that part that have written least are stopped and asked again later: greedy answers come out the same,
and a sampled evaluation uses one seed for all, so a repeat is the same answer too.

Stop (Chat.stop(owner)), or the caller leaving, ends every answer it has running; the answers that
finished stay, and the last progress says finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .backends.contract import GenerationStats, StopReason
from .evaluation import Cell, Evaluation, summarize
from .fairness import Refused
from .grading import Graded, Grading, Rule, Verdict, grade
from .prompt import PromptTooLong
from .questions import QuestionSet, questions_from_records
from .settings import GenerationParams, InvalidRequest, validate_params

if TYPE_CHECKING:
    from .chat import Chat, ChatUpdate

log = logging.getLogger(__name__)

# An evaluation sets 1 to 4 system messages against each other, as Compare does side by side.
EVALUATED = range(1, 5)
# How often progress is reported while no answer finishes (its speed and time left), and how soon a
# caller that left is noticed.
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class EvaluationRequest:
    questions: QuestionSet
    system_messages: tuple[str, ...]
    grading: Grading
    params: GenerationParams
    # What the caller asked for; None leaves it to the server's default.
    moderation: bool | None = None
    # Messages about the request itself (clamped settings).
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluationProgress:
    """The evaluation so far: every finished cell, graded. The last progress has finished=True."""

    evaluation: Evaluation
    done: int
    total: int
    answers_per_second: float | None
    seconds_left: float | None
    finished: bool
    notices: tuple[str, ...] = ()

    def as_api_dict(self, since: int = 0) -> dict[str, Any]:
        """For /evaluate: the counts, the cells finished after the first `since` (a stream sends each
        cell once), and on the last update the results: accuracy per system message with its interval,
        the paired tests and every cell."""
        shown: dict[str, Any] = {
            "done": self.done,
            "total": self.total,
            "answers_per_second": _rounded(self.answers_per_second),
            "seconds_left": _rounded(self.seconds_left),
            "finished": self.finished,
            "notices": list(self.notices),
            "new_cells": [cell_dict(self.evaluation, cell) for cell in self.evaluation.cells[since:]],
        }
        if self.finished:
            shown["results"] = results_dict(self.evaluation)
            shown["cells"] = [cell_dict(self.evaluation, cell) for cell in _in_order(self.evaluation.cells)]
        return shown


def cell_dict(evaluation: Evaluation, cell: Cell) -> dict[str, Any]:
    stats = cell.stats or {}
    return {
        "question": cell.question,
        "id": evaluation.questions.questions[cell.question].id,
        "message": cell.message,
        "answer": cell.answer,
        "extracted": cell.graded.extracted,
        "verdict": None if cell.verdict is None else cell.verdict.value,
        "error": cell.error,
        "stop_reason": stats.get("stop_reason"),
        "n_tokens": stats.get("n_tokens"),
        "prompt_ids": None if cell.prompt_ids is None else list(cell.prompt_ids),
        "answer_ids": None if cell.answer_ids is None else list(cell.answer_ids),
    }


def results_dict(evaluation: Evaluation) -> dict[str, Any]:
    summary = summarize(evaluation)
    return {
        "grading": evaluation.grading.describe(),
        "messages": [
            dataclasses.asdict(result) | {"system_message": evaluation.system_messages[result.message]}
            for result in summary.messages
        ],
        "pairs": [dataclasses.asdict(pair) for pair in summary.pairs],
    }


def _in_order(cells: tuple[Cell, ...]) -> list[Cell]:
    return sorted(cells, key=lambda cell: (cell.question, cell.message))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class EvaluationSlots:
    """The evaluations running at once, over every visitor (--max-evaluations)."""

    def __init__(self, most: int):
        self.most = most
        self._running = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._running >= self.most:
                raise Refused(
                    f"{self._running} evaluation{'' if self._running == 1 else 's'} running, this server's limit "
                    "(--max-evaluations). Try again when one has finished."
                )
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1


def grading_of(rule: Any, pattern: Any = None) -> Grading:
    """A scoring rule from untrusted values (the API's rule and pattern)."""
    if not isinstance(rule, str) or rule not in Rule._value2member_map_:
        rules = ", ".join(r.value for r in Rule)
        raise InvalidRequest(f"rule must be one of {rules}; got {rule!r:.60}")
    if pattern is not None and not isinstance(pattern, str):
        raise InvalidRequest(f"pattern must be text, got {type(pattern).__name__}")
    if (rule == Rule.REGEX) != (pattern is not None):
        raise InvalidRequest("pattern is for rule 'regex' only, and that rule needs one")
    try:
        return Grading(Rule(rule), pattern)
    except InvalidRequest:
        raise
    except ValueError as error:
        raise InvalidRequest(f"pattern: {error}") from error


def evaluation_request(
    chat: Chat, questions: Any, system_messages: Any, grading: Any, moderation: Any, params: dict[str, Any]
) -> EvaluationRequest:
    """A validated evaluation from untrusted values; raises InvalidRequest naming what is wrong, or
    fairness.Refused for a request over this server's caps."""
    settings = chat.settings
    most = settings.max_evaluation_rows
    if isinstance(questions, QuestionSet):
        if len(questions.questions) > most:
            raise Refused(_too_many(len(questions.questions), most))
    elif isinstance(questions, list):
        if len(questions) > most:  # before a row is read
            raise Refused(_too_many(len(questions), most))
        questions = questions_from_records(questions, most, settings.max_message_chars)
    else:
        raise InvalidRequest(
            f"questions must be a list of records such as {{'question': ..., 'answer': ...}}, "
            f"got {type(questions).__name__}"
        )
    if not questions.questions:
        raise InvalidRequest("questions: there are none to ask")
    systems = _system_messages(system_messages, settings.max_message_chars)
    if not isinstance(grading, Grading):
        raise InvalidRequest(f"grading must be a scoring rule, got {type(grading).__name__}")
    if moderation is not None and not isinstance(moderation, bool):
        raise InvalidRequest(f"moderation must be true or false, got {moderation!r:.40}")
    generation, notices = validate_params(params, settings.max_new_tokens_cap)
    if generation.do_sample and generation.seed is None:
        # One seed for every answer: the answers differ by question and system message alone, and a
        # repeat (an answer asked again after it gave way to others) is the same answer.
        generation = generation.model_copy(update={"seed": secrets.randbelow(2**32)})
    return EvaluationRequest(questions, systems, grading, generation, moderation, tuple(notices))


def _too_many(rows: int, most: int) -> str:
    return f"questions: {rows:,} rows; this server evaluates at most {most:,} at a time (--max-evaluation-rows)."


def _system_messages(value: Any, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or len(value) not in EVALUATED:
        got = f"{len(value)} of them" if isinstance(value, list | tuple) else f"a {type(value).__name__}"
        raise InvalidRequest(
            f"system_messages must be a list of {EVALUATED.start} to {EVALUATED.stop - 1} texts; got {got}"
        )
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise InvalidRequest(f"system_messages[{index}] must be text, got {type(text).__name__}")
        if len(text) > limit:
            raise InvalidRequest(
                f"system_messages[{index}] is {len(text):,} characters; this server accepts at most {limit:,}."
            )
    return tuple(value)


class _Answer:
    """One cell being answered: the owner its answer runs under (for stopping it alone), and how far it got."""

    def __init__(self, question: int, message: int, key: str):
        self.question, self.message, self.key = question, message, key
        self.updates = 0
        self.cancelled = threading.Event()
        # Stopped to make room for other requests: asked again later.
        self.gave_way = False


@dataclass(frozen=True)
class _Finished:
    answer: _Answer
    # None: it was stopped before it finished.
    cell: Cell | None
    notices: tuple[str, ...] = ()


class Run:
    """One evaluation's answers: what stop(owner) reaches (cancel), and the progress it streams."""

    def __init__(self, chat: Chat, request: EvaluationRequest, whose: str = ""):
        self._chat = chat
        self._request = request
        self._whose = whose  # whose share of the batch its answers take (Backend.generate)
        self._key = f"evaluate-{secrets.token_hex(8)}"
        self._stopped = threading.Event()
        self._updates: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight: list[_Answer] = []
        self._lock = threading.Lock()
        self._notices: dict[str, None] = dict.fromkeys(request.notices)

    def cancel(self) -> None:
        """Stop: every answer in flight ends after the current decode step, and none starts."""
        with self._lock:  # _fill starts no answer after this
            self._stopped.set()
            running = list(self._in_flight)
        for answer in running:
            self._stop(answer)

    def _stop(self, answer: _Answer) -> None:
        answer.cancelled.set()
        self._chat.stop(answer.key)

    def progress(self, owner: str | None) -> Iterator[EvaluationProgress]:
        chat, request = self._chat, self._request
        evaluation = Evaluation(
            request.questions, request.system_messages, request.grading, request.params.model_dump(), {}
        )
        for waiting in chat._wait_for_backend():
            yield self._progress(evaluation, 0, None, finished=False, extra=(waiting,))
        if chat.loading.backend is None:
            failed = f"Orca 2 could not be loaded, so it can't answer. {chat.loading.error}"
            yield self._progress(evaluation, 0, None, finished=True, extra=(failed,))
            return
        evaluation = dataclasses.replace(evaluation, model=self._model())
        # Question by question: a question's answers under every system message come together, so the
        # paired figures fill in as the run goes.
        pending = deque(
            (q, m) for q in range(len(request.questions.questions)) for m in range(len(request.system_messages))
        )
        started, answered, shown = time.perf_counter(), 0, 0.0
        with chat._owned(owner, self), chat.fair_share.listening(lambda: self._updates.put(_ARRIVED)):
            while self._in_flight or (pending and not self._stopped.is_set()):
                if not self._stopped.is_set():
                    self._fill(pending)
                changed = False
                for item in _drain(self._updates, HEARTBEAT_SECONDS):
                    if not isinstance(item, _Finished):
                        continue  # another request was let in: _fill looks at the fair share again
                    with self._lock:
                        self._in_flight.remove(item.answer)
                    self._notices.update(dict.fromkeys(item.notices))
                    if item.cell is not None:
                        evaluation, answered, changed = evaluation.with_cell(item.cell), answered + 1, True
                    elif item.answer.gave_way and not self._stopped.is_set():
                        pending.appendleft((item.answer.question, item.answer.message))
                now = time.perf_counter()
                if changed or now - shown >= HEARTBEAT_SECONDS:
                    shown = now
                    yield self._progress(evaluation, answered, now - started, finished=False)
        done, total = len(evaluation.cells), evaluation.total
        stopped = (f"Stopped after {done} of {total} answers.",) if done < total else ()
        yield self._progress(evaluation, answered, time.perf_counter() - started, finished=True, extra=stopped)

    def _progress(
        self, evaluation: Evaluation, answered: int, seconds: float | None, finished: bool, extra: tuple[str, ...] = ()
    ) -> EvaluationProgress:
        done, total = len(evaluation.cells), evaluation.total
        rate = answered / seconds if answered and seconds else None
        left = None if rate is None or finished else (total - done) / rate
        notices = (*self._notices, *extra)
        return EvaluationProgress(evaluation, done, total, rate, left, finished, notices)

    def _model(self) -> dict[str, Any]:
        """What the answers came from, for an export that re-runs them exactly."""
        backend, settings, params = self._chat.backend, self._chat.settings, self._request.params
        return {
            "name": backend.info.name,
            "backend": settings.backend,
            "weights": backend.info.quantization,
            "device": backend.info.device,
            "served_by": backend.info.served_by,
            "app_version": __version__,
            "seeds": f"one seed for every answer ({params.seed})" if params.do_sample else "greedy: none",
        }

    def _fill(self, pending: deque[tuple[int, int]]) -> None:
        """Start answers up to the limit; over it (others arrived), the answers that wrote least give way."""
        limit = self._limit()
        with self._lock:
            live = [answer for answer in self._in_flight if not answer.cancelled.is_set()]
        for answer in sorted(live, key=lambda a: a.updates)[: max(0, len(live) - limit)]:
            answer.gave_way = True
            self._stop(answer)
        for _ in range(limit - len(live)):
            if not pending:
                break
            question, message = pending.popleft()
            answer = _Answer(question, message, f"{self._key}/{question}/{message}")
            with self._lock:
                if self._stopped.is_set():
                    return
                self._in_flight.append(answer)
            threading.Thread(target=self._answer, args=(answer,), name="orca2-evaluate", daemon=True).start()

    def _limit(self) -> int:
        """How many answers this evaluation may have in flight now."""
        settings = self._chat.settings
        # Every answer of the local model joins the batch, sampled ones too (seeded_sampling.py).
        shares_steps = settings.backend == "inference-server" or (settings.backend == "local" and settings.batching)
        if not shares_steps:
            return 1  # the model answers them one at a time: more would queue ahead of other visitors
        if self._chat.fair_share.in_progress() > 1:  # places besides this evaluation's own
            return max(1, math.floor(settings.evaluation_share * settings.concurrency))
        return settings.concurrency

    def _answer(self, answer: _Answer) -> None:
        """One cell's answer, put on the updates as _Finished once it is over."""
        finished = _Finished(answer, None)
        try:
            finished = self._cell(answer)
        except Exception as error:
            log.exception("an evaluated answer failed")
            failed = Cell(answer.question, answer.message, "", _NOTHING, error=f"This answer failed: {error}")
            finished = _Finished(answer, failed)
        finally:
            self._updates.put(finished)

    def _cell(self, answer: _Answer) -> _Finished:
        chat, request = self._chat, self._request
        question = request.questions.questions[answer.question]
        system = request.system_messages[answer.message]
        params = request.params.model_dump()
        try:
            asked = chat.request(question.prompt, system, None, request.moderation, True, **params)
            prompt = chat.prompt_for(question.prompt, system, None, request.params.max_new_tokens)
        except (InvalidRequest, PromptTooLong) as error:  # this row can't be asked; the run goes on
            return _Finished(answer, Cell(answer.question, answer.message, "", _NOTHING, error=str(error)))
        last: ChatUpdate | None = None
        for update in chat._respond(asked, answer.key, self._whose):
            if answer.cancelled.is_set():  # an answer that started after its stop stops now
                chat.stop(answer.key)
            answer.updates += 1
            last = update
        if last is None or _stopped(last):
            return _Finished(answer, None)
        error = last.error or last.withheld
        graded = _NOTHING if error else grade(request.grading, question, last.answer)
        cell = Cell(
            answer.question,
            answer.message,
            last.answer,
            graded,
            answer_ids=last.answer_ids,
            prompt_ids=tuple(prompt.input_ids),
            stats=None if last.stats is None else _stats(last.stats),
            error=error,
        )
        return _Finished(answer, cell, last.notices)


# Put on a run's updates when another request is let in.
_ARRIVED = object()
# A cell without an answer (its error says why) has no verdict; this fills its graded field.
_NOTHING = Graded(None, Verdict.NO_ANSWER)


def _stopped(update: ChatUpdate) -> bool:
    """Cancelled before it ended by itself (moderation withholding an answer stops it too, and that counts)."""
    return update.withheld is None and update.stats is not None and update.stats.stop_reason == StopReason.STOPPED


def _stats(stats: GenerationStats) -> dict[str, Any]:
    return {
        "n_tokens": stats.n_tokens,
        "seconds": round(stats.seconds, 3),
        "stop_reason": stats.stop_reason.value,
        "seed": stats.seed,
        "batched": stats.batched,
    }


def _drain(updates: queue.SimpleQueue, timeout: float) -> list:
    """What is there, waiting up to timeout for the first."""
    try:
        items = [updates.get(timeout=timeout)]
    except queue.Empty:
        return []
    while not updates.empty():
        items.append(updates.get_nowait())
    return items

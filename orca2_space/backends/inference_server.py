"""The chat on an OpenAI-compatible inference server (vLLM, TGI, transformers serve) instead of a
local model: the same prompts, streaming, Stop and moderation, the model's work done elsewhere.

Fidelity: the server gets the exact prompt the local engine would use, as token ids where it
accepts them (vLLM's /v1/completions does) and otherwise as the exact ChatML text, always through
the completions endpoint so that no server-side chat template rewrites it; generation stops at
<|im_end|>, and control text never reaches the page even when a server echoes its stop string.

The client is the `openai` library; each answer is an answer.Answer whose producer, a thread per
answer, writes the streamed text to its Feed. Nothing here imports torch or transformers: with this
backend the app runs on the smaller install of requirements-remote.txt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# The openai library looks httpx up in sys.modules on every call (to accept its types too), without
# waiting for an import under way: the page imports httpx in another thread while the backend loads.
# Imported here, it is whole before any client is made.
import httpx  # noqa: F401
import httpx2
import openai
from openai import Stream, omit
from openai.types import Completion

from ..prompt import CONTROL_TEXT, DEFAULT_CONTEXT_LENGTH, IM_END, IM_START, OrcaTokenizer, Prompt
from ..settings import GenerationParams, InferenceServerSettings
from .answer import Answer, Feed
from .contract import (
    INFERENCE_SERVER_SAMPLING,
    GenerationError,
    ModelInfo,
    ModelLoadError,
    ScoringUnavailable,
    StopReason,
    TokenProbability,
    load_failure_message,
    scored_tokens,
)
from .sampling import Sampling

log = logging.getLogger(__name__)

CONTROL_TEXTS = (CONTROL_TEXT[IM_END], CONTROL_TEXT[IM_START])

TYPED_CONTROL_TEXT = (
    "This inference server reads prompts as text, so the <|im_start|> or <|im_end|> typed in the conversation "
    "would act as a real control token there. Remove it, or use a server that takes token ids (vLLM)."
)


@dataclass(frozen=True)
class Dialect:
    """How one kind of server takes the prompt and the settings the OpenAI API has no field for."""

    name: str
    takes_ids: bool
    extras: str  # "vllm": top-level top_k etc.; "generation_config": transformers serve's; "none"


# Most faithful first; the first one a server accepts is kept for the process's lifetime.
DIALECTS = (
    Dialect("token ids, vLLM sampling fields", takes_ids=True, extras="vllm"),
    Dialect("exact text, transformers generation_config", takes_ids=False, extras="generation_config"),
    Dialect("exact text, OpenAI fields only", takes_ids=False, extras="none"),
)


def completion_request(
    model: str, prompt: list[int] | str, sampling: Sampling, dialect: Dialect
) -> tuple[dict, list[str]]:
    """The arguments of `completions.create` for these settings (fields the OpenAI API lacks go in
    extra_body), and the settings this dialect can't carry, to tell the user."""
    request: dict = {
        "model": model,
        "prompt": prompt,
        "max_tokens": sampling.max_new_tokens,
        "stream": True,
        # <|im_start|> too: a new turn means this one is over (the local engine stops there as well).
        "stop": list(CONTROL_TEXTS),
    }
    if sampling.seed is not None:
        request["seed"] = sampling.seed
    if dialect.extras == "generation_config":
        request["extra_body"] = {"generation_config": json.dumps(sampling.transformers_config())}
        return request, []
    # Greedy, the paper's setting, is temperature 0 in the OpenAI API.
    request["temperature"] = sampling.temperature if sampling.do_sample else 0.0
    if sampling.top_p is not None:
        request["top_p"] = sampling.top_p
    extras: dict = {"repetition_penalty": sampling.repetition_penalty} if sampling.repetition_penalty != 1.0 else {}
    if sampling.top_k:
        extras["top_k"] = sampling.top_k
    if dialect.extras == "vllm":
        request["extra_body"] = {**extras, "stop_token_ids": sorted(sampling.stop_ids)}
        return request, []
    return request, [f"{name}={value}" for name, value in extras.items()]


class ControlTextFilter:
    """Passes answer text through until a control token's text (a server that echoes its stop
    string, or ignores it); holds back a tail that might be the start of one."""

    def __init__(self):
        self._pending = ""
        self.ended = False

    def push(self, text: str) -> str:
        if self.ended:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(c) for c in CONTROL_TEXTS) if i >= 0), default=-1)
        if cut >= 0:
            self.ended = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = max((n for c in CONTROL_TEXTS for n in range(1, len(c)) if self._pending.endswith(c[:n])), default=0)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.ended else self._pending), ""
        return out


def _attach(feed: Feed, stream: Stream[Completion]) -> None:
    """The open stream, for cancel() to hang up; hung up at once if cancel() came first."""
    feed.on_cancel = lambda: _hang_up(stream)
    if feed.cancelled.is_set():
        _hang_up(stream)


def _hang_up(stream: Stream[Completion]) -> None:
    """Close the stream now: closing it is how the server learns to stop generating. shutdown()
    first, because close() alone leaves a reader blocked in recv() until the next byte or its timeout."""
    network = stream.response.extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: the answer ended meanwhile
            sock.shutdown(socket.SHUT_RDWR)
    stream.close()


class InferenceServer:
    """Streams answers from an OpenAI-compatible server; prompts are built here, as locally."""

    def __init__(
        self,
        tokenizer: OrcaTokenizer,
        info: ModelInfo,
        settings: InferenceServerSettings,
        model: str,
        client: openai.OpenAI,
    ):
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings
        self.model = model
        self.client = client
        # None until the server has accepted a request; then the dialect it accepted.
        self.dialect: Dialect | None = None

    @classmethod
    def load(
        cls, model_name: str, settings: InferenceServerSettings, on_phase: Callable[[str], None] = lambda phase: None
    ) -> InferenceServer:
        """The tokenizer from `model_name` (a folder or hub id: only tokenizer.model is read); the
        server is checked but need not be up yet."""
        on_phase("reading the tokenizer")
        try:
            tokenizer = OrcaTokenizer.for_model(model_name)
        except Exception as error:  # one clear message, whatever the cause
            raise ModelLoadError(load_failure_message(model_name, error)) from error
        on_phase(f"checking the server at {settings.base_url}")
        client = openai.OpenAI(
            base_url=settings.base_url,
            # Required by the library; what goes on the wire is _headers' Authorization.
            api_key=settings.api_key or "unused",
            timeout=openai.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            # A fault is reported at once; a retry would resend a prompt the server may be working on.
            max_retries=0,
        )
        reachable = _probe(client, settings)
        log.info("inference server %s: %s", settings.base_url, reachable)
        model = settings.served_model or model_name
        info = ModelInfo(
            model,
            "set by the server",
            reachable,
            settings.base_url,
            DEFAULT_CONTEXT_LENGTH,
            served_by=settings.base_url,
        )
        return cls(tokenizer, info, settings, model, client)

    def close(self) -> None:
        self.client.close()

    def generate(self, prompt: Prompt, params: GenerationParams, whose: str = "") -> Answer:
        # The server schedules its own batch: whose is not its to know.
        sampling = Sampling.of(params)
        feed = Feed(sampling.seed, sampling=INFERENCE_SERVER_SAMPLING if sampling.do_sample else None)
        worker = threading.Thread(
            target=self._run, args=(feed, prompt, sampling), name="orca2-inference-server", daemon=True
        )
        worker.start()
        feed.alive = worker.is_alive
        return Answer(feed)

    def _run(self, feed: Feed, prompt: Prompt, sampling: Sampling) -> None:
        try:
            stream = self._open(feed, prompt, sampling)
            reason = StopReason.STOPPED if stream is None else _stream(feed, stream)
        except Exception as error:  # noqa: BLE001 - whatever happens, the reader must hear of it, not wait on
            if feed.cancelled.is_set() and isinstance(error, openai.APIConnectionError):
                feed.close(reason=StopReason.STOPPED)  # our own hang-up
            else:
                feed.close(GenerationError(self._explain(error)))
            return
        feed.close(reason=reason)

    def _open(self, feed: Feed, prompt: Prompt, sampling: Sampling) -> Stream[Completion] | None:
        """The answer's stream, in the first dialect the server accepts (once one has been, only that
        one); None if the answer was cancelled before a request went out."""
        for dialect in (self.dialect,) if self.dialect else DIALECTS:
            if feed.cancelled.is_set():
                return None
            if not dialect.takes_ids and _typed_control_text(prompt):
                raise GenerationError(TYPED_CONTROL_TEXT)
            request, unsent = completion_request(
                self.model, prompt.input_ids if dialect.takes_ids else prompt.text, sampling, dialect
            )
            try:
                stream = self.client.completions.create(**request, extra_headers=_headers(self.settings))
            except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
                if self.dialect is not None:
                    raise
                log.info("the server refused %s: %s", dialect.name, _detail(error))
                if dialect is DIALECTS[-1]:
                    raise
                continue
            if self.dialect is None:
                self.dialect = dialect
                log.info("the inference server takes %s", dialect.name)
            if unsent:
                feed.notices = (f"Not sent: this inference server has no field for {', '.join(unsent)}.",)
            return stream
        return None

    def _explain(self, error: Exception) -> str:
        """What the reader is told about a failed answer."""
        url, cause = self.settings.base_url, error.__cause__ or error
        if isinstance(error, GenerationError):
            return str(error)
        if isinstance(error, openai.APIStatusError):
            return self._refusal(error)
        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return f"Could not reach the inference server at {url} ({_reason(cause)}). Is it running?"
        if isinstance(error, openai.APITimeoutError):
            return (
                f"The inference server at {url} sent nothing for {self.settings.read_timeout:g} s; "
                "the answer so far is kept. Try again, or raise --server-timeout."
            )
        if isinstance(error, openai.APIConnectionError):
            return f"Lost the inference server at {url}: {_reason(cause)}. The answer so far is kept."
        if isinstance(error, openai.APIError):  # an error event in the stream
            return f"The inference server failed while answering: {_detail(error)}. The answer so far is kept."
        log.exception("answer from %s failed", url)
        return f"The answer failed: {_reason(error)}. The answer so far is kept."

    def _refusal(self, error: openai.APIStatusError) -> str:
        message = _detail(error)
        text = f"The inference server refused the request ({error.status_code}): {message}"
        if error.status_code in (400, 404) and ("model" in message.lower() or self.model in message):
            text += f" This app asks for the model {self.model!r}; set --served-model to the server's name for it."
        return text

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        """The answer's token probabilities from the server's own prompt log-probabilities: vLLM
        returns them for a prompt of token ids ("prompt_logprobs"); a server that reads text does not."""
        answer_ids = list(answer_ids)
        if not answer_ids:
            return []
        if self.dialect is not None and not self.dialect.takes_ids:
            raise ScoringUnavailable(NO_PROMPT_LOGPROBS)
        request = scoring_request(self.model, prompt.input_ids + answer_ids, top)
        try:
            completion = self.client.completions.create(**request, extra_headers=_headers(self.settings))
        except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
            log.info("the server refused prompt_logprobs: %s", _detail(error))
            raise ScoringUnavailable(f"{NO_PROMPT_LOGPROBS} (It said: {_detail(error)[:200]})") from error
        except openai.APIError as error:
            raise GenerationError(self._scoring_failure(error)) from error
        choices = completion.choices if isinstance(completion, Completion) else None
        positions = getattr(choices[0], "prompt_logprobs", None) if choices else None
        if not isinstance(positions, list):
            raise ScoringUnavailable(NO_PROMPT_LOGPROBS)
        try:
            probabilities, alternatives = read_prompt_logprobs(positions, len(prompt.input_ids), answer_ids, top)
        except (KeyError, TypeError, ValueError) as error:
            raise GenerationError(f"The inference server's prompt_logprobs could not be read: {error}") from error
        return scored_tokens(self.tokenizer, answer_ids, probabilities, alternatives)

    def _scoring_failure(self, error: openai.APIError) -> str:
        url, cause = self.settings.base_url, error.__cause__ or error
        if isinstance(error, openai.APIStatusError):
            return f"The inference server at {url} could not score the answer ({error.status_code}): {_detail(error)}"
        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return f"Could not reach the inference server at {url} ({_reason(cause)}). Is it running?"
        return f"The inference server at {url} could not score the answer: {_reason(cause)}"


NO_PROMPT_LOGPROBS = (
    "Token probabilities are unavailable on this inference server: they come from the server's log-probabilities "
    "of the prompt's tokens, which only servers that take token ids and return prompt_logprobs give (vLLM does; "
    "transformers serve does not)."
)


def scoring_request(model: str, input_ids: list[int], top: int) -> dict:
    """vLLM's completions request for the prompt's log-probabilities: the ids as the prompt, one new
    token (the least a completion may ask for), at temperature 1 so the numbers are the model's own."""
    return {
        "model": model,
        "prompt": input_ids,
        "max_tokens": 1,
        "temperature": 1.0,
        "stream": False,
        "extra_body": {"prompt_logprobs": top},
    }


def read_prompt_logprobs(
    positions: list, n_prompt: int, answer_ids: list[int], top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each answer id's probability and each position's `top` alternatives, from vLLM's
    prompt_logprobs: one entry per prompt id (None for the first), each {id: {"logprob", "rank",
    "decoded_token"}} holding the `top` most likely ids and the prompt's own id."""
    if len(positions) != n_prompt + len(answer_ids):
        raise ValueError(f"{len(positions)} positions for a prompt of {n_prompt + len(answer_ids)} ids")
    probabilities, alternatives = [], []
    for token, entry in zip(answer_ids, positions[n_prompt:], strict=True):
        listed = sorted(((int(key), value) for key, value in entry.items()), key=lambda item: -item[1]["logprob"])
        probabilities.append(math.exp(dict(listed)[token]["logprob"]))
        # The prompt's own id is always listed; it is an alternative only if it ranks among the top.
        ranking = [(i, math.exp(v["logprob"])) for i, v in listed if i != token or v["rank"] <= top]
        alternatives.append(ranking[:top])
    return probabilities, alternatives


def _stream(feed: Feed, stream: Stream[Completion]) -> StopReason:
    """Pass the streamed text on until the answer ends; the stream is closed however it ends."""
    _attach(feed, stream)
    control = ControlTextFilter()
    finish_reason = None
    with stream:
        for chunk in _completions(stream):
            if feed.cancelled.is_set():
                return StopReason.STOPPED
            choice = chunk.choices[0]
            if choice.text:
                feed.write(control.push(choice.text))  # one piece, whatever the filter holds back
            finish_reason = choice.finish_reason or finish_reason
            if chunk.usage:
                feed.n_tokens = chunk.usage.completion_tokens
            if control.ended:
                # The server went past its stop string: hanging up ends its work too.
                return StopReason.END_OF_TURN
    feed.write(control.flush(), pieces=0)
    if finish_reason is not None:
        return StopReason.END_OF_TURN if finish_reason == "stop" else StopReason.LENGTH
    if feed.cancelled.is_set():
        return StopReason.STOPPED
    raise GenerationError(
        "The inference server ended the stream without finishing the answer. The answer so far is kept."
    )


def _completions(stream: Stream[Completion]) -> Iterator[Completion]:
    """The stream's events; anything that is not a completion is a GenerationError."""
    try:
        for chunk in stream:
            if not isinstance(chunk.choices, list) or not chunk.choices:
                raise GenerationError(_not_completions(chunk.to_json(indent=None, warnings=False)))
            yield chunk
    except json.JSONDecodeError as error:
        raise GenerationError(_not_completions(error.doc)) from None


def _not_completions(data: str) -> str:
    return f"The inference server sent something that is not a completions stream: {data[:200]!r}"


def _typed_control_text(prompt: Prompt) -> bool:
    """Does the conversation contain control text beyond the template's own control tokens?"""
    in_text = sum(prompt.text.count(text) for text in CONTROL_TEXTS)
    return in_text > sum(1 for token in prompt.input_ids if token in (IM_START, IM_END))


def _headers(settings: InferenceServerSettings) -> dict:
    """Set on every request. The credentials override what the library would take from OPENAI_*
    variables, which are meant for OpenAI's own API and must not reach this server. One connection
    per answer: Stop shuts its socket down, which must never be one the pool has lent to the next answer."""
    authorization = f"Bearer {settings.api_key}" if settings.api_key else omit
    return {"Authorization": authorization, "OpenAI-Organization": omit, "OpenAI-Project": omit, "Connection": "close"}


def _probe(client: openai.OpenAI, settings: InferenceServerSettings) -> str:
    """A line for the page: is the server there? (Any HTTP answer from the API root will do: /models
    would be the API's own probe, but transformers serve fails on it without a hub cache.)"""
    try:
        client.get(
            "", cast_to=httpx2.Response, options={"headers": _headers(settings), "timeout": settings.connect_timeout}
        )
    except openai.APIStatusError:
        pass  # an answer all the same
    except openai.APIConnectionError as error:
        return f"not reachable at start-up ({_reason(error.__cause__ or error)}); answers fail until it is up"
    return "OpenAI-compatible server"


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__


def _detail(error: openai.APIError) -> str:
    """The server's own words: the library has already taken the body's "error" member."""
    body = error.body
    if isinstance(body, dict):
        body = body.get("message", body.get("detail", body))
    return str(body).strip()[:500] if body else error.message

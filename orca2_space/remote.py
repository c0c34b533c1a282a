"""The chat on an OpenAI-compatible inference server (vLLM, TGI, transformers serve) instead of a
local model: the same prompts, streaming, Stop and moderation, the model's work done elsewhere.

Fidelity: the server gets the exact prompt the local engine would use, as token ids where it
accepts them (vLLM's /v1/completions does) and otherwise as the exact ChatML text, always through
the completions endpoint so that no server-side chat template rewrites it; generation stops at
<|im_end|>, and control text never reaches the page even when a server echoes its stop string.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from .settings import GenerationParams, RemoteSettings
from .backend import GenerationError, GenerationStats, ModelInfo, ModelLoadError, StopReason, load_failure_message
from .prompt import BOS, CONTROL_TEXT, DEFAULT_CONTEXT_LENGTH, IM_END, IM_START, PAD, STOP_IDS, OrcaTokenizer, Prompt

log = logging.getLogger(__name__)

_END = object()
CONTROL_TEXTS = (CONTROL_TEXT[IM_END], CONTROL_TEXT[IM_START])


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


def request_body(model: str, prompt: list[int] | str, params: GenerationParams, dialect: Dialect) -> tuple[dict, list[str]]:
    """The /v1/completions request for these settings, and what it can't carry (to tell the user)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": params.max_new_tokens,
        "stream": True,
        # <|im_start|> too: a new turn means this one is over (the local engine stops there as well).
        "stop": list(CONTROL_TEXTS),
    }
    if params.do_sample and params.seed is not None:
        body["seed"] = params.seed
    if dialect.extras == "generation_config":
        # It replaces the model's generation config (whose do_sample=False would ignore temperature).
        config = {"do_sample": params.do_sample, "max_new_tokens": params.max_new_tokens, "bos_token_id": BOS,
                  "eos_token_id": sorted(STOP_IDS), "pad_token_id": PAD, "repetition_penalty": params.repetition_penalty}
        if params.do_sample:
            config.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        body["generation_config"] = json.dumps(config)
        return body, []
    # Greedy, the paper's setting, is temperature 0 in the OpenAI API.
    body["temperature"] = params.temperature if params.do_sample else 0.0
    if params.do_sample:
        body["top_p"] = params.top_p
    extras = {"repetition_penalty": params.repetition_penalty} if params.repetition_penalty != 1.0 else {}
    if params.do_sample and params.top_k:
        extras["top_k"] = params.top_k
    if dialect.extras == "vllm":
        body.update(extras, stop_token_ids=sorted(STOP_IDS))
        return body, []
    return body, [f"{name}={value}" for name, value in extras.items()]


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


class RemoteGeneration:
    """One answer streaming from the server; the same handle as engine.Generation."""

    def __init__(self, run: Callable[[RemoteGeneration], None], seed: int | None):
        self.texts: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.seed = seed
        self.stats: GenerationStats | None = None
        self.error: str | None = None
        self.notices: list[str] = []
        self.n_tokens = 0  # pieces streamed so far (the server's count, once it sends one)
        self.response: httpx.Response | None = None
        self._started = time.perf_counter()
        self._worker = threading.Thread(target=run, args=(self,), name="orca2-remote", daemon=True)
        self._worker.start()
        weakref.finalize(self, self.cancelled.set)

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            response = self.response
            if response is not None:
                # Closing the stream is how the server learns to stop generating.
                response.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def finish(self, reason: str) -> None:
        seconds = time.perf_counter() - self._started
        self.stats = GenerationStats(self.n_tokens, seconds, reason, self.seed)
        self.texts.put(_END)
        self.done.set()

    def __iter__(self) -> Iterator[str]:
        while (text := self.texts.get()) is not _END:
            yield text
        if self.error is not None:
            raise GenerationError(self.error)


class RemoteEngine:
    """Streams answers from an OpenAI-compatible server; prompts are built here, as locally."""

    def __init__(self, tokenizer: OrcaTokenizer, info: ModelInfo, settings: RemoteSettings, model: str):
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings
        self.model = model
        # None until the server has accepted a request; then the dialect it accepted.
        self.dialect: Dialect | None = None
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        self._http = httpx.Client(base_url=settings.base_url.rstrip("/") + "/", headers=headers, timeout=timeout)

    @classmethod
    def load(cls, model_name: str, settings: RemoteSettings, on_phase: Callable[[str], None] = lambda phase: None) -> RemoteEngine:
        """The tokenizer from `model_name` (a folder or hub id: only tokenizer.model is read); the
        server is checked but need not be up yet."""
        on_phase("reading the tokenizer")
        try:
            tokenizer = OrcaTokenizer.for_model(model_name)
        except Exception as error:  # noqa: BLE001 - one clear message
            raise ModelLoadError(load_failure_message(model_name, error)) from error
        on_phase(f"checking the server at {settings.base_url}")
        reachable = _probe(settings)
        info = ModelInfo(settings.served_model or model_name, "set by the server", reachable, settings.base_url, DEFAULT_CONTEXT_LENGTH, served_by=settings.base_url)
        log.info("inference server %s: %s", settings.base_url, reachable)
        return cls(tokenizer, info, settings, settings.served_model or model_name)

    def close(self) -> None:
        self._http.close()

    def generate(self, prompt: Prompt, params: GenerationParams) -> RemoteGeneration:
        input_ids, prompt_text = prompt.input_ids, prompt.text
        seed = params.seed if params.do_sample else None
        return RemoteGeneration(lambda generation: self._run(generation, input_ids, prompt_text, params), seed)

    def _run(self, generation: RemoteGeneration, input_ids: list[int], prompt_text: str, params: GenerationParams) -> None:
        reason = "length"
        try:
            reason = self._answer(generation, input_ids, prompt_text, params)
        except GenerationError as error:
            generation.error = str(error)
            reason = "error"
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            generation.error = f"Could not reach the inference server at {self.settings.base_url} ({_reason(error)}). Is it running?"
            reason = "error"
        except httpx.TimeoutException:
            generation.error = (
                f"The inference server at {self.settings.base_url} sent nothing for {self.settings.read_timeout:g} s; "
                "the answer so far is kept. Try again, or raise --server-timeout."
            )
            reason = "error"
        except (httpx.HTTPError, OSError) as error:
            if generation.cancelled.is_set():
                reason = "stopped"
            else:
                generation.error = f"Lost the inference server at {self.settings.base_url}: {_reason(error)}. The answer so far is kept."
                reason = "error"
        finally:
            if generation.cancelled.is_set() and reason != "error":
                reason = "stopped"
            generation.finish(reason)

    def _answer(self, generation: RemoteGeneration, input_ids: list[int], prompt_text: str, params: GenerationParams) -> str:
        refusal = ""
        for dialect in (self.dialect,) if self.dialect else DIALECTS:
            if generation.cancelled.is_set():
                return "stopped"
            if not dialect.takes_ids and _typed_control_text(input_ids, prompt_text):
                raise GenerationError(
                    "This inference server reads prompts as text, so the <|im_start|> or <|im_end|> typed in the "
                    "conversation would act as a real control token there. Remove it, or use a server that takes "
                    "token ids (vLLM)."
                )
            body, unsent = request_body(self.model, input_ids if dialect.takes_ids else prompt_text, params, dialect)
            with self._http.stream("POST", "completions", json=body) as response:
                generation.response = response
                if response.status_code >= 400:
                    refusal = self._refusal(response)
                    if self.dialect is None and response.status_code in (400, 422):
                        log.info("the server refused %s: %s", dialect.name, refusal)
                        continue
                    raise GenerationError(refusal)
                if self.dialect is None:
                    self.dialect = dialect
                    log.info("the inference server takes %s", dialect.name)
                if unsent:
                    generation.notices.append(f"Not sent: this inference server has no field for {', '.join(unsent)}.")
                return self._stream(response, generation)
        raise GenerationError(refusal)

    def _refusal(self, response: httpx.Response) -> str:
        message = _error_text(response)
        text = f"The inference server refused the request ({response.status_code}): {message}"
        if response.status_code in (400, 404) and ("model" in message.lower() or self.model in message):
            text += f" This app asks for the model {self.model!r}; set --served-model to the server's name for it."
        return text

    def _stream(self, response: httpx.Response, generation: RemoteGeneration) -> str:
        control = ControlTextFilter()
        reason = None
        for line in response.iter_lines():
            if generation.cancelled.is_set():
                return "stopped"
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            chunk, choice = _parse_event(data)
            if choice.get("text"):
                generation.n_tokens += 1
                if text := control.push(choice["text"]):
                    generation.texts.put(text)
            if choice.get("finish_reason"):
                reason = "end_of_turn" if choice["finish_reason"] == "stop" else "length"
            if usage := chunk.get("usage"):
                generation.n_tokens = usage.get("completion_tokens", generation.n_tokens)
        if tail := control.flush():
            generation.texts.put(tail)
        if control.ended:
            return "end_of_turn"
        if reason is None and not generation.cancelled.is_set():
            raise GenerationError("The inference server ended the stream without finishing the answer. The answer so far is kept.")
        return reason or "stopped"


def _parse_event(data: str) -> tuple[dict, dict]:
    """A streamed completions event and its choice; a server's error event becomes GenerationError."""
    try:
        chunk = json.loads(data)
        if "error" in chunk:
            raise GenerationError(f"The inference server failed while answering: {chunk['error']}. The answer so far is kept.")
        return chunk, chunk["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise GenerationError(f"The inference server sent something that is not a completions stream: {data[:200]!r}") from None


def _typed_control_text(input_ids: list[int], prompt_text: str) -> bool:
    """Does the conversation contain control text beyond the template's own control tokens?"""
    in_text = sum(prompt_text.count(text) for text in CONTROL_TEXTS)
    return in_text > sum(1 for token in input_ids if token in (IM_START, IM_END))


def _probe(settings: RemoteSettings) -> str:
    """A line for the page: is the server there? (Any HTTP answer will do: /models would be the
    API's own probe, but transformers serve fails on it without a hub cache.)"""
    try:
        httpx.get(settings.base_url, timeout=settings.connect_timeout)
    except httpx.HTTPError as error:
        return f"not reachable at start-up ({_reason(error)}); answers fail until it is up"
    return "OpenAI-compatible server"


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__


def _error_text(response: httpx.Response) -> str:
    response.read()
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    detail = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        detail = detail.get("message", detail)
    return str(detail)[:500]


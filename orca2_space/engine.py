"""Loads Orca 2 once per process and streams the tokens of one request at a time.

The engine knows ids and text, nothing of chats, moderation or pages. Each request runs
``model.generate`` (the model card's own call) in a worker thread; a per-request event checked by a
StoppingCriteria after every decode step lets Stop end the model's work, not just the stream.

Nothing waits forever: a reader waiting for the next token checks, every WAIT_SECONDS, that the
thread writing its answer is still there, and a failure of the model ends the answer with a
GenerationError while the engine goes on serving.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import torch
from huggingface_hub.errors import HFValidationError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    StoppingCriteria,
)
from transformers.generation.streamers import BaseStreamer

from .backend import (
    GenerationError,
    GenerationStats,
    ModelInfo,
    ModelLoadError,
    ScoringUnavailable,
    StopReason,
    TokenProbability,
    load_failure_message,
    scored_tokens,
)
from .batching import Batcher
from .prompt import PAD, STOP_IDS, OrcaTokenizer, Prompt, StreamDecoder
from .settings import BatchingSettings, GenerationParams
from .zerogpu import gpu_task, on_zerogpu

log = logging.getLogger(__name__)

_END = object()
# How often a wait for the model's side checks that the model's side is still there.
WAIT_SECONDS = 1.0
# A decode step, or even a long prompt's prefill on a slow CPU, ends well within this after Stop;
# past it the model thread is stuck, and the answer ends with an error instead of holding the engine.
MODEL_STOP_SECONDS = 300.0


@dataclass(frozen=True)
class LoadPlan:
    """Which weights format to load and why, shown in the log and on the page."""

    quantization: str
    reason: str


def plan_load(requested: str, cuda: bool, fp32_bytes: int, ram_bytes: int, zerogpu: bool = False) -> LoadPlan:
    if requested != "auto":
        return LoadPlan(requested, "requested")
    if zerogpu:
        # ZeroGPU moves the model between CPU and a borrowed GPU, and bitsandbytes-quantized models
        # can't be moved with .to().
        return LoadPlan("bf16", "auto: on ZeroGPU, where 8-bit (bitsandbytes) models can't be moved to the GPU")
    if cuda:
        return LoadPlan("8bit", "auto: a CUDA GPU is present, and 8-bit needs half the memory of bf16")
    gib = 2**30
    if fp32_bytes <= ram_bytes / 2:
        return LoadPlan(
            "fp32",
            f"auto: no GPU, and fp32 weights ({fp32_bytes / gib:.1f} GiB) fit in RAM "
            f"({ram_bytes / gib:.0f} GiB) with room to spare",
        )
    return LoadPlan(
        "bf16",
        f"auto: no GPU, and fp32 weights ({fp32_bytes / gib:.1f} GiB) would take more than half "
        f"of RAM ({ram_bytes / gib:.0f} GiB); bf16 halves them",
    )


class _State:
    """What the model's side (a worker thread, or the batcher) and the Generation handle share.
    Neither holds a reference to the handle, so dropping the handle cancels the work (see
    weakref.finalize below)."""

    def __init__(self, seed: int | None, batched: bool):
        self.seed = seed
        self.batched = batched
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()
        self.cancel = threading.Event()
        # How the model's side stops working on this request (besides seeing `cancel`).
        self.on_cancel: Callable[[], None] = lambda: None
        # Whether the model's side (its thread, or the batch's dispatcher) is still there to close it.
        self.alive: Callable[[], bool] = lambda: True
        self._close_lock = threading.Lock()
        self.n_tokens = 0
        self.tokens_at_cancel: int | None = None
        self.last_token: int | None = None
        self.started = time.perf_counter()
        self.error: BaseException | None = None
        self.stats: GenerationStats | None = None
        self.done = threading.Event()

    def push(self, token: int) -> None:
        self.n_tokens += 1
        self.last_token = token
        self.tokens.put(token)

    def request_cancel(self) -> None:
        if not self.cancel.is_set():
            self.tokens_at_cancel = self.n_tokens
            self.cancel.set()
            self.on_cancel()

    def close(self, error: BaseException | None = None) -> None:
        """The model has stopped working on this request (the first call says how)."""
        with self._close_lock:
            if not self.done.is_set():
                self._close(error)

    def _close(self, error: BaseException | None) -> None:
        self.error = error
        if error is not None:
            reason = StopReason.ERROR
        elif self.cancel.is_set():
            reason = StopReason.STOPPED
        elif self.last_token in STOP_IDS:
            reason = StopReason.END_OF_TURN
        else:
            reason = StopReason.LENGTH
        after = None if self.tokens_at_cancel is None else self.n_tokens - self.tokens_at_cancel
        seconds = time.perf_counter() - self.started
        self.stats = stats = GenerationStats(self.n_tokens, seconds, reason, self.seed, after, self.batched)
        after_cancel = "" if after is None else f", {after} tokens after cancel"
        log.info(
            "generation finished (%s): %s, %d tokens in %.2fs (%.1f tokens/s)%s",
            "batched" if self.batched else "single",
            stats.stop_reason,
            stats.n_tokens,
            stats.seconds,
            stats.tokens_per_second,
            after_cancel,
        )
        self.tokens.put(_END)
        self.done.set()


class Generation:
    """One running answer. Iterate it for text deltas; cancel() ends the model's work after the
    current decode step; stats is set once iteration is over."""

    # What the user should know about how this answer was made (none when the model is local).
    notices: tuple[str, ...] = ()

    def __init__(self, state: _State, tokenizer: OrcaTokenizer):
        self._state = state
        self._tokenizer = tokenizer
        # The ids read so far: what Orca 2 wrote after the prompt (the newline that ends its role line
        # included, the end-of-turn token not).
        self.token_ids: list[int] = []
        weakref.finalize(self, state.request_cancel)

    @property
    def stats(self) -> GenerationStats | None:
        """How the generation went, once the model has stopped working on it."""
        return self._state.stats

    def cancel(self) -> None:
        self._state.request_cancel()

    def wait(self, timeout: float) -> bool:
        """Wait until the model has stopped working on this answer; True once it has."""
        return self._state.done.wait(timeout)

    def __iter__(self) -> Iterator[str]:
        state = self._state
        decoder = StreamDecoder(self._tokenizer)
        ended = False
        while not ended:
            tokens = self._next_tokens()
            if ended := _END in tokens:
                tokens = tokens[: tokens.index(_END)]
            tokens = [token for token in tokens if token not in STOP_IDS]
            self.token_ids += tokens
            delta = "".join(decoder.push(token) for token in tokens)
            if delta:
                yield delta
        if tail := decoder.flush():
            yield tail
        if state.error is not None:
            raise GenerationError(_reader_message(state.error)) from state.error

    def _next_tokens(self) -> list:
        """Token by token while the reader keeps up; a reader that fell behind (a slow network) gets
        what has piled up in one piece instead of a backlog of updates."""
        state = self._state
        while True:
            try:
                tokens = [state.tokens.get(timeout=WAIT_SECONDS)]
                break
            except queue.Empty:
                if not state.alive():  # nothing will close the answer: end it here
                    state.close(RuntimeError("the model's side stopped without finishing the answer"))
        while not state.tokens.empty():
            tokens.append(state.tokens.get_nowait())
        return tokens


def _reader_message(error: BaseException) -> str:
    """What a visitor reads when the model failed mid-answer: one line, and no allocator report."""
    text = str(error).strip()
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text.lower():
        return "The model ran out of memory while answering. Try again, or ask for a shorter answer."
    return f"The model failed while answering: {text.splitlines()[0] if text else type(error).__name__}"


class Engine:
    """One model, shared by every session and request."""

    def __init__(self, model, tokenizer: OrcaTokenizer, info: ModelInfo, batching: BatchingSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        # One unbatched generate at a time: it keeps the global torch RNG (and so seeds) per request.
        self._lock = threading.Lock()
        self._batcher = None
        _one_forward_at_a_time(model)
        if on_zerogpu():
            # Each answer borrows a GPU for its own duration: nothing persistent to batch on.
            global _zerogpu_model
            _zerogpu_model = model
            self._stream_tokens = lambda input_ids, params, seed, cancel: _stream_tokens_on_zerogpu(
                input_ids, params, seed
            )
            self._score_ids = _score_ids_on_zerogpu
        else:
            self._stream_tokens = functools.partial(stream_tokens, model)
            self._score_ids = functools.partial(score_ids, model)
            if batching is not None:
                self._batcher = Batcher(model, batching, info.context_length)

    def close(self) -> None:
        """Stop the batching thread, if any (answers in flight end with an error)."""
        if self._batcher is not None:
            self._batcher.close()

    @classmethod
    def load(
        cls,
        model_name: str,
        quantization: str = "auto",
        on_phase: Callable[[str], None] = lambda phase: None,
        batching: BatchingSettings | None = None,
    ) -> Engine:
        """Load the model; on_phase hears what is happening ("reading the config", …)."""
        try:
            return cls._load(model_name, quantization, on_phase, batching)
        except ModelLoadError:
            raise
        except Exception as error:  # every failure becomes one clear message
            log.debug("model load failed", exc_info=True)
            raise ModelLoadError(_load_failure_message(model_name, error)) from error

    @classmethod
    def _load(
        cls, model_name: str, quantization: str, on_phase: Callable[[str], None], batching: BatchingSettings | None
    ) -> Engine:
        on_phase("reading the tokenizer")
        tokenizer = OrcaTokenizer.for_model(model_name)
        on_phase("reading the config")
        config = AutoConfig.from_pretrained(model_name)
        zerogpu = on_zerogpu()
        cuda = torch.cuda.is_available()
        plan = plan_load(quantization, cuda, _fp32_bytes(config), psutil.virtual_memory().total, zerogpu)
        log.info("loading %s as %s (%s)", model_name, plan.quantization, plan.reason)
        fetch = "loading" if os.path.isdir(model_name) else "downloading (once) and loading"
        on_phase(f"{fetch} the weights as {plan.quantization}")
        model = AutoModelForCausalLM.from_pretrained(
            model_name, **_load_kwargs(plan.quantization, cuda and not zerogpu)
        )
        if zerogpu:
            model.to("cuda")  # ZeroGPU keeps it on CPU until a spaces.GPU task borrows a GPU
        model.eval()
        # The prompt builder keeps prompt + max_new_tokens inside the context; the config's own
        # max_length would only make generate warn on every request.
        model.generation_config.max_length = None
        device = torch.cuda.get_device_name(0) if cuda else "cpu"
        info = ModelInfo(model_name, plan.quantization, plan.reason, device, config.max_position_embeddings)
        if batching is not None:
            on_phase(f"allocating the batch KV cache ({batching.cache_tokens} tokens)")
        engine = cls(model, tokenizer, info, batching)
        log.info("model ready: %s", info.describe())
        return engine

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        """Start answering; the returned Generation streams the answer's text."""
        input_ids = prompt.input_ids
        seed = None
        if params.do_sample:
            seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        if self._batcher is not None and batchable(params):
            state = _State(seed, batched=True)
            state.alive = self._batcher.alive
            state.on_cancel = self._batcher.submit(input_ids, params.max_new_tokens, state)
            return Generation(state, self.tokenizer)
        state = _State(seed, batched=False)
        # The request's context goes along: ZeroGPU reads the visitor (for GPU quota) from it.
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run, state, input_ids, params, seed),
            name="orca2-generate",
            daemon=True,
        )
        worker.start()
        state.alive = worker.is_alive
        return Generation(state, self.tokenizer)

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        """Each answer id's probability given the prompt and the ids before it (temperature 1), and
        the `top` most likely ids at each position: one forward pass over prompt + answer.

        It does not wait for the generate lock, which keeps unbatched generates one at a time for the
        global RNG's sake (seeds): a forward pass draws nothing from it. Like every forward pass, it
        takes its turn with the others (_one_forward_at_a_time), so it runs between a long answer's
        decode steps instead of after the answer. scoring.py has checked that it fits the context.
        """
        answer_ids = list(answer_ids)
        if not answer_ids:
            return []
        attention = self.model.config._attn_implementation
        if attention.startswith("paged"):
            # The batch switched an eager model to paged attention, which runs only inside the batch.
            raise ScoringUnavailable(
                f"Token probabilities are unavailable while the batch runs the model with {attention} attention; "
                "load the model with sdpa attention (the default) or run without batching."
            )
        probabilities, alternatives = self._score_ids(prompt.input_ids + answer_ids, len(prompt.input_ids), top)
        return scored_tokens(self.tokenizer, answer_ids, probabilities, alternatives)

    def _run(self, state: _State, input_ids: list[int], params: GenerationParams, seed) -> None:
        error = None
        try:
            # Waits for the answer ahead (its holder releases the lock in `finally`, and everything
            # it waits on is bounded), looking for Stop meanwhile.
            while not self._lock.acquire(timeout=0.05):
                if state.cancel.is_set():
                    return
            try:
                if state.cancel.is_set():
                    return
                state.started = time.perf_counter()  # the answer's speed, not its wait for the lock
                # Closing the stream stops the model too: the only way that reaches ZeroGPU's worker.
                with contextlib.closing(self._stream_tokens(input_ids, params, seed, state.cancel)) as tokens:
                    for token in tokens:
                        state.push(token)
                        if state.cancel.is_set():
                            break
            finally:
                self._lock.release()
        except Exception as failure:  # reported to the reader once, here; the engine goes on
            log.exception("generation failed")
            error = failure
        finally:
            state.close(error)


def _one_forward_at_a_time(model) -> None:
    """Make the model's forward passes take turns. A plain forward (an answer run alone, or scoring)
    made while transformers' batch manager runs a step on the same model can read wrong logits
    (measured on the tiny model: up to 0.78 apart, one pass in two), so no two passes may overlap;
    tests/test_engine.py checks that they agree. The lock wraps the transformer body, which every
    path runs: generate, the batch's steps and scoring."""
    body = model.base_model
    if getattr(body, "_orca2_takes_turns", False):
        return
    turn = threading.Lock()
    forward = body.forward

    @functools.wraps(forward)
    def take_turns(*args, **kwargs):
        with turn:
            return forward(*args, **kwargs)

    body.forward = take_turns
    body._orca2_takes_turns = True


def batchable(params: GenerationParams) -> bool:
    """Whether the batch can answer exactly as generate alone would: its sampling and seed are
    shared by the whole batch and it has no repetition penalty, so only plain greedy qualifies."""
    return not params.do_sample and params.repetition_penalty == 1.0


def stream_tokens(
    model, input_ids: list[int], params: GenerationParams, seed: int | None, cancel: threading.Event | None
) -> Iterator[int]:
    """The ids model.generate writes, one by one (the model card's own call, with a streamer).

    Closing the iterator, or setting `cancel`, ends the model's work after the current decode
    step. On ZeroGPU this whole generator runs in the GPU worker process.
    """
    closed = threading.Event()
    tokens: queue.SimpleQueue = queue.SimpleQueue()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if seed is not None:
                torch.manual_seed(seed)
            ids = torch.tensor([input_ids], device=model.device)
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=_generation_config(params),
                    streamer=_TokenStreamer(tokens.put),
                    stopping_criteria=[_CancelCriteria(closed, cancel)],
                )
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer's thread
            failure.append(error)
        finally:
            tokens.put(_END)

    worker = threading.Thread(target=run, name="orca2-model", daemon=True)
    worker.start()
    try:
        while (token := _next_token(tokens, worker)) is not _END:
            yield token
    finally:
        closed.set()
        worker.join(timeout=MODEL_STOP_SECONDS)
        if worker.is_alive():
            raise RuntimeError(f"the model did not stop within {MODEL_STOP_SECONDS:.0f} s of being asked to")
    if failure:
        raise failure[0]


def _next_token(tokens: queue.SimpleQueue, worker: threading.Thread):
    """The model thread's next token, or _END (which it puts last, even when it fails)."""
    while True:
        try:
            return tokens.get(timeout=WAIT_SECONDS)
        except queue.Empty:
            if not worker.is_alive() and tokens.empty():
                raise RuntimeError("the model thread ended without finishing the answer") from None


# Positions whose output head runs at once: 256 positions of 32003 float32 log-probabilities is
# 33 MB, where a whole 4096-token answer at once would be half a gigabyte, several times over.
HEAD_CHUNK = 256


def score_ids(
    model, input_ids: list[int], n_prompt: int, top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For each id after the first n_prompt: its probability given the ids before it, and the `top`
    (id, probability) pairs most likely there, from one forward pass (log_softmax in float32).

    The transformer runs once over every id but the last (the last predicts nothing scored); the
    output head then runs on the answer's positions only, a chunk at a time. For a causal LM that
    is the model's own forward (Orca 2 is a LlamaForCausalLM: final norm in the base model, then
    lm_head). On ZeroGPU this runs in the GPU worker process, so it returns plain numbers.
    """
    targets = input_ids[n_prompt:]
    probabilities: list[float] = []
    alternatives: list[list[tuple[int, float]]] = []
    with torch.inference_mode():
        ids = torch.tensor([input_ids[:-1]], device=model.device)
        hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        states = hidden.last_hidden_state[0, n_prompt - 1 :]
        head = model.get_output_embeddings()
        for start in range(0, len(targets), HEAD_CHUNK):
            logprobs = torch.log_softmax(head(states[start : start + HEAD_CHUNK]).float(), dim=-1)
            chosen = torch.tensor(targets[start : start + HEAD_CHUNK], device=logprobs.device)
            probabilities += logprobs.gather(1, chosen[:, None])[:, 0].exp().tolist()
            best, best_ids = logprobs.topk(top, dim=-1)
            alternatives += [list(zip(i, p, strict=True)) for i, p in zip(best_ids.tolist(), best.exp().tolist())]
    return probabilities, alternatives


def _gpu_seconds(input_ids: list[int], params: GenerationParams, seed: int | None) -> float:
    """ZeroGPU time to ask for: a little for the prompt, then a generous 20 tokens per second."""
    return min(30 + params.max_new_tokens / 20, 300)


# ZeroGPU pickles a task's arguments into a forked GPU worker: the model can't be one of them, so
# it goes as a global the fork inherits. Wrapped at import, since ZeroGPU registers its tasks
# when the app launches.
_zerogpu_model = None


def _zerogpu_stream_tokens(input_ids: list[int], params: GenerationParams, seed: int | None) -> Iterator[int]:
    yield from stream_tokens(_zerogpu_model, input_ids, params, seed, cancel=None)


_stream_tokens_on_zerogpu = gpu_task(_zerogpu_stream_tokens, duration=_gpu_seconds)


def _zerogpu_score_ids(input_ids: list[int], n_prompt: int, top: int):
    return score_ids(_zerogpu_model, input_ids, n_prompt, top)


# One forward pass: seconds even for a full context on the GPU.
_score_ids_on_zerogpu = gpu_task(_zerogpu_score_ids, duration=lambda input_ids, n_prompt, top: 30)


def _generation_config(params: GenerationParams):
    sampling = {}
    if params.do_sample:
        sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=list(STOP_IDS),
        pad_token_id=PAD,
        **sampling,
    )


class _TokenStreamer(BaseStreamer):
    """Receives each new token from generate (the first call is the prompt, skipped)."""

    def __init__(self, put: Callable[[int], None]):
        self._put = put
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._put(token)

    def end(self) -> None:
        pass


class _CancelCriteria(StoppingCriteria):
    """Checked after every decode step."""

    def __init__(self, *events: threading.Event | None):
        self._events = [e for e in events if e is not None]

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(e.is_set() for e in self._events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _load_kwargs(quantization: str, cuda: bool) -> dict:

    device_map = "auto" if cuda else {"": "cpu"}
    if quantization == "8bit":
        # LLM.int8 computes in fp16 on GPUs; on CPU the activations stay fp32.
        dtype = torch.float16 if cuda else torch.float32
        return dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=dtype, device_map=device_map)
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        return dict(quantization_config=config, device_map=device_map)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quantization]
    return dict(dtype=dtype, device_map=device_map)


def _fp32_bytes(config) -> int:

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in skeleton.parameters())


class _OncePerMessage(logging.Filter):
    """bitsandbytes logs the same cast warning on every 8-bit matmul; once per process is plenty."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OncePerMessage())


def _load_failure_message(model_name: str, error: BaseException) -> str:
    hint = None
    reason = error
    if isinstance(error, HFValidationError) and not os.path.exists(model_name):
        reason = "there is no folder at that path, and it is not a hub id (OWNER/NAME)"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        hint = "There is not enough memory: try --quantization 8bit or 4bit on a GPU, bf16 on CPU, or a smaller model."
    elif isinstance(error, ImportError):
        hint = "A package is missing: pip install -r requirements.txt"
    return load_failure_message(model_name, reason, hint)

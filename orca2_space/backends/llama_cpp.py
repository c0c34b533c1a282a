"""Orca 2 from a GGUF file, run in this process by llama.cpp (llama-cpp-python): quantized weights
(4-bit: about 4 GB) on a laptop's CPU, or on the GPU llama.cpp was built for (Metal, CUDA), with the
exact prompts, Stop, seeds and token probabilities of the local model.

Fidelity: llama.cpp is given the exact prompt ids that OrcaTokenizer builds, never text (so typed
control text stays text), and a sampler chain in transformers' order (sampler_steps); the answer's
ids are decoded here, as for the local model. A GGUF whose vocabulary isn't Orca 2's is refused.

Only this module imports llama_cpp, and only when the backend is used: the package is an optional
install (requirements-llama.txt). Its Llama class is not used: loading quietly, it points the
process's stdout and stderr at /dev/null, which would silence the page's other threads meanwhile.
The wrappers that class is built on (llama_cpp._internals, pinned with the package) are used
instead, and llama.cpp's log goes to this module's logger.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..prompt import IM_END, IM_START, OrcaTokenizer, Prompt
from ..settings import GenerationParams, LlamaCppSettings
from .answer import Answer, AnswerTurns, Feed, produce_in_turn
from .contract import (
    LLAMA_CPP_SAMPLING,
    GenerationError,
    ModelInfo,
    ModelLoadError,
    TokenProbability,
    load_failure_message,
    scored_tokens,
)
from .sampling import Sampling

log = logging.getLogger(__name__)

NOT_INSTALLED = (
    "--backend llama-cpp needs llama-cpp-python, which is not installed: pip install -r requirements-llama.txt "
    "(it builds llama.cpp, a few minutes)"
)
ORCA2_VOCABULARY = 32003
ARCHITECTURE = "llama"
# Tokens llama.cpp decodes in one call: the prompt goes in chunks of this many.
BATCH_TOKENS = 512


@dataclass(frozen=True)
class Gguf:
    """What a GGUF file says about itself, read before its weights."""

    label: str  # how the page and exports name it: REPO/FILE, or the local file's name
    architecture: str
    file_type: str  # llama.cpp's name for its weights' format: F32, Q8_0, Q4_K_M, …
    n_vocab: int
    context_length: int  # the context it was trained for


def _library() -> ModuleType:
    try:
        import llama_cpp
    except ImportError as error:
        raise ModelLoadError(NOT_INSTALLED) from error
    _start(llama_cpp)
    return llama_cpp


# llama.cpp's last error lines: a failed load or decode says why only in its log.
_errors: collections.deque[str] = collections.deque(maxlen=4)
_log_callback: Any = None


def _start(llama_cpp: ModuleType) -> None:
    """Once per process: llama.cpp's log into this module's logger (its info at debug level), and its
    backends (the CPU, a GPU it was built for) started."""
    global _log_callback
    if _log_callback is not None:
        return
    # ggml's levels: 1 debug, 2 info, 3 warning, 4 error, 5 the previous line's continued.
    levels = {3: logging.WARNING, 4: logging.ERROR}

    def forward(level: int, text: bytes, _user_data: Any) -> None:
        line = text.decode("utf-8", "replace").rstrip()
        if not line:
            return
        if level == 4:
            _errors.append(line)
        log.log(levels.get(level, logging.DEBUG), "llama.cpp: %s", line)

    _log_callback = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(_log_callback, None)
    llama_cpp.llama_backend_init()


def _cause(default: str) -> str:
    """The first error llama.cpp logged since _errors was cleared (the later ones only say that it
    failed), without the name of the function that logged it."""
    if not _errors:
        return default
    function, _, message = _errors[0].partition(": ")
    return (message if function.isidentifier() else _errors[0]).removeprefix("error loading model: ")


def _label(settings: LlamaCppSettings) -> str:
    return f"{settings.gguf_repo}/{settings.gguf}" if settings.gguf_repo else os.path.basename(settings.gguf)


def _refusal(settings: LlamaCppSettings, reason: str) -> ModelLoadError:
    return ModelLoadError(f"Could not load the GGUF '{_label(settings)}': {reason}")


def _fetch(settings: LlamaCppSettings) -> str:
    """The GGUF's local path; a hub file is downloaded into the Hugging Face cache the first time."""
    if settings.gguf_repo is None:
        if not os.path.isfile(settings.gguf):
            raise _refusal(settings, "there is no file at that path (or name its hub repository with --gguf-repo)")
        return settings.gguf
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(settings.gguf_repo, settings.gguf)
    except Exception as error:
        raise _refusal(
            settings, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error


def _file_types(llama_cpp: ModuleType) -> dict[int, str]:
    """general.file_type's values, named as llama.cpp names them (and GGUF file names repeat)."""
    names = {}
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and name != "LLAMA_FTYPE_GUESSED":
            names[getattr(llama_cpp, name)] = (
                name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
            )
    return names


def _open(llama_cpp: ModuleType, path: str, settings: LlamaCppSettings, vocab_only: bool) -> Any:
    """llama.cpp's model (with vocab_only, only its metadata and vocabulary: checked, not used)."""
    from llama_cpp import _internals

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    # Every layer on the GPU llama.cpp was built for (Metal, CUDA); nothing changes on a CPU build.
    params.n_gpu_layers = 0x7FFFFFFF
    _errors.clear()
    try:
        return _internals.LlamaModel(path_model=path, params=params, verbose=True)
    except ValueError as error:
        raise _refusal(settings, f"llama.cpp can't read it: {_cause(str(error))}") from error


def inspect(model: Any, llama_cpp: ModuleType, settings: LlamaCppSettings) -> Gguf:
    """The GGUF's facts, and the reasons this app can't run it: not Orca 2's architecture or vocabulary,
    or less context than asked for."""
    metadata = model.metadata()
    architecture = metadata.get("general.architecture", "?")
    file_type = int(metadata.get("general.file_type", -1))
    facts = Gguf(
        _label(settings),
        architecture,
        _file_types(llama_cpp).get(file_type, f"file type {file_type}"),
        model.n_vocab(),
        int(metadata.get(f"{architecture}.context_length", 0)),
    )
    if facts.architecture != ARCHITECTURE:
        raise _refusal(settings, f"it is a {facts.architecture} model; Orca 2 is a {ARCHITECTURE} model")
    controls = {IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
    if facts.n_vocab != ORCA2_VOCABULARY:
        raise _refusal(settings, f"its vocabulary has {facts.n_vocab} tokens; Orca 2's has {ORCA2_VOCABULARY}")
    found = {i: model.token_get_text(i) for i in controls}
    if found != controls:
        raise _refusal(
            settings,
            f"ids 32001 and 32002 are {found[IM_START]!r} and {found[IM_END]!r}; Orca 2's are <|im_start|> and "
            "<|im_end|>: this is not Orca 2's vocabulary",
        )
    if settings.gguf_context is not None and settings.gguf_context > facts.context_length:
        raise _refusal(
            settings,
            f"--gguf-context {settings.gguf_context} is longer than the {facts.context_length} tokens it was trained "
            "for",
        )
    return facts


def preflight(settings: LlamaCppSettings) -> str | None:
    """Why the GGUF can't run, seen before the page starts: the library missing, or a file that is
    missing, truncated or not Orca 2 (read without its weights). A hub file not downloaded yet is
    checked when the backend loads (the download may take a while)."""
    try:
        llama_cpp = _library()
        if settings.gguf_repo is None:
            path = _fetch(settings)
        else:
            from huggingface_hub import constants, try_to_load_from_cache

            cached = try_to_load_from_cache(settings.gguf_repo, settings.gguf)
            if not isinstance(cached, str):
                if constants.HF_HUB_OFFLINE:
                    raise _refusal(settings, "offline, and not in the Hugging Face cache (HF_HOME)")
                return None
            path = cached
        model = _open(llama_cpp, path, settings, vocab_only=True)
        try:
            inspect(model, llama_cpp, settings)
        finally:
            model.close()
    except ModelLoadError as error:
        return str(error)
    return None


def sampler_steps(sampling: Sampling, context_length: int) -> list[tuple[str, tuple]]:
    """llama.cpp's sampler chain for these settings, as (LlamaSampler's add_ method, its arguments), in
    the order transformers applies them: the repetition penalty over every id of the prompt and the
    answer (as transformers counts them), then temperature, top-k and top-p, then the draw."""
    steps: list[tuple[str, tuple]] = []
    if sampling.repetition_penalty != 1.0:
        # (vocabulary size, how many last ids count, repeat, frequency and presence penalties)
        steps.append(("penalties", (ORCA2_VOCABULARY, context_length, sampling.repetition_penalty, 0.0, 0.0)))
    if not sampling.do_sample:
        return [*steps, ("greedy", ())]
    steps.append(("temp", (sampling.temperature,)))
    if sampling.top_k:
        steps.append(("top_k", (sampling.top_k,)))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        steps.append(("top_p", (sampling.top_p, 1)))
    return [*steps, ("dist", (sampling.seed,))]


class LlamaCpp:
    """One GGUF model and its context, shared by every session; one answer or scoring at a time."""

    def __init__(self, model: Any, context: Any, tokenizer: OrcaTokenizer, info: ModelInfo):
        from llama_cpp import _internals

        self._internals = _internals
        self.model = model
        self.context = context
        self.tokenizer = tokenizer
        self.info = info
        self._batch = _internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=True)
        # llama.cpp's context holds one conversation's cache: answers and scorings take turns.
        self._turns = AnswerTurns()

    @classmethod
    def load(
        cls, tokenizer_from: str, settings: LlamaCppSettings, on_phase: Callable[[str], None] = lambda phase: None
    ) -> LlamaCpp:
        """Orca 2's tokenizer from `tokenizer_from` (a folder or hub id: only tokenizer.model is read),
        and the GGUF of `settings`, fetched once into the Hugging Face cache if it is on the hub."""
        llama_cpp = _library()
        on_phase("reading the tokenizer")
        try:
            tokenizer = OrcaTokenizer.for_model(tokenizer_from)
        except Exception as error:
            raise ModelLoadError(load_failure_message(tokenizer_from, error)) from error
        on_phase(f"fetching {_label(settings)}" if settings.gguf_repo else "finding the GGUF file")
        path = _fetch(settings)
        on_phase("loading the GGUF")
        model = _open(llama_cpp, path, settings, vocab_only=False)
        try:
            facts = inspect(model, llama_cpp, settings)
            n_ctx = settings.gguf_context or facts.context_length
            on_phase(f"setting up a {n_ctx}-token context")
            context = _context(llama_cpp, model, n_ctx, settings.gguf_threads)
        except ValueError as error:  # llama.cpp could not make the context
            model.close()
            raise _refusal(settings, f"llama.cpp can't set up its context: {_cause(str(error))}") from error
        except ModelLoadError:
            model.close()
            raise
        info = ModelInfo(
            facts.label,
            f"{facts.file_type} GGUF",
            "llama.cpp",
            "GPU" if llama_cpp.llama_supports_gpu_offload() else "CPU",
            context.n_ctx(),
            runtime=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        )
        log.info("model ready: %s", info.describe())
        return cls(model, context, tokenizer, info)

    def close(self) -> None:
        with self._turns.held():
            self._batch.close()
            self.context.close()
            self.model.close()

    def generate(self, prompt: Prompt, params: GenerationParams, whose: str = "") -> Answer:
        # Answers take turns here, shared fairly between whose (answer.AnswerTurns).
        sampling = Sampling.of(params)
        if sampling.do_sample and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbelow(2**32))
        feed = Feed(sampling.seed, sampling=LLAMA_CPP_SAMPLING if sampling.do_sample else None)
        worker = threading.Thread(
            target=self._run, args=(feed, prompt.input_ids, sampling, whose), name="orca2-llama-cpp", daemon=True
        )
        worker.start()
        feed.alive = worker.is_alive
        return Answer(feed, self.tokenizer)

    def _run(self, feed: Feed, input_ids: list[int], sampling: Sampling, whose: str) -> None:
        produce_in_turn(feed, self._turns, whose, lambda: self._tokens(input_ids, sampling))

    def _tokens(self, input_ids: list[int], sampling: Sampling) -> Generator[int, None, None]:
        """The answer's ids, one decode step each, until a stop id, max_new_tokens or the context's end."""
        n_ctx = self.context.n_ctx()
        sampler = self._sampler(sampling, n_ctx)
        try:
            if sampling.repetition_penalty != 1.0:
                for token in input_ids:
                    sampler.accept(token)
            self._decode(input_ids)
            for n_past in range(len(input_ids), min(len(input_ids) + sampling.max_new_tokens, n_ctx + 1)):
                token = sampler.sample(self.context, -1)  # the sampler accepts it, for the penalty
                yield token
                if token in sampling.stop_ids or n_past == n_ctx:
                    return
                self._decode([token], n_past)
        finally:
            sampler.close()

    def _sampler(self, sampling: Sampling, n_ctx: int) -> Any:
        sampler = self._internals.LlamaSampler()
        for name, args in sampler_steps(sampling, n_ctx):
            getattr(sampler, f"add_{name}")(*args)
        return sampler

    def _decode(self, ids: list[int], n_past: int = 0, read: Callable[[np.ndarray], None] | None = None) -> None:
        """Run ids through the model after the n_past ids in its cache (none: the cache starts afresh),
        in chunks. `read` is given each chunk's logits, a row per id; otherwise only the last id's are
        computed, for the sampler."""
        if n_past == 0:
            self.context.kv_cache_clear()
        for start in range(0, len(ids), BATCH_TOKENS):
            chunk = ids[start : start + BATCH_TOKENS]
            self._batch.set_batch(chunk, n_past + start, logits_all=read is not None)
            _errors.clear()
            try:
                self.context.decode(self._batch)
            except RuntimeError as error:
                raise GenerationError(
                    f"llama.cpp failed while answering: {_cause(str(error))}. The answer so far is kept."
                ) from error
            if read is not None:
                read(np.ctypeslib.as_array(self.context.get_logits(), shape=(len(chunk), self.model.n_vocab())))

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        """The answer's probabilities from llama.cpp's own logits at temperature 1: the prompt runs
        as for an answer, then the answer's ids with the logits at every position read."""
        answer_ids = list(answer_ids)
        if not answer_ids:
            return []
        ids = prompt.input_ids
        probabilities: list[float] = []
        alternatives: list[list[tuple[int, float]]] = []

        def read(rows: np.ndarray) -> None:
            for logits in rows:
                p = _softmax(logits)
                probabilities.append(float(p[answer_ids[len(probabilities)]]))
                alternatives.append([(int(i), float(p[i])) for i in np.argsort(-p, kind="stable")[:top]])

        with self._turns.held():
            self._decode(ids[:-1])
            self._decode([ids[-1], *answer_ids[:-1]], len(ids) - 1, read)
        return scored_tokens(self.tokenizer, answer_ids, probabilities, alternatives)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    e = np.exp(shifted)
    return e / e.sum()


def _context(llama_cpp: ModuleType, model: Any, n_ctx: int, threads: int | None) -> Any:
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = BATCH_TOKENS
    # By default llama-cpp-python's own choice: a thread per physical core (about half the logical
    # ones) to decode, every core for the prompt.
    cores = os.cpu_count() or 1
    params.n_threads = threads or max(cores // 2, 1)
    params.n_threads_batch = max(cores, params.n_threads)
    _errors.clear()
    return _internals.LlamaContext(model=model, params=params, verbose=True)

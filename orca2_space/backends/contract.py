"""The contract between the chat and whatever writes Orca 2's answers: a local model (local/), an
inference server (inference_server.py) or a GGUF file in llama.cpp (llama_cpp.py).

A backend builds nothing itself: the chat hands it the exact prompt and the settings, and it
streams the answer's text. It knows nothing of chats, moderation or pages. This module imports
neither torch nor transformers, so the front end of an inference server runs without them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ..prompt import OrcaTokenizer, Prompt, StreamDecoder
from ..settings import GenerationParams

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The backend could not be made ready; the message names the model and what to do."""


class GenerationError(RuntimeError):
    """The answer failed; the backend stays usable and the message is meant for the reader."""


class ScoringUnavailable(RuntimeError):
    """This backend can't give token probabilities; the message says why, for the reader."""


# A sampled answer drawn by an inference server's own sampler: its seed is the server's business.
INFERENCE_SERVER_SAMPLING = "inference-server"
# llama.cpp's own seeded sampler: its seed redoes a llama.cpp answer, not the transformers engine's.
LLAMA_CPP_SAMPLING = "llama.cpp"


class StopReason(StrEnum):
    END_OF_TURN = "end_of_turn"  # the model ended its turn
    LENGTH = "length"  # max_new_tokens reached
    STOPPED = "stopped"  # cancelled: Stop, or the reader went away
    ERROR = "error"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    quantization: str
    reason: str
    device: str
    context_length: int
    # The inference server's URL when answers come from one (--backend inference-server).
    served_by: str | None = None
    # What runs the model here when it is not transformers: "llama.cpp …" (--backend llama-cpp).
    runtime: str | None = None

    def describe(self) -> str:
        return f"{self.name} · {self.quantization} ({self.reason}) · {self.device}"


@dataclass(frozen=True)
class GenerationStats:
    n_tokens: int
    seconds: float
    stop_reason: StopReason
    seed: int | None
    # Tokens the model produced after cancel() was called; Stop's promise is at most one.
    tokens_after_cancel: int | None = None
    # Decoded in a batch with other answers, or alone.
    batched: bool = False
    # How a sampled answer was drawn (None when greedy): the local model's seeded scheme
    # (seeded_sampling.SCHEME, whose seed redoes the answer token for token), INFERENCE_SERVER_SAMPLING
    # or LLAMA_CPP_SAMPLING.
    sampling: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Alternative:
    """A token the model could have written at a position, and the probability it gave it."""

    id: int
    text: str  # the token on its own (OrcaTokenizer.piece_text): " answer", "\n", "<|im_end|>"
    probability: float


@dataclass(frozen=True)
class TokenProbability:
    """One token of an answer: the probability the model gave it, and its most likely alternatives."""

    id: int
    # What this token adds to the answer's text: the texts of an answer's tokens join to exactly its
    # decoded text (the bytes of a character split over several tokens are on the one that completes it).
    text: str
    probability: float
    top: tuple[Alternative, ...]  # most likely first; the token itself is among them when it ranks


class AnswerStream(Protocol):
    """One answer being written. Iterating gives text deltas (and raises GenerationError if the
    answer failed); cancel() ends the backend's work on it; stats is set once that work is over."""

    @property
    def notices(self) -> tuple[str, ...]:
        """What the reader should know about how this answer was made (settings a server can't take)."""
        ...

    @property
    def token_ids(self) -> list[int] | None:
        """The ids of the answer read so far, after the prompt and without the end-of-turn token; None
        where the backend only sees text (an inference server)."""
        ...

    @property
    def stats(self) -> GenerationStats | None: ...

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...

    def wait(self, timeout: float) -> bool:
        """True once the backend has stopped working on this answer (within timeout seconds)."""
        ...


class Backend(Protocol):
    """What the chat needs from a model: who it is, how to build its prompts, and answers."""

    info: ModelInfo
    tokenizer: OrcaTokenizer

    def generate(self, prompt: Prompt, params: GenerationParams, whose: str = "") -> AnswerStream:
        """Start answering. `whose`: who the answer is for (a network address), so that a backend serving
        several answers at once can share its places fairly between those it serves."""
        ...

    def score(self, prompt: Prompt, answer_ids: list[int], top: int = 5) -> list[TokenProbability]:
        """The probability of each answer id given the prompt and the answer ids before it, at
        temperature 1 (the model's own distribution, whatever the answer was sampled with), with the
        `top` most likely ids at each position. Exact for whatever ids are given: greedy, sampled,
        batched or not. Raises ScoringUnavailable where the backend can't."""
        ...

    def close(self) -> None: ...


def scored_tokens(
    tokenizer: OrcaTokenizer,
    answer_ids: list[int],
    probabilities: list[float],
    alternatives: list[list[tuple[int, float]]],
) -> list[TokenProbability]:
    """The answer's tokens with their texts, from what a backend computed: each answer id's
    probability and each position's (id, probability) alternatives, most likely first."""
    decoder = StreamDecoder(tokenizer)
    texts = [decoder.push(token) for token in answer_ids]
    if texts and (tail := decoder.flush()):
        texts[-1] += tail
    return [
        TokenProbability(
            token,
            text,
            probability,
            tuple(Alternative(alt, tokenizer.piece_text(alt), p) for alt, p in top),
        )
        for token, text, probability, top in zip(answer_ids, texts, probabilities, alternatives, strict=True)
    ]


def load_failure_message(model_name: str, error: BaseException | str, hint: str | None = None) -> str:
    """One message for a backend that can't be made ready: the reason, then what to do."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if hint is None:
        hint = (
            "Check the model name, or point --model at a local folder with config.json, the weights and "
            "tokenizer.model. Offline (no network, or HF_HUB_OFFLINE=1) a hub model must already be in "
            "the Hugging Face cache (HF_HOME)."
        )
    return f"Could not load the model '{model_name}': {reason}\n{hint}"


class ModelLoading:
    """The backend, made ready in the background so that the page is up at once and can say so."""

    def __init__(self, model_name: str, load: Callable[..., Backend] | None = None, backend: Backend | None = None):
        """`load(on_phase=...)` makes the backend; on_phase hears each step ("reading the config", …)."""
        self.model_name = model_name
        self.phase = "ready" if backend else "starting"
        self.backend = backend
        self.error: str | None = None
        self._done = threading.Event()
        self._started = time.monotonic()
        if load is not None:
            threading.Thread(target=self._load, args=(load,), name="orca2-load", daemon=True).start()
        else:
            self._done.set()

    @classmethod
    def loaded(cls, backend: Backend) -> ModelLoading:
        return cls(backend.info.name, backend=backend)

    def _load(self, load: Callable[..., Backend]) -> None:
        try:
            self.backend = load(on_phase=self._set_phase)
            self.phase = "ready"
        except ModelLoadError as error:
            self.error = str(error)
            self.phase = "failed"
            log.error("%s", error)
        except Exception as error:
            self.error = load_failure_message(self.model_name, error)
            self.phase = "failed"
            log.exception("loading %s failed", self.model_name)
        finally:
            self._done.set()

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        log.info("%s: %s", self.model_name, phase)

    def wait(self, timeout: float | None = None) -> Backend | None:
        """The backend once ready (None if loading failed or is still going after timeout)."""
        self._done.wait(timeout)
        return self.backend

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def describe(self) -> str:
        if self.backend is not None:
            return self.backend.info.describe()
        if self.error is not None:
            return f"Loading failed: {self.error}"
        seconds = time.monotonic() - self._started
        return f"Loading {self.model_name}: {self.phase}… ({seconds:.0f} s)"

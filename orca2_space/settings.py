"""Settings of the server and of one generation request, with their validation.

Everything a caller sends is checked here, so the page, the API and tests share one set of rules:
a wrong type or a non-finite number is refused with a message naming the field; a number out of
range is clamped into it and the clamping is reported back.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, Field

from .prompt import DEFAULT_CONTEXT_LENGTH

QUANTIZATIONS = ("auto", "8bit", "4bit", "bf16", "fp16", "fp32")
DEFAULT_MODEL = "microsoft/Orca-2-7b"
KNOWN_MODELS = ("microsoft/Orca-2-7b", "microsoft/Orca-2-13b")
# Azure AI Content Safety's text categories; severities are 0 (safe), 2, 4, 6.
MODERATION_CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
MODERATION_THRESHOLDS = (0, 2, 4, 6)


class InvalidRequest(ValueError):
    """A request the server refuses; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class ModerationSettings:
    """Azure AI Content Safety on questions and answers; on only when endpoint and key are set."""

    endpoint: str | None = None
    key: str | None = field(default=None, repr=False)
    default_on: bool = True
    # Visitors and API callers can't turn it off (a Space owner's choice).
    required: bool = False
    # Flag a category at this severity or above (the model card uses 4).
    threshold: int = 4
    categories: tuple[str, ...] = MODERATION_CATEGORIES
    # When the service fails: hold the answer back (closed) or show it marked "not moderated" (open).
    fail_open: bool = False
    timeout: float = 3.0
    retries: int = 1

    def __post_init__(self):
        if self.threshold not in MODERATION_THRESHOLDS:
            raise ValueError(f"moderation threshold must be one of {MODERATION_THRESHOLDS}")
        unknown = set(self.categories) - set(MODERATION_CATEGORIES)
        if unknown or not self.categories:
            raise ValueError(f"moderation categories must be some of {', '.join(MODERATION_CATEGORIES)}")
        if not 0 < self.timeout <= 60:
            raise ValueError("moderation timeout must be between 0 and 60 seconds")
        if not 0 <= self.retries <= 5:
            raise ValueError("moderation retries must be between 0 and 5")

    @property
    def configured(self) -> bool:
        return bool(self.endpoint and self.key)


# The batch KV cache is allocated in pages of this many tokens.
BATCH_PAGE_TOKENS = 256


@dataclass(frozen=True)
class BatchingSettings:
    # Answers decoded together; more wait for a free place.
    max_concurrent: int = 8
    # KV-cache size, in tokens, shared by the answers in the batch. Allocated once at start:
    # Orca-2-7B needs 0.5 MiB per token in 16-bit (16384 tokens: 8 GiB).
    cache_tokens: int = 16384

    def __post_init__(self):
        if self.max_concurrent < 1:
            raise ValueError("batching needs at least one concurrent answer")
        if self.cache_tokens < BATCH_PAGE_TOKENS:
            raise ValueError(f"the batch KV cache needs at least {BATCH_PAGE_TOKENS} tokens")


@dataclass(frozen=True)
class RemoteSettings:
    """An OpenAI-compatible inference server to stream from, instead of a local model."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    served_model: str | None = None  # the server's name for the model (default: --model)
    api_key: str | None = field(default=None, repr=False)
    # Seconds to connect, and to wait for each streamed chunk (a queue on the server counts).
    connect_timeout: float = 5.0
    read_timeout: float = 120.0

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"the server's URL must start with http:// or https://, got {self.base_url!r}")
        if not (0 < self.connect_timeout < math.inf and 0 < self.read_timeout < math.inf):
            raise ValueError("server timeouts must be positive numbers of seconds")


@dataclass(frozen=True)
class Settings:
    """How this server runs. Built by cli.py from flags and ORCA2_* environment variables."""

    model: str = DEFAULT_MODEL
    quantization: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = field(default=None, repr=False)
    max_new_tokens_cap: int = 2048
    # Answers generated at once (batched together when greedy); more wait in the queue.
    concurrency: int = 8
    max_queue: int = 32
    batching: bool = True
    batch_cache_tokens: int = 16384
    max_message_chars: int = 100_000
    moderation: ModerationSettings = ModerationSettings()
    # Set: answers come from this server and no model is loaded here.
    remote: RemoteSettings | None = None

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        for name in ("max_new_tokens_cap", "concurrency", "max_queue", "max_message_chars", "batch_cache_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.batching:
            self.batching_settings()  # refuses a cache too small to use

    def batching_settings(self) -> BatchingSettings | None:
        """How to batch concurrent answers, or None to answer one at a time."""
        return BatchingSettings(self.concurrency, self.batch_cache_tokens) if self.batching else None


class GenerationParams(BaseModel):
    """Decoding settings of one answer, each declared once: the page's controls, /chat's validation
    and clamping, and each backend's mapping are derived from these fields. The defaults are the
    paper's: greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    do_sample: bool = Field(False, title="Sample", description="off: greedy decoding, as in the paper")
    temperature: float = Field(0.7, ge=0.01, le=2.0, title="Temperature", description="used when sampling")
    top_p: float = Field(0.9, ge=0.01, le=1.0, title="Top-p", description="used when sampling")
    top_k: int = Field(50, ge=0, le=1000, title="Top-k", description="used when sampling; 0: off")
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0, title="Repetition penalty", description="1: none")
    # Bounded again by the server's max_new_tokens_cap.
    max_new_tokens: int = Field(512, ge=1, le=DEFAULT_CONTEXT_LENGTH, title="Max new tokens")
    # None draws a fresh seed per answer; the seed used is reported so an answer can be redone.
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, title="Seed", description="used when sampling; -1: a new one each answer"
    )


GENERATION_FIELDS = GenerationParams.model_fields
# Where a caller's number is clamped into (a seed of -1 means random, and is not clamped).
RANDOM_SEED = -1


def bounds(name: str, max_new_tokens_cap: int | None = None) -> tuple[float, float] | None:
    """The allowed range of a numeric setting (max_new_tokens: within the server's cap)."""
    metadata = GENERATION_FIELDS[name].metadata
    low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    if low is None or high is None:
        return None
    if name == "max_new_tokens" and max_new_tokens_cap is not None:
        high = min(high, max_new_tokens_cap)
    return low, high


def _is_integer(name: str) -> bool:
    return int in (GENERATION_FIELDS[name].annotation, *typing.get_args(GENERATION_FIELDS[name].annotation))


def _number(name: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__}: {value!r:.40}")
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value}")
    if integer:
        if value != int(value):
            raise InvalidRequest(f"{name} must be a whole number, got {value}")
        return int(value)
    return float(value)


def validate_params(raw: dict[str, Any], max_new_tokens_cap: int) -> tuple[GenerationParams, list[str]]:
    """GenerationParams from untrusted values, and a notice for each value that was clamped.

    Missing or None values take the defaults. A seed of -1 means "random", like None.
    """
    unknown = set(raw) - set(GENERATION_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    notices: list[str] = []
    for name, value in raw.items():
        if value is None:
            continue
        if GENERATION_FIELDS[name].annotation is bool:
            if not isinstance(value, bool):
                raise InvalidRequest(f"{name} must be true or false, got {value!r:.40}")
            values[name] = value
            continue
        number = _number(name, value, _is_integer(name))
        if name == "seed" and number == RANDOM_SEED:
            continue
        low, high = bounds(name, max_new_tokens_cap)
        clamped = min(max(number, low), high)
        if clamped != number:
            notices.append(f"{name} {number} is outside [{low}, {high}]; using {clamped}.")
        values[name] = clamped
    values.setdefault("max_new_tokens", min(GENERATION_FIELDS["max_new_tokens"].default, max_new_tokens_cap))
    return GenerationParams(**values), notices

"""Settings of the server and of one generation request, with their validation.

Each server setting is one field below: cli.py derives its flag, its ORCA2_* environment variable,
its --help line and its checks from the field (see Cli for the naming rule).

Everything a caller sends is checked here, so the page, the API and tests share one set of rules:
a wrong type or a non-finite number is refused with a message naming the field; a number out of
range is clamped into it and the clamping is reported back.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from .prompt import DEFAULT_CONTEXT_LENGTH

Quantization = Literal["auto", "8bit", "4bit", "bf16", "fp16", "fp32"]
QUANTIZATIONS = typing.get_args(Quantization)
DEFAULT_MODEL = "microsoft/Orca-2-7b"
KNOWN_MODELS = ("microsoft/Orca-2-7b", "microsoft/Orca-2-13b")
# Azure AI Content Safety's text categories; severities are 0 (safe), 2, 4, 6.
ModerationCategory = Literal["Hate", "SelfHarm", "Sexual", "Violence"]
MODERATION_CATEGORIES = typing.get_args(ModerationCategory)
ModerationThreshold = Literal[0, 2, 4, 6]
MODERATION_THRESHOLDS = typing.get_args(ModerationThreshold)
# The batch KV cache is allocated in pages of this many tokens.
BATCH_PAGE_TOKENS = 256
BackendName = Literal["local", "inference-server", "llama-cpp"]
# --backend's words; "openai" is what inference-server was called first.
BACKEND_WORDS = {
    "local": "local",
    "inference-server": "inference-server",
    "openai": "inference-server",
    "llama-cpp": "llama-cpp",
}
# Hugging Face's proxy in front of a Space appends the address it sees to X-Forwarded-For (docs/space.md
# says what this relies on).
SPACE_TRUSTED_PROXIES = 1
# The settings given in MiB (--max-upload-mb, --address-mib-per-minute) are this many bytes each.
MIB = 1024 * 1024
# What an address may save of its budget of bytes (--address-mib-per-minute) while it moves less: this
# many seconds' worth. Each one lets a flood of the page's largest events run unchecked at its start
# (docs/performance.md, "Under attack"): 8 lets two events with a full browser's chats through at once.
ADDRESS_BURST_SECONDS = 8
# Where visitors can sign in, one who hasn't may hold this many places (docs/space.md says why).
SIGN_IN_ANONYMOUS_VISITOR_LIMIT = 2


class InvalidRequest(ValueError):
    """A request the server refuses; the message is meant for the person who sent it."""


def on_space() -> bool:
    """Whether this runs as a Hugging Face Space, which sets SPACE_ID."""
    return bool(os.environ.get("SPACE_ID"))


def sign_in_offered() -> bool:
    """Whether the page offers Sign in with Hugging Face: a Space whose README says hf_oauth: true is given
    these variables. Gradio signs the session that says who signed in with a key made from the secret,
    so without one a visitor could write that session themselves. Set off a Space, Gradio's local mock
    signs in as the account `hf auth login` holds."""
    return bool(os.environ.get("OAUTH_CLIENT_ID") and os.environ.get("OAUTH_CLIENT_SECRET"))


def on_zerogpu() -> bool:
    """Whether this Space borrows its GPU per task (ZeroGPU; see backends/local/zerogpu.py)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


@dataclass(frozen=True)
class Cli:
    """How a server setting is spelled on the command line, where the rule doesn't fit.

    The rule: the field max_queue is the flag --max-queue and the variable ORCA2_MAX_QUEUE; a
    section's fields start with its prefix (--moderation-threshold); the variable is always named
    after the flag (--server-timeout: ORCA2_SERVER_TIMEOUT). A bool is a switch (--share;
    ORCA2_SHARE=1), a tuple is comma-separated, a Literal lists the choices. The --help line is the
    field's description, then [VARIABLE] and (default D); Field's constraints are the checks.
    """

    flag: str | None = None
    # Read from this variable only: no flag (a key in a flag shows in process lists).
    env_only: str | None = None
    # The flag's words for the values, where words read better (--batching on|off).
    words: dict[str, Any] | None = None
    # Text → value for a syntax of its own; raises ValueError with a phrase ("must be USER:PASS").
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    # The default as --help tells it, where the field's default doesn't (it depends on the machine).
    default: str | None = None


@dataclass(frozen=True)
class Section:
    """Settings under their own heading in --help; with a prefix, their flags start with it."""

    title: str
    description: str
    prefix: str = ""


ON_OFF = {"on": True, "off": False}
# Strict: a string where a number belongs is a bug in the caller, not something to convert.
SERVER_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


# Checks and parsers say what's wrong as a phrase that follows the value: "'x' must start with http://".
def _user_pass(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("must be USER:PASS")
    return user, password


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return url


@pydantic_dataclass(frozen=True, config=SERVER_CONFIG)
class ModerationSettings:
    """Azure AI Content Safety on questions and answers; on only when endpoint and key are set."""

    endpoint: Annotated[str | None, Cli(env_only="CONTENT_SAFETY_ENDPOINT")] = None
    key: Annotated[str | None, Cli(env_only="CONTENT_SAFETY_KEY")] = Field(default=None, repr=False)
    default_on: Annotated[bool, Cli(flag="--moderation", words=ON_OFF)] = Field(
        default=True, description="the toggle's default when the service is configured"
    )
    # A Space owner's choice.
    required: bool = Field(default=False, description="visitors and API callers can't turn moderation off")
    threshold: ModerationThreshold = Field(
        default=4,
        description="withhold text with a category at this severity or above (4 as in the model card; "
        "0 and 2 both catch anything not rated safe)",
    )
    categories: tuple[ModerationCategory, ...] = Field(
        default=MODERATION_CATEGORIES, min_length=1, description="the categories that count, comma-separated"
    )
    fail_open: Annotated[bool, Cli(flag="--moderation-on-failure", words={"closed": False, "open": True})] = Field(
        default=False,
        description="when the service fails: hold answers back (closed), or show them marked 'not moderated' (open)",
    )
    timeout: float = Field(default=3.0, gt=0, le=60, description="seconds to wait for one check")
    retries: int = Field(default=1, ge=0, le=5, description="retries after a throttled, failed or unreachable check")

    @property
    def configured(self) -> bool:
        return bool(self.endpoint and self.key)


@pydantic_dataclass(frozen=True, config=SERVER_CONFIG)
class InferenceServerSettings:
    """An OpenAI-compatible inference server to stream from, instead of a local model."""

    base_url: Annotated[str, AfterValidator(_http_url)] = Field(
        description="the server's API root, e.g. http://127.0.0.1:8000/v1"
    )
    served_model: Annotated[str | None, Cli(default="--model")] = Field(
        default=None, description="the server's name for the model"
    )
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="the server's API key, if it wants one (prefer the variable: flags show in process lists)",
    )
    connect_timeout: Annotated[float, Cli(flag="--server-connect-timeout")] = Field(
        default=5.0, gt=0, description="seconds to connect to the server"
    )
    # A queue on the server counts.
    read_timeout: Annotated[float, Cli(flag="--server-timeout")] = Field(
        default=120.0, gt=0, description="seconds to wait for each streamed piece of an answer"
    )


@pydantic_dataclass(frozen=True, config=SERVER_CONFIG)
class LlamaCppSettings:
    """A GGUF file that llama.cpp runs in this process, instead of transformers."""

    gguf: str = Field(description="the GGUF file: a local path, or a file name in --gguf-repo")
    gguf_repo: str | None = Field(
        default=None,
        description="the hub repository --gguf is fetched from, once, into the Hugging Face cache "
        "(e.g. TheBloke/Orca-2-7B-GGUF)",
    )
    gguf_context: int | None = Field(
        default=None, ge=256, description="the context llama.cpp sets up, in tokens (default: the GGUF's own)"
    )
    gguf_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads llama.cpp writes answers with (default: half the cores, as llama-cpp-python "
        "chooses; the prompt is read with all of them)",
    )


@pydantic_dataclass(frozen=True, config=SERVER_CONFIG)
class Settings:
    """How this server runs. Each field is also a flag and an ORCA2_* variable (see Cli), read by cli.py."""

    model: str = Field(
        default=DEFAULT_MODEL,
        description=f"hub id or local folder (also {', '.join(KNOWN_MODELS[1:])}; "
        "a tiny offline test model: python tests/make_tiny_model.py DIR)",
    )
    quantization: Quantization = Field(
        default="auto",
        description="weights format; auto: 8bit with CUDA; on CPU fp32, or bf16 if fp32 would take over half the RAM",
    )
    host: Annotated[str, Cli(default="127.0.0.1; 0.0.0.0 on a Space")] = Field(
        default_factory=lambda: "0.0.0.0" if on_space() else "127.0.0.1", description="address to listen on"
    )
    port: int = Field(default=7860, ge=1, le=65535, description="port")
    share: bool = Field(
        default=False, description="also serve through a temporary public gradio.live link; ignored on a Space"
    )
    auth: Annotated[tuple[str, str] | None, Cli(parse=_user_pass, metavar="USER:PASS")] = Field(
        default=None, repr=False, description="require this login on the page and the API"
    )
    max_new_tokens_cap: int = Field(
        default=2048, ge=1, description="most tokens one answer may have, whatever a caller asks"
    )
    max_message_chars: int = Field(
        default=100_000, ge=1, description="longest message a caller may send, in characters"
    )
    concurrency: Annotated[int, Cli(default="8; 1 on ZeroGPU, where each answer borrows its own GPU")] = Field(
        default_factory=lambda: 1 if on_zerogpu() else 8,
        ge=1,
        description="answers generated at once (greedy ones share decode steps in one batch); others wait in the queue",
    )
    max_queue: int = Field(default=32, ge=1, description="requests that may wait; more are told the app is busy")
    visitor_limit: int = Field(
        default=4,
        ge=1,
        description="requests one visitor (a page session, an API client, an agent's address) may have running "
        "or waiting, a comparison counting one per answer (so 4 lets a visitor compare 4 system messages); more "
        "are refused at once, with the reason",
    )
    address_limit: int = Field(
        default=8,
        ge=1,
        description="requests one network address may have running or waiting, counted as for --visitor-limit "
        "(visitors behind one NAT share it, so keep it above --visitor-limit); behind a proxy, the address "
        "--trusted-proxies reads",
    )
    trusted_proxies: Annotated[int, Cli(default=f"{SPACE_TRUSTED_PROXIES} on a Space, 0 elsewhere")] = Field(
        default_factory=lambda: SPACE_TRUSTED_PROXIES if on_space() else 0,
        ge=0,
        le=10,
        description="proxies in front of this server that each append the address they see to X-Forwarded-For; "
        "a visitor's address is the entry this many from the right, and what the client wrote left of it is "
        "ignored (0: the connection's own address, the header ignored)",
    )
    address_mib_per_minute: int = Field(
        default=60,
        ge=1,
        description="MiB one network address may move through the server a minute: requests' bodies (uploads, and "
        "the chats the browser sends with most of the page's requests) and the results sent back, after a first "
        f"{ADDRESS_BURST_SECONDS} seconds' worth; past it, its requests for work are refused until the budget refills",
    )
    max_failed_logins: int = Field(
        default=5,
        ge=1,
        description="wrong logins one network address may try per minute with --auth; more are refused until "
        "the minute has passed",
    )
    mcp: bool = Field(
        default=False,
        description="also offer Orca 2 to agents as MCP tools (an answer, a comparison, token probabilities) at "
        "/gradio_api/mcp/, within the same limits as everyone",
    )
    max_exchanges: int = Field(
        default=500,
        ge=1,
        description="most questions and answers one conversation may hold: a chat longer than this is not "
        "shown, continued, exported or imported, and /chat takes a history of at most twice this many messages",
    )
    max_store_chars: int = Field(
        default=5_000_000,
        ge=1000,
        description="most characters of conversation a request may bring: the chats a browser sends back (as "
        "JSON; more than a browser's storage holds, so only a script sends more, refused before it is read), "
        "or /chat's history",
    )
    max_upload_mb: int = Field(
        default=5,
        ge=1,
        description="largest file a visitor may upload (a conversation to import), in MiB; larger is refused",
    )
    batching: Annotated[bool, Cli(words=ON_OFF)] = Field(
        default=True,
        description="decode concurrent answers together (continuous batching), greedy and sampled alike: a seed "
        "gives the same answer in the batch as alone; never on ZeroGPU",
    )
    model_process: Annotated[bool, Cli(words=ON_OFF)] = Field(
        default=True,
        description="run the local model in a process of its own, so that the web server's work never holds up "
        "its decode steps (off: one process, as a debugger likes it); never on ZeroGPU",
    )
    # None: sized for the machine when a local model loads (backends/local/batching.py).
    batch_cache_tokens: Annotated[int | None, Cli(default="16384 with a GPU, 8192 without")] = Field(
        default=None,
        ge=BATCH_PAGE_TOKENS,
        description="KV-cache size for the batch, in tokens, allocated at start (Orca-2-7B: 0.5 MiB per token)",
    )
    backend: Annotated[BackendName, Cli(words=BACKEND_WORDS, metavar="{local,inference-server,llama-cpp}")] = Field(
        default="local",
        description="local: load the model here; inference-server: stream from an OpenAI-compatible inference "
        "server (--base-url; 'openai' is its old name); llama-cpp: run a GGUF file here with llama.cpp (--gguf)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="the least severe messages the log shows"
    )
    anonymous_visitor_limit: Annotated[
        int | None,
        Cli(default=f"{SIGN_IN_ANONYMOUS_VISITOR_LIMIT} where visitors can sign in; --visitor-limit elsewhere"),
    ] = Field(
        default_factory=lambda: SIGN_IN_ANONYMOUS_VISITOR_LIMIT if sign_in_offered() else None,
        ge=1,
        description="requests a visitor who hasn't signed in with Hugging Face may have running or waiting, counted "
        "as for --visitor-limit and at most that (API clients and agents can't sign in; where the page offers no "
        "sign-in, this applies to everyone)",
    )
    sign_in_for_heavy: bool = Field(
        default=False,
        description="only visitors signed in with Hugging Face may run heavy requests (comparisons and evaluations); needs "
        "the page to offer sign-in (a Space with hf_oauth: true), and shuts API clients and agents out of them",
    )
    moderation: Annotated[
        ModerationSettings,
        Section(
            "moderation (Azure AI Content Safety)",
            "On when CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY are set (on a Space: as secrets). The key is "
            "read from the environment only, so it never shows in a process list.",
            prefix="moderation",
        ),
    ] = Field(default_factory=ModerationSettings)
    # Set exactly when backend is inference-server: answers come from it and no model is loaded here.
    inference_server: Annotated[
        InferenceServerSettings | None,
        Section(
            "inference server",
            "With --backend inference-server the app loads no model: answers stream from an OpenAI-compatible "
            "inference server (vLLM, TGI, transformers serve). --model then only names where Orca 2's "
            "tokenizer.model is read from.",
        ),
    ] = None
    max_evaluation_rows: Annotated[int, Cli(default="200 on a Space, 1000 elsewhere")] = Field(
        default_factory=lambda: 200 if on_space() else 1000,
        ge=1,
        description="most questions one evaluation may ask (each is answered once per system message, so up to "
        "4 answers a question); more are refused, naming the cap",
    )
    max_evaluations: Annotated[int, Cli(default="1 on a Space, 2 elsewhere")] = Field(
        default_factory=lambda: 1 if on_space() else 2,
        ge=1,
        description="evaluations running at once, over every visitor; one more is refused until one ends",
    )
    evaluation_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="the part of --concurrency an evaluation may hold while other requests run or wait (alone it "
        "holds all of it), so that a chat still starts at the next decode step",
    )
    # Set exactly when backend is llama-cpp.
    llama_cpp: Annotated[
        LlamaCppSettings | None,
        Section(
            "llama.cpp",
            "With --backend llama-cpp the model is a GGUF file (quantized weights, e.g. 4-bit) that llama.cpp runs "
            "in this process, on the CPU or on the GPU it was built for (pip install -r requirements-llama.txt). "
            "--model then only names where Orca 2's tokenizer.model is read from.",
        ),
    ] = None

    def __post_init__(self):
        if self.backend == "inference-server" and self.inference_server is None:
            raise ValueError("--backend inference-server needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend != "inference-server" and self.inference_server is not None:
            raise ValueError("an inference server is only used with backend 'inference-server'")
        if self.sign_in_for_heavy and not sign_in_offered():
            raise ValueError(
                "--sign-in-for-heavy needs Sign in with Hugging Face, which a Space with hf_oauth: true in its "
                "README offers (OAUTH_CLIENT_ID and OAUTH_CLIENT_SECRET): without it nobody could compare"
            )
        if self.backend == "llama-cpp" and self.llama_cpp is None:
            raise ValueError("--backend llama-cpp needs --gguf (a GGUF file, or a file name in --gguf-repo)")
        if self.backend != "llama-cpp" and self.llama_cpp is not None:
            raise ValueError("a GGUF file is only used with backend 'llama-cpp'")


class GenerationParams(BaseModel):
    """Decoding settings of one answer, each declared once: the page's controls, /chat's validation
    and clamping, and each backend's mapping are derived from these fields. The defaults are the
    paper's: greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    do_sample: bool = Field(default=False, title="Sample", description="off: greedy decoding, as in the paper")
    temperature: float = Field(default=0.7, ge=0.01, le=2.0, title="Temperature", description="used when sampling")
    top_p: float = Field(default=0.9, ge=0.01, le=1.0, title="Top-p", description="used when sampling")
    top_k: int = Field(default=50, ge=0, le=1000, title="Top-k", description="used when sampling; 0: off")
    repetition_penalty: float = Field(default=1.0, ge=1.0, le=2.0, title="Repetition penalty", description="1: none")
    # Bounded again by the server's max_new_tokens_cap.
    max_new_tokens: int = Field(default=512, ge=1, le=DEFAULT_CONTEXT_LENGTH, title="Max new tokens")
    # None draws a fresh seed per answer; the seed used is reported so an answer can be redone.
    seed: int | None = Field(
        default=None, ge=0, le=2**32 - 1, title="Seed", description="used when sampling; -1: a new one each answer"
    )


GENERATION_FIELDS = GenerationParams.model_fields
# Where a caller's number is clamped into (a seed of -1 means random, and is not clamped).
RANDOM_SEED = -1


def bounds(name: str, max_new_tokens_cap: int | None = None) -> tuple[float, float] | None:
    """The allowed range of a numeric setting (max_new_tokens: within the server's cap)."""
    metadata = GENERATION_FIELDS[name].metadata
    low = next((m.ge for m in metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in metadata if hasattr(m, "le")), None)
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
        low, high = bounds(name, max_new_tokens_cap) or (-math.inf, math.inf)
        clamped = min(max(number, low), high)
        if clamped != number:
            notices.append(f"{name} {number} is outside [{low}, {high}]; using {clamped}.")
        values[name] = clamped
    values.setdefault("max_new_tokens", min(GENERATION_FIELDS["max_new_tokens"].default, max_new_tokens_cap))
    return GenerationParams(**values), notices

"""Command line and environment → Settings, then load the model once and launch the page.

The flags and ORCA2_* variables are derived from settings.Settings: each field (and each field of
its sections) is one, with its --help line and its checks. To add a server setting, add a field.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .settings import (
    MIB,
    SERVER_CONFIG,
    Cli,
    InferenceServerSettings,
    LlamaCppSettings,
    ModerationSettings,
    Section,
    Settings,
    on_space,
    on_zerogpu,
)

if TYPE_CHECKING:
    from .backends.contract import Backend

log = logging.getLogger("orca2_space")

SHARE_WITHOUT_AUTH_WARNING = (
    "WARNING: --share makes this app public: anyone with the link can use this machine and its GPU. "
    "Add --auth USER:PASS to require a login."
)
ENV_PREFIX = "ORCA2_"
# What a variable may say for a switch (ORCA2_SHARE=1).
SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
# Pydantic's complaints as phrases that follow the value: "'0' must be at least 1".
PROBLEMS = {
    "greater_than_equal": "must be at least {ge:g}",
    "less_than_equal": "must be at most {le:g}",
    "greater_than": "must be more than {gt:g}",
    "less_than": "must be less than {lt:g}",
    "finite_number": "is not a finite number",
    "too_short": "must list at least {min_length}",
}


@dataclass(frozen=True)
class Option:
    """One server setting as the command line and the environment spell it."""

    path: tuple[str, ...]  # where it goes in Settings: ("moderation", "threshold")
    field: FieldInfo
    cli: Cli
    section: Section | None
    flag: str | None  # None: read from the environment only
    env: str

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def kind(self) -> Any:
        return _without_none(self.field.annotation)

    @property
    def switch(self) -> bool:
        return self.kind is bool and self.cli.words is None

    @property
    def choices(self) -> dict[str, Any] | None:
        """The words this option takes, each with its value, where it takes words."""
        if self.cli.words is not None:
            return self.cli.words
        if typing.get_origin(self.kind) is typing.Literal:
            return {str(choice): choice for choice in typing.get_args(self.kind)}
        return None


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _marker(field: FieldInfo, kind: type) -> Any:
    return next((m for m in field.metadata if isinstance(m, kind)), None)


def options(cls: type = Settings, section: Section | None = None, path: tuple[str, ...] = ()) -> list[Option]:
    """The options of a settings class's fields, and of the fields of its sections."""
    found = []
    for name, field in cls.__pydantic_fields__.items():
        subsection = _marker(field, Section)
        if subsection is not None:
            found += options(_without_none(field.annotation), subsection, (*path, name))
            continue
        cli = _marker(field, Cli) or Cli()
        flag = cli.flag or "--" + "-".join(filter(None, (section and section.prefix, name))).replace("_", "-")
        env = cli.env_only or ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")
        found.append(Option((*path, name), field, cli, section, None if cli.env_only else flag, env))
    return found


def problem(error: ValidationError) -> str:
    """Pydantic's first complaint as a phrase ("must be at least 1"); a check's own message as it is."""
    first = error.errors()[0]
    context = first.get("ctx", {})
    if first["type"] == "value_error":
        phrase = str(context["error"])
    elif first["type"] in PROBLEMS:
        phrase = PROBLEMS[first["type"]].format(**context)
    else:
        phrase = first["msg"]
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {phrase}" if where else phrase


def _value(option: Option, text: str) -> Any:
    """What a flag's or a variable's text means, checked by the field's rules; ValueError says what's wrong."""
    value = _from_text(option, text)
    metadata = option.field.metadata
    rules = typing.Annotated[(option.field.annotation, *metadata)] if metadata else option.field.annotation
    try:
        TypeAdapter(rules, config=SERVER_CONFIG).validate_python(value)
    except ValidationError as error:
        raise ValueError(f"{text!r} {problem(error)}") from None
    return value


def _from_text(option: Option, text: str) -> Any:
    if option.cli.parse is not None:
        return option.cli.parse(text)
    if option.switch:
        return _choose(SWITCH_WORDS, text.lower())
    if option.choices is not None:
        return _choose(option.choices, text)
    if typing.get_origin(option.kind) is tuple:
        item_kind = typing.get_args(option.kind)[0]
        return tuple(_scalar(item_kind, item.strip()) for item in text.split(",") if item.strip())
    return _scalar(option.kind, text)


def _scalar(kind: Any, text: str) -> Any:
    if typing.get_origin(kind) is typing.Literal:
        return _choose({str(choice): choice for choice in typing.get_args(kind)}, text)
    try:
        return kind(text) if kind in (int, float) else text
    except ValueError:
        raise ValueError(f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None


def _choose(choices: dict[str, Any], text: str) -> Any:
    if text not in choices:
        raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
    return choices[text]


def _help(option: Option) -> str:
    if option.switch:
        return f"{option.field.description} [{option.env}=1]"
    default = option.cli.default
    if default is None and not option.field.is_required():
        default = _shown(option, option.field.get_default(call_default_factory=True))
    text = f"{option.field.description} [{option.env}]" + (f" (default {default})" if default is not None else "")
    return text.replace("%", "%%")  # argparse formats help with %


def _shown(option: Option, value: Any) -> str | None:
    """A default as one would type it."""
    if value is None:
        return None
    if option.cli.words is not None:
        return next(word for word, meaning in option.cli.words.items() if meaning == value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_flag(group: argparse._ActionsContainer, flag: str, option: Option) -> None:
    if option.switch:
        group.add_argument(flag, dest=option.dest, action="store_true", help=_help(option))
        return

    def parse(text: str) -> Any:
        try:
            return _value(option, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    choices = option.choices
    metavar = option.cli.metavar or ("{" + ",".join(choices) + "}" if choices else option.env.removeprefix(ENV_PREFIX))
    group.add_argument(flag, dest=option.dest, type=parse, metavar=metavar, help=_help(option))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # One line naming the flag or the variable: the usage of thirty flags would bury it.
        self.exit(2, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The flags, each defaulting to its variable where that is set (an empty one is unset).

    Variables are read here, so a bad one is refused before anything else, --help included."""
    p = _Parser(
        prog="python app.py",
        description="Chat with Microsoft's Orca 2 in the browser. Every flag has an environment variable "
        "(shown in brackets) for Hugging Face Spaces, where flags can't be passed.",
        # Unset options stay out of the parsed arguments, so Settings' defaults apply.
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[Section | None, argparse._ActionsContainer] = {None: p}
    for option in options():
        if option.section is not None and option.section not in groups:
            groups[option.section] = p.add_argument_group(option.section.title, option.section.description)
        if option.flag is not None:
            _add_flag(groups[option.section], option.flag, option)
        text = os.environ.get(option.env, "").strip()
        if text:
            try:
                p.set_defaults(**{option.dest: _value(option, text)})
            except ValueError as error:
                p.error(f"{option.env}: {error}")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the parsed flags and variables; what neither sets keeps its field's default."""
    values: dict[str, Any] = {"moderation": {}, "inference_server": {}, "llama_cpp": {}}
    for dest, value in vars(args).items():
        *section, name = dest.split(".")
        (values[section[0]] if section else values)[name] = value
    moderation = ModerationSettings(**values.pop("moderation"))
    server, llama = values.pop("inference_server"), values.pop("llama_cpp")
    # A backend's settings count only with that --backend (and without its main flag, Settings says so).
    if values.get("backend") == "inference-server" and "base_url" in server:
        values["inference_server"] = InferenceServerSettings(**server)
    if values.get("backend") == "llama-cpp" and "gguf" in llama:
        values["llama_cpp"] = LlamaCppSettings(**llama)
    return Settings(moderation=moderation, **values)


def share_decision(settings: Settings, on_space: bool) -> tuple[bool, str | None]:
    """Whether to ask Gradio for a share link, and the warning to print about it."""
    if not settings.share:
        return False, None
    if on_space:
        return False, "--share is ignored on a Hugging Face Space: the Space is already public."
    if settings.auth is None:
        return True, SHARE_WITHOUT_AUTH_WARNING
    return True, None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    try:
        settings = settings_from_args(p.parse_args(argv))
    except ValidationError as error:
        p.error(problem(error))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    space = on_space()
    share, warning = share_decision(settings, space)
    if warning:
        print(warning, file=sys.stderr)
    # What is sure to fail is said in one line before anything starts (the model may take minutes).
    if not space and (trouble := port_trouble(settings) or preflight(settings)):
        print(f"error: {trouble}", file=sys.stderr)
        return 2

    from .backends.contract import ModelLoading
    from .chat import Chat

    # The page is up at once and shows the loading; the model loads meanwhile.
    loading = ModelLoading(settings.model, backend_loader(settings))
    if on_zerogpu():
        # Except on ZeroGPU, which packs the weights for its GPU workers when the app launches;
        # the Space shows "Starting" meanwhile.
        loading.wait()
    demo = launch(Chat(loading, settings, moderation_service(settings.moderation)), share=share, block=False)
    _say_where(demo, settings, share)
    if loading.wait() is None and not space:
        # Locally there is nobody to read the page: the loading logged why; stop. A Space stays up and shows it.
        demo.close()
        return 2
    demo.block_thread()
    return 0


def port_trouble(settings: Settings) -> str | None:
    """Why the page can't listen where it should, before the model loads for nothing."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as error:
        return (
            f"can't listen on {settings.host}:{settings.port} ({error.strerror or error}): "
            "choose another port with --port or ORCA2_PORT"
        )
    return None


def preflight(settings: Settings) -> str | None:
    """Why the model can't load, seen without reading it (the page shows the loading itself): a path
    that is no folder nor hub id, a folder without its files, a hub model offline and not cached; with
    --backend llama-cpp, what llama_cpp.preflight finds wrong with the library or the GGUF."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .backends.contract import load_failure_message

    if settings.llama_cpp is not None:
        from .backends.llama_cpp import preflight as gguf_trouble

        if trouble := gguf_trouble(settings.llama_cpp):
            return trouble
    model = settings.model
    only_tokenizer = settings.inference_server or settings.llama_cpp
    needed = ["tokenizer.model"] if only_tokenizer else ["tokenizer.model", "config.json"]
    if os.path.isdir(model):
        missing = [name for name in needed if not os.path.exists(os.path.join(model, name))]
        problem = f"the folder has no {' or '.join(missing)}" if missing else None
    else:
        try:
            validate_repo_id(model)
            cached = isinstance(try_to_load_from_cache(model, "tokenizer.model"), str)
            problem = None if cached or not constants.HF_HUB_OFFLINE else "offline, and not in the Hugging Face cache"
        except HFValidationError:
            problem = "there is no folder at that path, and it is not a hub id (OWNER/NAME)"
    return load_failure_message(model, OSError(problem)) if problem else None


def _say_where(demo, settings: Settings, share: bool) -> None:
    """Gradio's own lines speak of launch(share=True); these speak of this app's flags."""
    print(f"Orca 2 is at {demo.local_url}", flush=True)
    if share and demo.share_url:
        print(f"Public link (temporary): {demo.share_url}", flush=True)
    elif not share and not on_space():
        print("For a temporary public link, add --share (and --auth USER:PASS).", flush=True)


def backend_loader(settings: Settings) -> Callable[..., Backend]:
    """What makes the backend: a local model, a client of an inference server, or a GGUF file in
    llama.cpp. Typed, so that the type checker holds each backend to the Backend protocol."""
    if settings.inference_server is not None:
        from .backends.inference_server import InferenceServer

        return functools.partial(InferenceServer.load, settings.model, settings.inference_server)
    if settings.llama_cpp is not None:
        from .backends.llama_cpp import LlamaCpp

        return functools.partial(LlamaCpp.load, settings.model, settings.llama_cpp)
    from .backends.local.batching import batching_settings
    from .backends.local.engine import Engine
    from .backends.local.process import ModelProcess

    # ZeroGPU lends its GPU to the process that asks: the model stays in the web server's.
    load = ModelProcess.load if settings.model_process and not on_zerogpu() else Engine.load
    return functools.partial(load, settings.model, settings.quantization, batching=batching_settings(settings))


def launch(chat, share: bool = False, block: bool = True):
    """Build the page for this chat service and serve it; with block=False, return the running app."""
    from . import ui
    from .ui import guard, mcp_tools

    settings = chat.settings
    demo = ui.build(chat)
    # Every request the fair share admits goes straight to the chat, which waits for the model; Gradio's
    # queue holds nothing back from it (its size only bounds a burst of page events). The API's endpoints
    # are called through the queue only (api_open: no direct POST to /gradio_api/run/NAME around it).
    admitted = chat.fair_share.limits.total
    demo.queue(default_concurrency_limit=admitted, max_size=settings.max_queue, api_open=False)
    _pace_queue(demo)
    # Gradio starts uvicorn with its defaults, which take any loopback peer's X-Forwarded-For as the
    # client's address (FORWARDED_ALLOW_IPS); the guard reads it from the socket's peer as
    # --trusted-proxies says instead, so uvicorn must trust no one.
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    lifespan = guard.lifespan(demo, settings, share, chat.fair_share)
    if settings.mcp:
        lifespan = mcp_tools.lifespan(demo, lifespan)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=share,
        auth=settings.auth,
        auth_message=guard.login_message(settings.max_failed_logins) if settings.auth else None,
        css=ui.CSS,
        theme=ui.THEME,
        prevent_thread_lock=not block,
        # main() says where the page is, in terms of this app's flags.
        quiet=True,
        # Errors name the field that was wrong (e.g. a raw API call with too few values).
        show_error=True,
        # A thread per streaming request, and room for the page's other events.
        max_threads=admitted + 40,
        app_kwargs={"lifespan": lifespan},
        # Gradio's MCP server (agents' tools, mcp_tools.py); off unless asked, whatever GRADIO_MCP_SERVER says.
        mcp_server=settings.mcp,
        max_file_size=settings.max_upload_mb * MIB,
        # Gradio's /monitoring: its summary shows every event's traffic to anyone, and its key goes to the log.
        enable_monitoring=False,
        # Server-side rendering would put a Node proxy in front, one more X-Forwarded-For entry.
        ssr_mode=False,
    )
    return demo


# Gradio's queue looks for waiting events every 1 ms and for progress every 10 ms, busy or not: 1,100
# wake-ups a second that take the GIL (and a core) from the model's thread, and 0.06 of a core at
# rest (measured with py-spy and /proc; docs/performance.md). An event waits at most
# QUEUE_POLL_SECONDS more to start; streamed updates are not delayed; nothing here reports progress.
QUEUE_POLL_SECONDS = 0.02
PROGRESS_POLL_SECONDS = 0.5


def _pace_queue(demo) -> None:
    queue: Any = getattr(demo, "_queue", None)
    if hasattr(queue, "sleep_when_free") and hasattr(queue, "progress_update_sleep_when_free"):
        queue.sleep_when_free = QUEUE_POLL_SECONDS
        queue.progress_update_sleep_when_free = PROGRESS_POLL_SECONDS
    else:
        log.warning("Gradio's queue has changed: its polling interval is left as it is")


def moderation_service(settings: ModerationSettings):
    """The moderation the server runs, or None when no service is configured."""
    endpoint, key = settings.endpoint, settings.key
    if not (endpoint and key):  # settings.configured
        log.info("moderation off: set CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY to enable it")
        return None
    from .moderation import AzureContentSafety, Moderation

    log.info("moderation: Azure AI Content Safety at %s, threshold %d", endpoint, settings.threshold)
    return Moderation(AzureContentSafety(endpoint, key, settings.timeout, settings.retries), settings)

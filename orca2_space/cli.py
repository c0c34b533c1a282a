"""Command line and environment → Settings, then load the model once and launch the page."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from .settings import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    MODERATION_CATEGORIES,
    MODERATION_THRESHOLDS,
    QUANTIZATIONS,
    ModerationSettings,
    RemoteSettings,
    Settings,
)
from .zerogpu import on_zerogpu

log = logging.getLogger("orca2_space")

SHARE_WITHOUT_AUTH_WARNING = (
    "WARNING: --share makes this app public: anyone with the link can use this machine and its GPU. "
    "Add --auth USER:PASS to require a login."
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth takes USER:PASS")
    return user, password


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    on_space = bool(env("SPACE_ID"))
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Chat with Microsoft's Orca 2 in the browser. Every flag has an environment variable "
        "(shown in brackets) for Hugging Face Spaces, where flags can't be passed.",
    )
    p.add_argument(
        "--model",
        default=env("ORCA2_MODEL", DEFAULT_MODEL),
        help=f"hub id or local folder [ORCA2_MODEL] (default {DEFAULT_MODEL}; also {', '.join(KNOWN_MODELS[1:])}; "
        "a tiny offline test model: python tests/make_tiny_model.py DIR)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=env("ORCA2_QUANTIZATION", "auto"),
        help="weights format [ORCA2_QUANTIZATION] (default auto: 8bit with CUDA; on CPU fp32, or bf16 if fp32 "
        "would take over half the RAM)",
    )
    p.add_argument(
        "--host",
        default=env("ORCA2_HOST", "0.0.0.0" if on_space else "127.0.0.1"),
        help="address to listen on [ORCA2_HOST] (default 127.0.0.1; 0.0.0.0 on a Space)",
    )
    p.add_argument("--port", type=int, default=int(env("ORCA2_PORT", "7860")), help="port [ORCA2_PORT] (default 7860)")
    p.add_argument(
        "--share",
        action="store_true",
        default=_env_flag("ORCA2_SHARE"),
        help="also serve through a temporary public gradio.live link [ORCA2_SHARE=1]; ignored on a Space",
    )
    p.add_argument(
        "--auth",
        type=_auth,
        default=env("ORCA2_AUTH"),
        metavar="USER:PASS",
        help="require this login on the page and the API [ORCA2_AUTH]",
    )
    p.add_argument(
        "--max-new-tokens-cap",
        type=int,
        default=int(env("ORCA2_MAX_NEW_TOKENS_CAP", "2048")),
        help="most tokens one answer may have, whatever a caller asks [ORCA2_MAX_NEW_TOKENS_CAP] (default 2048)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=int(env("ORCA2_CONCURRENCY", "1" if on_zerogpu() else "8")),
        help="answers generated at once (greedy ones share decode steps in one batch); others wait in the queue "
        "[ORCA2_CONCURRENCY] (default 8; 1 on ZeroGPU, where each answer borrows its own GPU)",
    )
    p.add_argument(
        "--batching",
        choices=("on", "off"),
        default=env("ORCA2_BATCHING", "on"),
        help="decode concurrent greedy answers together (continuous batching); sampled answers, and any with a "
        "repetition penalty, always run alone [ORCA2_BATCHING] (default on; never on ZeroGPU)",
    )
    p.add_argument(
        "--batch-cache-tokens",
        type=int,
        default=int(env("ORCA2_BATCH_CACHE_TOKENS", "0")) or None,
        help="KV-cache size for the batch, in tokens, allocated at start (Orca-2-7B: 0.5 MiB per token) "
        "[ORCA2_BATCH_CACHE_TOKENS] (default 16384 with a GPU, 8192 without)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=int(env("ORCA2_MAX_QUEUE", "32")),
        help="requests that may wait; more are told the app is busy [ORCA2_MAX_QUEUE] (default 32)",
    )
    r = p.add_argument_group(
        "inference server",
        "With --backend openai the app loads no model: answers stream from an OpenAI-compatible server (vLLM, "
        "TGI, transformers serve). --model then only names where Orca 2's tokenizer.model is read from.",
    )
    r.add_argument(
        "--backend",
        choices=("local", "openai"),
        default=env("ORCA2_BACKEND", "local"),
        help="local: load the model here; openai: stream from --base-url [ORCA2_BACKEND] (default local)",
    )
    r.add_argument("--base-url", default=env("ORCA2_BASE_URL"), help="the server's API root, e.g. http://127.0.0.1:8000/v1 [ORCA2_BASE_URL]")
    r.add_argument(
        "--api-key",
        default=env("ORCA2_API_KEY"),
        help="the server's API key, if it wants one [ORCA2_API_KEY] (prefer the variable: flags show in process lists)",
    )
    r.add_argument(
        "--served-model",
        default=env("ORCA2_SERVED_MODEL"),
        help="the server's name for the model [ORCA2_SERVED_MODEL] (default: --model)",
    )
    r.add_argument(
        "--server-timeout",
        type=float,
        default=float(env("ORCA2_SERVER_TIMEOUT", "120")),
        help="seconds to wait for each streamed piece of an answer [ORCA2_SERVER_TIMEOUT] (default 120)",
    )
    m = p.add_argument_group(
        "moderation (Azure AI Content Safety)",
        "On when CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY are set (on a Space: as secrets). The key is "
        "read from the environment only, so it never shows in a process list.",
    )
    m.add_argument(
        "--moderation",
        choices=("on", "off"),
        default=env("ORCA2_MODERATION", "on"),
        help="the toggle's default when the service is configured [ORCA2_MODERATION] (default on)",
    )
    m.add_argument(
        "--moderation-required",
        action="store_true",
        default=_env_flag("ORCA2_MODERATION_REQUIRED"),
        help="visitors and API callers can't turn moderation off [ORCA2_MODERATION_REQUIRED=1]",
    )
    m.add_argument(
        "--moderation-threshold",
        type=int,
        choices=MODERATION_THRESHOLDS,
        default=int(env("ORCA2_MODERATION_THRESHOLD", "4")),
        help="withhold text with a category at this severity or above [ORCA2_MODERATION_THRESHOLD] (default 4, "
        "as in the model card; 0 and 2 both catch anything not rated safe)",
    )
    m.add_argument(
        "--moderation-categories",
        default=env("ORCA2_MODERATION_CATEGORIES", ",".join(MODERATION_CATEGORIES)),
        help=f"comma-separated [ORCA2_MODERATION_CATEGORIES] (default {','.join(MODERATION_CATEGORIES)})",
    )
    m.add_argument(
        "--moderation-on-failure",
        choices=("closed", "open"),
        default=env("ORCA2_MODERATION_ON_FAILURE", "closed"),
        help="when the service fails: hold answers back (closed), or show them marked 'not moderated' (open) "
        "[ORCA2_MODERATION_ON_FAILURE] (default closed)",
    )
    m.add_argument(
        "--moderation-timeout",
        type=float,
        default=float(env("ORCA2_MODERATION_TIMEOUT", "3")),
        help="seconds to wait for one check [ORCA2_MODERATION_TIMEOUT] (default 3)",
    )
    m.add_argument(
        "--moderation-retries",
        type=int,
        default=int(env("ORCA2_MODERATION_RETRIES", "1")),
        help="retries after a throttled, failed or unreachable check [ORCA2_MODERATION_RETRIES] (default 1)",
    )
    p.add_argument(
        "--log-level",
        default=env("ORCA2_LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="[ORCA2_LOG_LEVEL] (default INFO)",
    )
    return p


def _default_batch_cache_tokens() -> int:
    import torch

    # Four full contexts on a GPU (8 GiB for 7B in 16-bit), two in RAM.
    return 16384 if torch.cuda.is_available() else 8192


def _remote(args: argparse.Namespace) -> RemoteSettings | None:
    if args.backend != "openai":
        return None
    if not args.base_url:
        raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    return RemoteSettings(args.base_url, args.served_model, args.api_key, read_timeout=args.server_timeout)


def settings_from_args(args: argparse.Namespace) -> Settings:
    auth = _auth(args.auth) if isinstance(args.auth, str) else args.auth
    return Settings(
        model=args.model,
        quantization=args.quantization,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=auth,
        max_new_tokens_cap=args.max_new_tokens_cap,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        batching=args.batching == "on",
        batch_cache_tokens=args.batch_cache_tokens or _default_batch_cache_tokens(),
        remote=_remote(args),
        moderation=ModerationSettings(
            endpoint=os.environ.get("CONTENT_SAFETY_ENDPOINT") or None,
            key=os.environ.get("CONTENT_SAFETY_KEY") or None,
            default_on=args.moderation == "on",
            required=args.moderation_required,
            threshold=args.moderation_threshold,
            categories=tuple(c.strip() for c in args.moderation_categories.split(",") if c.strip()),
            fail_open=args.moderation_on_failure == "open",
            timeout=args.moderation_timeout,
            retries=args.moderation_retries,
        ),
    )


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
    args = p.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as error:
        p.error(str(error))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_space = bool(os.environ.get("SPACE_ID"))
    share, warning = share_decision(settings, on_space)
    if warning:
        print(warning, file=sys.stderr)

    from .chat import Chat
    from .backend import ModelLoading

    # The page is up at once and shows the loading; the model loads meanwhile.
    loading = ModelLoading(settings.model, backend_loader(settings))
    if on_zerogpu():
        # Except on ZeroGPU, which packs the weights for its GPU workers when the app launches;
        # the Space shows "Starting" meanwhile.
        loading.wait()
    demo = launch(Chat(loading, settings, moderation_service(settings.moderation)), share=share, block=False)
    if loading.wait() is None and not on_space:
        # Locally there is nobody to read the page: say why and stop. A Space stays up and shows it.
        demo.close()
        print(f"error: {loading.error}", file=sys.stderr)
        return 2
    demo.block_thread()
    return 0


def backend_loader(settings: Settings):
    """What makes the backend: a local model, or a client of an inference server (--backend openai)."""
    if settings.remote is not None:
        from .remote import RemoteEngine

        return functools.partial(RemoteEngine.load, settings.model, settings.remote)
    from .engine import Engine

    return functools.partial(Engine.load, settings.model, settings.quantization, batching=settings.batching_settings())


def launch(chat, share: bool = False, block: bool = True):
    """Build the page for this chat service and serve it; with block=False, return the running app."""
    from . import ui

    settings = chat.settings
    demo = ui.build(chat)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=share,
        auth=settings.auth,
        css=ui.CSS,
        theme=ui.THEME,
        prevent_thread_lock=not block,
        # Errors name the field that was wrong (e.g. a raw API call with too few values).
        show_error=True,
    )
    return demo


def moderation_service(settings: ModerationSettings):
    """The moderation the server runs, or None when no service is configured."""
    if not settings.configured:
        log.info("moderation off: set CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY to enable it")
        return None
    from .moderation import AzureContentSafety, Moderation

    log.info("moderation: Azure AI Content Safety at %s, threshold %d", settings.endpoint, settings.threshold)
    return Moderation(AzureContentSafety(settings.endpoint, settings.key, settings.timeout, settings.retries), settings)

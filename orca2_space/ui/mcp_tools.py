"""What agents are offered with --mcp: Orca 2 as three MCP tools, served by Gradio's MCP server at
/gradio_api/mcp/: `answer` (one question, answered on its own), `compare` (one question under 2 to 4
system messages) and `token_probabilities` (how sure the model was of each token of an answer).

Gradio offers every public API endpoint as a tool. The page's endpoints stream, or take a whole
conversation, which one tool call can't use; so agents get these three only (offer_only_tools), and
each returns its result whole, as JSON text.

They run off Gradio's queue, so that Gradio's MCP server calls them in-process with the MCP request
itself: its address, as guard.py read it, is the agent's. (A queued tool is called back over HTTP
from the server's own address, in one Gradio session shared by every agent.) An MCP call has no page
session, so the agent is its address (adapters.caller_of), and each call takes places of its fair
share like every other request: an answer one, a comparison one per system message. With --mcp the
three are also API endpoints (/mcp_answer, /mcp_compare, /mcp_token_probabilities), keyed the same way.
"""

import contextlib
import inspect
import json
import logging
from collections.abc import Iterator
from typing import Any

import gradio as gr
from gradio.events import api

from ..chat import Chat, system_message_for
from ..presets import SYSTEM_PRESETS
from ..scoring import as_api_dict, token_probabilities
from ..settings import GENERATION_FIELDS, bounds
from .adapters import caller_of, comparison, turn
from .api import KEYWORD, REQUEST, declare, settings_parameters

log = logging.getLogger(__name__)

# The endpoints Gradio's MCP server may offer, by API name (its tools are named after their functions).
TOOL_ENDPOINTS = ("/mcp_answer", "/mcp_compare", "/mcp_token_probabilities")

ANSWER_FIELDS = (
    '{"answer": the answer\'s text, "answer_ids": its token ids (pass them to token_probabilities), '
    '"stop_reason": "end_of_turn", "length" (max_new_tokens reached) or "stopped", "n_tokens", '
    '"tokens_per_second", "seed" (of a sampled answer: pass it back to redo the answer), "error": why it '
    'failed or null, "notices": what the server changed or left out, "moderation", "withheld": why '
    "moderation withheld the question or the answer, or null}"
)


def add_tools(chat: Chat) -> None:
    """Register the tools' endpoints (call it inside the Blocks, with --mcp only)."""

    def answer(request: gr.Request, *values) -> str:
        args = ANSWER_SIGNATURE.bind(request, *values).arguments
        caller = caller_of(args.pop("request"))
        system = system_message_for(args.pop("system_message"), args.pop("preset"))
        message, moderation = args.pop("message"), args.pop("moderation")
        return json.dumps(_last(turn(chat, message, system, None, moderation, True, args, None, caller)).as_api_dict())

    def compare(request: gr.Request, *values) -> str:
        args = COMPARE_SIGNATURE.bind(request, *values).arguments
        caller = caller_of(args.pop("request"))
        message, system_messages, moderation = args.pop("message"), args.pop("system_messages"), args.pop("moderation")
        updates = _last(comparison(chat, message, system_messages, moderation, args, None, caller))
        return json.dumps({"answers": [update.as_api_dict() for update in updates]})

    def token_probabilities_tool(
        request: gr.Request,
        message: str,
        answer: str | None = None,
        answer_ids: list[int] | None = None,
        system_message: str | None = None,
        preset: str | None = None,
    ) -> str:
        system = system_message_for(system_message, preset)
        tokens = token_probabilities(chat, message, system, [], answer, answer_ids, visitor=caller_of(request))
        return json.dumps(as_api_dict(tokens))

    token_probabilities_tool.__name__ = "token_probabilities"  # the tool's name
    cap = chat.settings.max_new_tokens_cap
    declare(answer, ANSWER_SIGNATURE, _answer_doc(cap))
    # An agent never signs in (caller_of): its share is an anonymous visitor's.
    declare(compare, COMPARE_SIGNATURE, _compare_doc(cap, chat.fair_share.limits.per_anonymous))
    token_probabilities_tool.__doc__ = TOKEN_PROBABILITIES_DOC
    for endpoint, function in zip(TOOL_ENDPOINTS, (answer, compare, token_probabilities_tool), strict=True):
        api(function, api_name=endpoint.lstrip("/"), queue=False)


def offer_only_tools(demo: gr.Blocks) -> None:
    """Leave Gradio's MCP server only the tools: it made one of every public API endpoint. Its table
    of tools is what it both lists and calls, so an endpoint taken out of it is neither offered nor
    callable as a tool. Refuses to start where Gradio's MCP server has changed, rather than offer
    endpoints that bypass the caller's fair share."""
    if getattr(demo, "mcp_server_obj", None) is None:
        raise RuntimeError(f"--mcp: Gradio started no MCP server ({getattr(demo, 'mcp_error', None)}).")
    tools = getattr(demo.mcp_server_obj, "tool_to_endpoint", None)
    if not isinstance(tools, dict) or not set(TOOL_ENDPOINTS) <= set(tools.values()):
        raise RuntimeError("Gradio's MCP server has changed: can't choose the tools it offers, so --mcp is refused.")
    for name in [name for name, endpoint in tools.items() if endpoint not in TOOL_ENDPOINTS]:
        del tools[name]
    log.info("MCP tools: %s", ", ".join(tools))


def lifespan(demo: gr.Blocks, inner):
    """inner (an app lifespan), with the tools chosen as the server starts: Gradio makes its MCP server
    in launch(), before any request is served."""

    @contextlib.asynccontextmanager
    async def offering(app):
        offer_only_tools(demo)
        async with inner(app):
            yield

    return offering


def _last(updates: Iterator) -> Any:
    """A stream's final update: the tools return results whole."""
    last = None
    for last in updates:
        pass
    return last


def _settings_doc(cap: int) -> list[str]:
    """One line per generation setting (one line each: Gradio reads "name: description" lines)."""
    lines = []
    for name, field in GENERATION_FIELDS.items():
        limits = bounds(name, cap)
        described = (field.title or name) + (f", {field.description}" if field.description else "")
        shown = f"; {limits[0]:g} to {limits[1]:g}" if limits else ""
        lines.append(f"{name}: {described}{shown}; default {json.dumps(field.default)}.")
    lines.append("moderation: true or false to ask for moderation or none; null for the server's default.")
    return lines


_PRESETS = ", ".join(json.dumps(name) for name in SYSTEM_PRESETS)
_QUESTION = "message: the question (text)."
_SYSTEM = (
    "system_message: the system message, exactly as sent (an empty text: none, the paper's evaluation "
    "setting); give it or preset, not both; neither: the model card's cautious message."
)
_PRESET = f"preset: instead of system_message, one of these system messages by name: {_PRESETS}."


def _answer_doc(cap: int) -> str:
    return "\n".join(
        [
            (
                "Ask Microsoft's Orca 2 (a 7B reasoning model) one question and get its whole answer. The question is "
                "answered on its own, as Orca 2's model card intends; the default settings are greedy, so the same call "
                "gives the same answer."
            ),
            "Args:",
            _QUESTION,
            _SYSTEM,
            _PRESET,
            *_settings_doc(cap),
            "Returns:",
            f"JSON text: {ANSWER_FIELDS}. A call over this server's fair share is refused at once, saying why.",
        ]
    )


def _compare_doc(cap: int, most: int) -> str:
    return "\n".join(
        [
            (
                "Answer one question under 2 to 4 system messages side by side, with the same settings (a sampled "
                "comparison uses one seed for all), to see how the system message changes Orca 2's answer."
            ),
            "Args:",
            _QUESTION,
            (
                f"system_messages: a list of 2 to {min(4, most)} system messages (texts; an empty text: none). Each "
                "takes one place of the caller's fair share while it is answered."
            ),
            *_settings_doc(cap),
            "Returns:",
            f'JSON text: {{"answers": [...]}}, one per system message, in order, each {ANSWER_FIELDS}.',
        ]
    )


TOKEN_PROBABILITIES_DOC = "\n".join(
    [
        (
            "How sure Orca 2 was of each token of an answer: the probability it gave each token (temperature 1, "
            "whatever the answer was sampled with) and the 5 tokens it found most likely there. Pass the question and "
            "system message the answer tool was given, and its answer_ids."
        ),
        "Args:",
        _QUESTION,
        "answer: the answer's text; scored as the tokenizer encodes it, when answer_ids are not given.",
        "answer_ids: the answer's token ids, as the answer tool returned them: scored exactly.",
        _SYSTEM,
        _PRESET,
        "Returns:",
        (
            'JSON text: {"tokens": [{"id", "text", "probability", "top": [{"id", "text", "probability"}, ...]}, ...]}, '
            "one per token of the answer; the first is usually the newline that ends Orca 2's role line."
        ),
    ]
)


def _answer_signature() -> inspect.Signature:
    question = [
        inspect.Parameter("message", KEYWORD, annotation=str),
        inspect.Parameter("system_message", KEYWORD, default=None, annotation=str | None),
        inspect.Parameter("preset", KEYWORD, default=None, annotation=str | None),
    ]
    return inspect.Signature([REQUEST, *question, *settings_parameters()], return_annotation=str)


def _compare_signature() -> inspect.Signature:
    question = [
        inspect.Parameter("message", KEYWORD, annotation=str),
        inspect.Parameter("system_messages", KEYWORD, annotation=list[str]),
    ]
    return inspect.Signature([REQUEST, *question, *settings_parameters()], return_annotation=str)


ANSWER_SIGNATURE = _answer_signature()
COMPARE_SIGNATURE = _compare_signature()

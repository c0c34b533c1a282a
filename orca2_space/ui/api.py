"""The API endpoints: /chat streams an answer through the same function as the page's Send, and
/inspect_prompt returns the exact prompt. /chat's parameters are derived from GenerationParams."""

import inspect
from collections.abc import Iterator

import gradio as gr

from ..chat import Chat, system_message_for
from ..prompt import PromptTooLong
from ..settings import GENERATION_FIELDS, InvalidRequest
from .answers import turn

GENERATION_CONCURRENCY_ID = "generation"


def add_endpoints(chat: Chat) -> None:
    def chat_endpoint(*values) -> Iterator[dict]:
        args = CHAT_SIGNATURE.bind(*values).arguments
        system = _system_message(args.pop("system_message"), args.pop("preset"))
        message, history = args.pop("message"), args.pop("history")
        moderation, single_turn = args.pop("moderation"), args.pop("single_turn")
        for update in turn(chat, message, system, history, moderation, single_turn, args, owner=None):
            yield update.as_api_dict()

    chat_endpoint.__signature__ = CHAT_SIGNATURE
    chat_endpoint.__annotations__ = {p.name: p.annotation for p in CHAT_SIGNATURE.parameters.values()}
    chat_endpoint.__doc__ = CHAT_DOC

    def inspect_prompt(
        message: str,
        system_message: str | None = None,
        history: list[dict] | None = None,
        max_new_tokens: int = 0,
        preset: str | None = None,
    ) -> dict:
        """The exact ChatML text and input ids Orca 2 would see (after leaving out old turns so
        that max_new_tokens fit). system_message or preset as for /chat."""
        try:
            prompt = chat.inspect(message, _system_message(system_message, preset), history, max_new_tokens)
        except (InvalidRequest, PromptTooLong) as error:
            raise gr.Error(str(error)) from error
        return {"text": prompt.text, "input_ids": prompt.input_ids, "n_tokens": prompt.n_tokens}

    gr.api(chat_endpoint, api_name="chat", concurrency_id=GENERATION_CONCURRENCY_ID)
    gr.api(inspect_prompt, api_name="inspect_prompt", concurrency_limit=None)


def _system_message(system_message, preset) -> str:
    try:
        return system_message_for(system_message, preset)
    except InvalidRequest as error:
        raise gr.Error(str(error)) from error


def _chat_signature() -> inspect.Signature:
    """/chat's parameters: the conversation, every generation setting as declared, then the switches."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    conversation = [
        inspect.Parameter("message", keyword, annotation=str),
        inspect.Parameter("system_message", keyword, default=None, annotation=str | None),
        inspect.Parameter("preset", keyword, default=None, annotation=str | None),
        inspect.Parameter("history", keyword, default=None, annotation=list[dict] | None),
    ]
    settings = [
        inspect.Parameter(name, keyword, default=field.default, annotation=field.annotation)
        for name, field in GENERATION_FIELDS.items()
    ]
    switches = [
        inspect.Parameter("moderation", keyword, default=None, annotation=bool | None),
        inspect.Parameter("single_turn", keyword, default=False, annotation=bool),
    ]
    return inspect.Signature([*conversation, *settings, *switches], return_annotation=Iterator[dict])


CHAT_SIGNATURE = _chat_signature()
CHAT_DOC = "\n".join(
    [
        (
            "Stream Orca 2's answer. Each update: answer so far, answer_ids, done, error, stop_reason, n_tokens, "
            "tokens_per_second, seed, notices, moderation, withheld. system_message or preset (a preset's name; "
            'neither: the model card\'s cautious message). history: earlier {"role", "content"} messages. '
            "moderation: None for the server's default; the server may require it. single_turn: answer the message "
            "on its own (the history is not sent), as Orca 2's card intends and its paper evaluates."
        ),
        *(
            f"{name}: {field.title}" + (f" ({field.description})" if field.description else "")
            for name, field in GENERATION_FIELDS.items()
        ),
    ]
)

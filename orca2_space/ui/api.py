"""The API endpoints: /chat streams an answer through the same function as the page's Send, /compare
the side-by-side answers as the Compare tab does, /evaluate an evaluation's progress and results through
Chat.evaluate as the Evaluate tab does, /inspect_prompt returns the exact prompt, and
/token_probabilities (tokens.py) scores an answer. /chat's parameters are derived from GenerationParams."""

import inspect
from collections.abc import Iterator

import gradio as gr
from gradio.events import api

from ..chat import Chat, system_message_for
from ..evaluator import grading_of
from ..settings import GENERATION_FIELDS
from .adapters import GENERATION_CONCURRENCY_ID, comparison, turn, visitor_errors, visitor_of
from .tokens import add_token_endpoint


def add_endpoints(chat: Chat) -> None:
    @visitor_errors
    def chat_endpoint(request: gr.Request, *values) -> Iterator[dict]:
        args = CHAT_SIGNATURE.bind(request, *values).arguments
        visitor = visitor_of(args.pop("request"))
        system = system_message_for(args.pop("system_message"), args.pop("preset"))
        message, history = args.pop("message"), args.pop("history")
        moderation, single_turn = args.pop("moderation"), args.pop("single_turn")
        for update in turn(chat, message, system, history, moderation, single_turn, args, None, visitor):
            yield update.as_api_dict()

    @visitor_errors
    def inspect_prompt(
        request: gr.Request,
        message: str,
        system_message: str | None = None,
        history: list[dict] | None = None,
        max_new_tokens: int = 0,
        preset: str | None = None,
    ) -> dict:
        """The exact ChatML text and input ids Orca 2 would see (after leaving out old turns so
        that max_new_tokens fit). system_message or preset as for /chat."""
        system = system_message_for(system_message, preset)
        prompt = chat.inspect(message, system, history, max_new_tokens, visitor=visitor_of(request))
        return {"text": prompt.text, "input_ids": prompt.input_ids, "n_tokens": prompt.n_tokens}

    @visitor_errors
    def compare_endpoint(request: gr.Request, *values) -> Iterator[dict]:
        args = COMPARE_SIGNATURE.bind(request, *values).arguments
        visitor = visitor_of(args.pop("request"))
        message, system_messages, moderation = args.pop("message"), args.pop("system_messages"), args.pop("moderation")
        for updates in comparison(chat, message, system_messages, moderation, args, None, visitor):
            yield {"answers": [update.as_api_dict() for update in updates]}

    @visitor_errors
    def evaluate_endpoint(request: gr.Request, *values) -> Iterator[dict]:
        args = EVALUATE_SIGNATURE.bind(request, *values).arguments
        visitor = visitor_of(args.pop("request"))
        questions, system_messages = args.pop("questions"), args.pop("system_messages")
        grading = grading_of(args.pop("rule"), args.pop("pattern"))
        evaluation = chat.evaluation_request(questions, system_messages, grading, args.pop("moderation"), **args)
        sent = 0
        for progress in chat.evaluate(evaluation, visitor=visitor):
            yield progress.as_api_dict(since=sent)
            sent = progress.done

    declare(chat_endpoint, CHAT_SIGNATURE, CHAT_DOC)
    declare(compare_endpoint, COMPARE_SIGNATURE, COMPARE_DOC)
    declare(evaluate_endpoint, EVALUATE_SIGNATURE, EVALUATE_DOC)
    api(chat_endpoint, api_name="chat", concurrency_id=GENERATION_CONCURRENCY_ID)
    api(compare_endpoint, api_name="compare", concurrency_id=GENERATION_CONCURRENCY_ID)
    api(evaluate_endpoint, api_name="evaluate", concurrency_id=GENERATION_CONCURRENCY_ID)
    api(inspect_prompt, api_name="inspect_prompt", concurrency_limit=None)
    add_token_endpoint(chat)


def declare(endpoint, signature: inspect.Signature, doc: str) -> None:
    """What gr.api reads to describe an endpoint taking *values: its parameters and its help."""
    endpoint.__signature__ = signature
    endpoint.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    endpoint.__doc__ = doc


KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
# Gradio passes the request to a parameter annotated gr.Request; it is not part of the API.
REQUEST = inspect.Parameter("request", KEYWORD, annotation=gr.Request)


def settings_parameters() -> list[inspect.Parameter]:
    """Every generation setting as declared, then the moderation switch."""
    settings = [
        inspect.Parameter(name, KEYWORD, default=field.default, annotation=field.annotation)
        for name, field in GENERATION_FIELDS.items()
    ]
    return [*settings, inspect.Parameter("moderation", KEYWORD, default=None, annotation=bool | None)]


def _chat_signature() -> inspect.Signature:
    """/chat's parameters: the conversation, the settings, then the single-turn switch."""
    conversation = [
        inspect.Parameter("message", KEYWORD, annotation=str),
        inspect.Parameter("system_message", KEYWORD, default=None, annotation=str | None),
        inspect.Parameter("preset", KEYWORD, default=None, annotation=str | None),
        inspect.Parameter("history", KEYWORD, default=None, annotation=list[dict] | None),
    ]
    single_turn = inspect.Parameter("single_turn", KEYWORD, default=False, annotation=bool)
    parameters = [REQUEST, *conversation, *settings_parameters(), single_turn]
    return inspect.Signature(parameters, return_annotation=Iterator[dict])


def _compare_signature() -> inspect.Signature:
    """/compare's parameters: the question, the system messages, then the settings they share."""
    question = [
        inspect.Parameter("message", KEYWORD, annotation=str),
        inspect.Parameter("system_messages", KEYWORD, annotation=list[str]),
    ]
    return inspect.Signature([REQUEST, *question, *settings_parameters()], return_annotation=Iterator[dict])


def _evaluate_signature() -> inspect.Signature:
    """/evaluate's parameters: the questions, the system messages, the scoring rule, then the settings."""
    evaluation = [
        inspect.Parameter("questions", KEYWORD, annotation=list[dict]),
        inspect.Parameter("system_messages", KEYWORD, annotation=list[str]),
        inspect.Parameter("rule", KEYWORD, annotation=str),
        inspect.Parameter("pattern", KEYWORD, default=None, annotation=str | None),
    ]
    return inspect.Signature([REQUEST, *evaluation, *settings_parameters()], return_annotation=Iterator[dict])


_SETTINGS_DOC = [
    f"{name}: {field.title}" + (f" ({field.description})" if field.description else "")
    for name, field in GENERATION_FIELDS.items()
]
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
        *_SETTINGS_DOC,
    ]
)
COMPARE_SIGNATURE = _compare_signature()
COMPARE_DOC = "\n".join(
    [
        (
            "Answer one question under 2 to 4 system messages at once, with the same settings (a sampled "
            'comparison uses one seed for all). Streams {"answers": [...]}: one /chat-style update per system '
            "message, in order. Each question is answered on its own (single turn)."
        ),
        *_SETTINGS_DOC,
    ]
)
EVALUATE_SIGNATURE = _evaluate_signature()
EVALUATE_DOC = "\n".join(
    [
        (
            'Evaluate: answer each question (records {"question", "answer", "choices"?, "id"?, ...}) under each of '
            "1 to 4 system messages, with the same settings, and score every answer by rule (choice, number, "
            "final-answer, exact, contains, or regex with pattern). Streams progress: done, total, "
            "answers_per_second, seconds_left, finished, notices and new_cells (the cells finished since the last "
            "update); the last update (finished) also has results (accuracy per system message with its 95% "
            "interval, the paired tests) and cells (every cell)."
        ),
        *_SETTINGS_DOC,
    ]
)

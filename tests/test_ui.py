"""The page's configuration: the moderation toggle's states, the components tests rely on, events
wired by name, and bad input shown to the visitor."""

import inspect

import gradio as gr
import pytest
from support import page_request

from orca2_space import ui
from orca2_space.backends.contract import GenerationError
from orca2_space.chat import Chat
from orca2_space.conversation import Conversation, Exchange, Store
from orca2_space.fairness import Refused
from orca2_space.moderation import AzureContentSafety, Moderation
from orca2_space.prompt import PromptTooLong
from orca2_space.settings import GenerationParams, InvalidRequest, ModerationSettings, Settings
from orca2_space.ui.adapters import visitor_errors
from orca2_space.ui.chat_tab import ChatEvents, layout


def toggle(chat):
    demo = ui.build(chat)
    (checkbox,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "moderation"]
    return checkbox


def service(**rules):
    settings = ModerationSettings(endpoint="http://127.0.0.1:9", key="k", **rules)
    return Moderation(AzureContentSafety(settings.endpoint, settings.key, 1.0, 0), settings), settings


def test_without_credentials_the_toggle_is_off_disabled_and_says_how_to_enable_it(tiny_engine):
    checkbox = toggle(Chat(tiny_engine, Settings()))
    assert checkbox.value is False and checkbox.interactive is False
    assert "CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY" in checkbox.info


@pytest.mark.parametrize("default_on", [True, False])
def test_with_credentials_the_toggle_follows_the_servers_default(tiny_engine, default_on):
    moderation, rules = service(default_on=default_on, threshold=2, categories=("Hate", "Violence"))
    checkbox = toggle(Chat(tiny_engine, Settings(moderation=rules), moderation))
    assert checkbox.value is default_on and checkbox.interactive is not False
    assert "Hate, Violence at severity 2" in checkbox.info and "held back" in checkbox.info


def test_a_required_moderation_cannot_be_turned_off_on_the_page(tiny_engine):
    moderation, rules = service(required=True, fail_open=True)
    checkbox = toggle(Chat(tiny_engine, Settings(moderation=rules), moderation))
    assert checkbox.value is True and checkbox.interactive is False
    assert "Required on this server" in checkbox.info and "unmoderated" in checkbox.info


def duplicate_buttons(demo):
    return [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "duplicate-space"]


def test_on_a_space_the_page_offers_to_duplicate_it(tiny_engine, monkeypatch):
    # What Hugging Face sets on a Space.
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/orca2-space")
    demo = ui.build(Chat(tiny_engine, Settings()))
    (button,) = duplicate_buttons(demo)
    clicks = [fn.js for fn in demo.fns.values() if (button._id, "click") in fn.targets]
    assert any("huggingface.co/spaces/someone/orca2-space?duplicate=true" in (js or "") for js in clicks)


def test_elsewhere_there_is_nothing_to_duplicate(tiny_engine, monkeypatch):
    monkeypatch.delenv("SYSTEM", raising=False)
    assert duplicate_buttons(ui.build(Chat(tiny_engine, Settings()))) == []


def by_elem_id(update: dict) -> dict:
    return {component.elem_id: value for component, value in update.items()}


def test_opening_a_chat_puts_each_setting_it_used_back_in_its_own_control(fake_backend):
    chat = Chat(fake_backend, Settings())
    with gr.Blocks():
        tab = layout(chat)
    # Every value differs from its default and from the others, so a value in the wrong control shows.
    used = GenerationParams(
        do_sample=True, temperature=1.3, top_p=0.55, top_k=7, repetition_penalty=1.2, max_new_tokens=77, seed=None
    )
    exchange = Exchange(question="Q", answer="A", system_message="Be brief.", single_turn=False, settings=used)
    conversation = Conversation(exchanges=[exchange])
    stored = Store().save(conversation).model_dump()
    events = ChatEvents(chat, tab)
    restored = by_elem_id(
        events.open(page_request("s"), conversation_id=conversation.id, stored=stored, show_raw=False)
    )
    assert restored["system-message"] == "Be brief." and restored["single-turn"] is False
    assert {name: restored[name.replace("_", "-")] for name in GenerationParams.model_fields} == {
        **used.model_dump(),
        "seed": -1,  # the seed box's "a new one each answer"
    }


@pytest.mark.parametrize(
    "error", [InvalidRequest("top_k must be a number"), Refused("Too many requests"), PromptTooLong("Too long")]
)
def test_bad_input_reaches_the_visitor_as_a_gradio_error_saying_why(error):
    def answer():
        raise error

    def stream():
        yield "first"
        raise error

    with pytest.raises(gr.Error, match=str(error)):
        visitor_errors(answer)()
    streaming = visitor_errors(stream)
    assert inspect.isgeneratorfunction(streaming)  # so that Gradio streams it
    updates = streaming()
    assert next(updates) == "first"
    with pytest.raises(gr.Error, match=str(error)):
        next(updates)


@pytest.mark.parametrize(
    ("error", "logged"),
    [(Refused("over the limit"), False), (InvalidRequest("bad"), False), (GenerationError("the model failed"), True)],
)
def test_a_refusal_reaches_the_visitor_without_a_traceback_in_the_servers_log_and_a_failure_keeps_one(error, logged):
    """A flood of refused requests would otherwise write one traceback each (issue 20's attack)."""

    @visitor_errors
    def handler():
        raise error

    with pytest.raises(gr.Error, match=str(error)) as shown:
        handler()
    assert shown.value.print_exception is logged

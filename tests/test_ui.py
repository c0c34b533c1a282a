"""The page's configuration: the moderation toggle's states, and the components tests rely on."""

import pytest

from orca2_space import ui
from orca2_space.chat import Chat
from orca2_space.moderation import AzureContentSafety, Moderation
from orca2_space.settings import ModerationSettings, Settings


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

"""The controls a tab derives from the server's declarations: the generation settings, the
moderation switch and the system-message presets."""

from typing import Any

import gradio as gr
from gradio.components import Component

from ..chat import Chat
from ..presets import PRESET_CHOICES, PRESETS
from ..settings import GENERATION_FIELDS, RANDOM_SEED, GenerationParams, bounds
from .adapters import INSTANT


def moderation_toggle(chat: Chat, elem_id: str = "moderation") -> gr.Checkbox:
    """The moderation switch, as this server's rules allow it."""
    label = "Moderation (Azure AI Content Safety)"
    if chat.moderation is None:
        return gr.Checkbox(
            False,
            label=label,
            interactive=False,
            info="Off: this server has no moderation service. Set CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY to enable it.",
            elem_id=elem_id,
        )
    rules = chat.moderation.settings
    on_failure = "shown marked unmoderated" if rules.fail_open else "held back"
    info = f"Withholds {', '.join(rules.categories)} at severity {rules.threshold} or above; if the service fails, answers are {on_failure}."
    if rules.required:
        return gr.Checkbox(
            True, label=label, interactive=False, info=f"Required on this server. {info}", elem_id=elem_id
        )
    return gr.Checkbox(rules.default_on, label=label, info=info, elem_id=elem_id)


def setting_controls(cap: int, prefix: str = "") -> dict[str, Component]:
    """A control for every generation setting, by its name in GenerationParams."""
    return {name: setting_control(name, cap, prefix) for name in GENERATION_FIELDS}


def setting_values(params: GenerationParams) -> dict[str, Any]:
    """The settings an answer was made with, by name, as setting_controls show them (to redo it)."""
    values = params.model_dump()
    values["seed"] = RANDOM_SEED if values["seed"] is None else values["seed"]
    return values


def setting_control(name: str, cap: int, prefix: str = "") -> Component:
    """The page's control for one generation setting, from its declaration (elem_id: prefix + its name)."""
    field = GENERATION_FIELDS[name]
    label = f"{field.title} ({field.description})" if field.description else field.title
    elem_id = prefix + name.replace("_", "-")
    if field.annotation is bool:
        return gr.Checkbox(field.default, label=label, elem_id=elem_id)
    limits = bounds(name, cap)
    assert limits is not None, f"{name}: every numeric generation setting declares its range (settings.py)"
    low, high = limits
    if name == "seed":
        return gr.Number(RANDOM_SEED, precision=0, minimum=RANDOM_SEED, maximum=high, label=label, elem_id=elem_id)
    integer = isinstance(field.default, int)
    default = min(field.default, high)
    return gr.Slider(low, high, default, step=1 if integer else 0.01, label=label, elem_id=elem_id)


def preset_picker(value: str, label: str, elem_id: str) -> gr.Dropdown:
    """A choice of system-message preset, by its short label; what it asks, and where its wording comes from,
    show under the label."""
    return gr.Dropdown(PRESET_CHOICES, value=value, label=label, info=PRESETS[value].info, elem_id=elem_id)


def wire_preset(picker: gr.Dropdown, system_message: gr.Textbox) -> None:
    """Choosing a preset puts its system message in the box, and says what it asks and where it comes from."""

    def chosen(name: str) -> dict:
        preset = PRESETS[name]
        return {system_message: preset.text, picker: gr.update(info=preset.info)}

    picker.change(chosen, picker, [picker, system_message], **INSTANT)


def question_row(placeholder: str, prefix: str, action: str, action_id: str) -> tuple[gr.Textbox, gr.Button, gr.Button]:
    """The question box that grows to 12 lines (Enter sends, Shift+Enter starts a new line; a phone has
    room for a short placeholder only), its action button, and the Stop that takes its place while the
    model works."""
    with gr.Row():
        message = gr.Textbox(
            placeholder=placeholder, show_label=False, scale=5, lines=1, max_lines=12, elem_id=f"{prefix}message"
        )
        go = gr.Button(action, variant="primary", scale=1, min_width=90, elem_id=action_id)
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, visible=False, elem_id=f"{prefix}stop")
    return message, go, stop

"""The page: its header (what Orca 2 is, the model's status), its tabs and the CSS they share. Each tab
is a module with its own layout, events and CSS (chat_tab.py, compare_tab.py); the API endpoints are
api.py's."""

import html

import gradio as gr
from gradio.themes import Soft

from ..chat import Chat
from ..settings import on_space, sign_in_offered
from . import chat_tab, compare_tab, evaluate_tab
from .adapters import INSTANT
from .api import add_endpoints
from .mcp_tools import add_tools
from .tokens import TOKEN_CSS

# Each tab module has TITLE, ID (the tab's id and elem_id), CSS and build(demo, chat), in tab order.
TABS = (chat_tab, compare_tab, evaluate_tab)
CSS = (
    "".join(tab.CSS for tab in TABS)
    + TOKEN_CSS
    + """
@media (max-width: 640px) { .gradio-container { padding: 4px !important; } }
/* On a phone (390 px wide) every tab's name fits on one row; at Gradio's size the ones that don't
   fit go behind a "More tabs" menu, where a visitor would not see that Compare and Evaluate exist. */
@media (max-width: 640px) { .tab-wrapper button { padding: 0 6px !important; font-size: 12px !important; } }
"""
)
THEME = Soft(primary_hue="indigo")


def build(chat: Chat) -> gr.Blocks:
    with gr.Blocks(title="Orca 2") as demo:
        _header(demo, chat)
        with gr.Tabs():
            for tab in TABS:
                with gr.Tab(tab.TITLE, id=tab.ID, elem_id=tab.ID):
                    tab.build(demo, chat)
        add_endpoints(chat)
        if chat.settings.mcp:
            add_tools(chat)
    return demo


def _header(demo: gr.Blocks, chat: Chat) -> None:
    gr.Markdown(
        "# Orca 2\nMicrosoft's Orca 2, run exactly as its model card does: the ChatML prompt, "
        "the slow tokenizer's ids, greedy decoding unless you ask for sampling. Your chats stay in this browser."
    )
    if on_space():
        # Visitors who want no queue (or other settings) can run their own copy.
        gr.DuplicateButton("Duplicate this Space", size="sm", elem_id="duplicate-space")
    if sign_in_offered():
        _sign_in(chat)
    model_status = gr.Markdown(_model_status(chat), elem_id="model-status")
    # Until the model is loaded, the status line follows the loading.
    loading_timer = gr.Timer(1.0, active=not chat.loading.done)

    def refresh_model_status() -> dict:
        return {model_status: _model_status(chat), loading_timer: gr.Timer(active=not chat.loading.done)}

    loading_timer.tick(refresh_model_status, None, [model_status, loading_timer], **INSTANT)
    demo.load(refresh_model_status, None, [model_status, loading_timer], **INSTANT)


def _sign_in(chat: Chat) -> None:
    """Sign in with Hugging Face, and what it gives. Only where the page offers it (settings.sign_in_offered):
    the button brings Gradio's OAuth routes and the session that says who signed in (adapters.visitor_of)."""
    with gr.Row(elem_id="sign-in"):
        gr.LoginButton(size="sm", scale=0, min_width=240)
        gr.Markdown(_why_sign_in(chat), elem_id="why-sign-in")


def _why_sign_in(chat: Chat) -> str:
    limits = chat.fair_share.limits
    gives = []
    if limits.per_visitor > limits.per_anonymous:
        gives.append(f"{limits.per_visitor} requests at a time instead of {limits.per_anonymous}")
    if limits.sign_in_for_heavy:
        gives.append("comparisons")
    if not gives:
        return "Signed in, your fair share of the model is your account's, in every tab."
    return f"Signing in gives you {' and '.join(gives)}; your share is your account's, in every tab."


def _model_status(chat: Chat) -> str:
    loading = chat.loading
    if loading.backend is not None:
        info = loading.backend.info
        if info.served_by:
            return f"**Model** {info.name} · **Inference server** {info.served_by} ({info.reason})"
        if info.runtime:
            return (
                f"**Model** {info.name} · **Weights** {info.quantization} · **Runs on** {info.runtime}, {info.device}"
            )
        return f"**Model** {info.name} · **Weights** {info.quantization} ({info.reason}) · **Device** {info.device}"
    icon = "❌" if loading.error else "⏳"
    return f"{icon} {html.escape(loading.describe())}"

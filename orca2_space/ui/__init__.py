"""The page and the API endpoints: layout and event wiring only; the work is in chat.py.

page.py lays the page out and wires its events, answers.py streams an answer into it and keeps the
visitor's conversations in their browser, messages.py turns records into what the page shows,
api.py serves /chat and /inspect_prompt, and guard.py checks every HTTP request before Gradio does.
"""

from .page import CSS, THEME, build

__all__ = ["CSS", "THEME", "build"]

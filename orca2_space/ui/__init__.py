"""The page and the API endpoints: layout and event wiring only; the work is in chat.py.

page.py lays the page out and wires its events, answers.py streams an answer into it and keeps the
visitor's conversations in their browser, messages.py turns records into what the page shows, and
api.py serves /chat and /inspect_prompt.
"""

from .page import CSS, THEME, build

__all__ = ["CSS", "THEME", "build"]

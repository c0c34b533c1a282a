"""The page and the API endpoints: layout and event wiring only; the work is in chat.py.

page.py lays out the header and the tabs, each tab's module (chat_tab.py, compare_tab.py) its layout
and events; adapters.py is what the tabs and the endpoints share (an answer's updates, who is asking,
bad input as a gr.Error); messages.py turns records into what the page shows; api.py serves /chat,
/compare and /inspect_prompt, tokens.py the token view and /token_probabilities; mcp_tools.py the
MCP tools agents get with --mcp; guard.py checks every HTTP request before Gradio does.
"""

from .page import CSS, THEME, build

__all__ = ["CSS", "THEME", "build"]

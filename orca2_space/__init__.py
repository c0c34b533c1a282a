"""Orca 2 in the browser: a Gradio chat that runs Microsoft's Orca 2 exactly as its model card does."""

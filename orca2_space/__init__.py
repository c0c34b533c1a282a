"""Orca 2 in the browser: exact prompts, streaming, moderation, and a workbench for its reasoning."""

__version__ = "0.3.0"

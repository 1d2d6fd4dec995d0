"""The terminal chat client: a Textual app with the main conversation and a btw side panel.

``sidechain chat`` runs it (through :func:`run_tui`) when stdin and stdout are terminals.
"""

from __future__ import annotations

from .app import ChatApp, format_note, run_tui

__all__ = ["ChatApp", "format_note", "run_tui"]

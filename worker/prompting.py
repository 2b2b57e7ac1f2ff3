"""Prompt rendering for the worker: the templates live in `models.templates`, where the trainer
imports them too; these names stay importable from here."""

from ..models.templates import (
    TEMPLATES,
    VICUNA_SYSTEM,
    PromptBuilder,
    PromptError,
    render_chatml,
    render_llama2,
    render_vicuna,
)

__all__ = ["TEMPLATES", "VICUNA_SYSTEM", "PromptBuilder", "PromptError", "render_chatml", "render_llama2",
           "render_vicuna"]

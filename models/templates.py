"""Chat templates and prompt rendering: chat messages or a raw prompt to token ids.

A model's own chat template (from its tokenizer) is used when it has one. For models without
one, or to override it, a built-in template is chosen with `--conv-template`. Workers render
requests with it and the trainer renders training examples with it, so a model is trained on
the prompts it is served; it needs a tokenizer object, never torch or the worker.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..proto.messages import ChatMessage

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class PromptError(ValueError):
    """The request cannot be rendered into a prompt for this model."""


def _split_system(messages: Sequence[ChatMessage], default: str) -> tuple[str, list[ChatMessage]]:
    system = [m.content for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    return ("\n".join(system) if system else default), turns


def render_chatml(messages: Sequence[ChatMessage], bos: str, eos: str) -> str:
    body = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def render_vicuna(messages: Sequence[ChatMessage], bos: str, eos: str) -> str:
    system, turns = _split_system(messages, VICUNA_SYSTEM)
    out = [system + " "]
    for m in turns:
        if m.role == "user":
            out.append(f"USER: {m.content} ")
        else:
            out.append(f"ASSISTANT: {m.content}{eos}")
    out.append("ASSISTANT:")
    return bos + "".join(out)


def render_llama2(messages: Sequence[ChatMessage], bos: str, eos: str) -> str:
    system, turns = _split_system(messages, "")
    out = []
    first_user = True
    for m in turns:
        if m.role == "user":
            content = m.content
            if first_user and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            first_user = False
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {m.content.strip()} {eos}")
    return "".join(out)


TEMPLATES: dict[str, Callable[[Sequence[ChatMessage], str, str], str]] = {
    "chatml": render_chatml,
    "vicuna_v1.1": render_vicuna,
    "llama-2": render_llama2,
}


_ENCODING_METHODS = ("__call__", "_call_one", "encode_plus", "_encode_plus", "_batch_encode_plus")


def _plain_backend(tokenizer):
    """The fast tokenizer's Rust tokenizer, unless its class encodes differently from the base
    class that holds it (CodeLlama's splits infilling prompts in `_encode_plus`): None then."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    cls = type(tokenizer)
    base = next((k for k in reversed(cls.__mro__) if "backend_tokenizer" in vars(k)), None)
    if base is None or any(getattr(cls, name, None) is not getattr(base, name, None) for name in _ENCODING_METHODS):
        return None
    return backend


class PromptBuilder:
    """Turns a request's messages or prompt into token ids with one tokenizer."""

    def __init__(self, tokenizer, conv_template: str | None = None):
        if conv_template is not None and conv_template not in TEMPLATES:
            raise ValueError(
                f"unknown conversation template {conv_template!r}; choose one of {sorted(TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.conv_template = conv_template
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._backend = _plain_backend(tokenizer)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """`text`'s ids as the tokenizer gives them. A fast tokenizer's Rust tokenizer is called
        directly, without the Python wrapper per call (146 -> 61 us for a short prompt), where
        the wrapper adds nothing: its class encodes as the fast base class does, and the Rust
        tokenizer has no truncation or padding left on for the wrapper to undo."""
        backend = self._backend
        if backend is not None and backend.truncation is None and backend.padding is None:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def can_chat(self) -> bool:
        return self.conv_template is not None or self.has_chat_template

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.encode(self.chat_text(messages), add_special_tokens=False)

    def chat_text(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for `messages`, ending with the generation prompt (the assistant's
        turn opened). The trainer renders its training examples with it too."""
        if self.conv_template is not None:
            bos = self.tokenizer.bos_token or ""
            eos = self.tokenizer.eos_token or ""
            text = TEMPLATES[self.conv_template](messages, bos, eos)
        elif self.has_chat_template:
            text = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
            )
        else:
            raise PromptError(
                "this model has no chat template: use /v1/completions, or start its worker with "
                f"--conv-template (one of {', '.join(sorted(TEMPLATES))})"
            )
        return text

    def completion_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens=True)
        vocab = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise PromptError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        return list(prompt)

"""Which optional extra brings which module: the single place that turns a missing import into
the `pip install "chatfabric[...]"` that fixes it. Each list names the modules of that extra's
distributions in pyproject.toml (tests/test_install.py holds the two together)."""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("torch", "transformers", "accelerate", "gguf"),
    "vllm": ("vllm",),
    "arena": ("numpy", "scipy", "gradio", "openai", "matplotlib"),
    "judge": ("openai", "numpy", "matplotlib", "tqdm"),
    "train": ("torch", "transformers", "accelerate", "gguf", "peft", "tqdm"),
    "qlora": ("bitsandbytes",),
    "deepspeed": ("deepspeed",),
}

# what a module brought in by those distributions may import in turn (gradio's web stack)
_BROUGHT_BY = {"fastapi": "gradio", "uvicorn": "gradio", "starlette": "gradio", "httpx": "openai"}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that this installation lacks."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def extra_for(module: str | None, preferred: str | None) -> str | None:
    """The extra that brings `module` (a top-level name or a dotted one), `preferred` (the
    command's own extra) first; None for a module no extra brings."""
    top = (module or "").partition(".")[0]
    top = _BROUGHT_BY.get(top, top)
    if preferred is not None and top in EXTRAS.get(preferred, ()):
        return preferred
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def install_hint(extra: str) -> str:
    return f'pip install "chatfabric[{extra}]"'

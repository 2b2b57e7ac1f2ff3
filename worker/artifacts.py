"""Models and adapters published by the trainer, served from `artifact://NAME`: fetched from
the artifacts store (`proto/model_artifacts.py`) into a local cache keyed by their digest, and
an adapter merged into its base model once, so the engine loads a plain model folder."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from ..models.model_artifacts import artifact_name, model_artifact, read_card, unpack_folder
from ..proto.subjects import MODELS_BUCKET

log = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "chatfabric" / "artifacts"


async def fetch(name: str, bus_opener) -> Path:
    """The artifact's folder, unpacked (once per content) under the cache."""
    async with bus_opener() as bus:
        data = await bus.read_artifact(MODELS_BUCKET, model_artifact(name))
    if data is None:
        raise ValueError(f"artifact://{name}: no model or adapter of that name in the '{MODELS_BUCKET}' object store")
    digest = hashlib.sha256(data).hexdigest()
    folder = CACHE / f"{name.replace('/', '_')}-{digest[:16]}"
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".partial")
        await asyncio.to_thread(unpack_folder, data, staging)
        staging.rename(folder)
    log.info("artifact://%s: sha256:%s, %s", name, digest, read_card(folder).get("kind", "model"))
    return folder


def merge_adapter(base: Path, adapter: Path) -> Path:
    """The base model with the LoRA adapter merged in, saved once next to the adapter."""
    merged = adapter / "merged"
    if (merged / "config.json").is_file():
        return merged
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    staging = adapter / "merged.partial"
    model.save_pretrained(str(staging))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(staging))
    staging.rename(merged)
    return merged


async def resolve_model_folder(model_path: str | None, adapter: str | None, default_base, bus_opener) -> tuple[Path, str | None]:
    """(the model folder to load, the artifact's name) for --model-path and --adapter, either of
    which may be `artifact://NAME`; a plain --adapter folder works too."""
    name = artifact_name(model_path or "")
    if name is not None:
        folder = await fetch(name, bus_opener)
        if read_card(folder).get("kind") != "adapter":
            return folder, name
        adapter_folder, base = folder, await asyncio.to_thread(default_base)
    else:
        base = Path(model_path) if model_path else await asyncio.to_thread(default_base)
        name = artifact_name(adapter)
        adapter_folder = await fetch(name, bus_opener) if name is not None else Path(adapter)
    if not base.is_dir() or not adapter_folder.is_dir():
        raise ValueError(f"--adapter needs a base model folder and an adapter: {base}, {adapter_folder}")
    return await asyncio.to_thread(merge_adapter, base, adapter_folder), name

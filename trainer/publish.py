"""What a run leaves on the bus: its model card, its result (adapter or model) in the `models`
object store with a `ModelPublished` event, and its checkpoints in the `training` store (so that
another trainer resumes)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from ..proto.bus import Bus
from ..proto.events import ArtifactRef, ModelPublished
from ..proto.subjects import MODELS_BUCKET, TRAINING_BUCKET
from ..models.model_artifacts import MODEL_CARD, checkpoint_artifact, model_artifact, pack_folder, unpack_folder
from .settings import TrainSettings


def write_card(folder: Path, *, name: str, base_model: str, data: str, settings: TrainSettings,
               metrics: dict) -> dict:
    kind = "adapter" if settings.lora and not settings.merge else "model"
    card = {"name": name, "kind": kind, "base_model": base_model, "data": data, "method": settings.method,
            "settings": {"method": settings.method, **settings.to_params()}, "metrics": metrics,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MODEL_CARD).write_text(json.dumps(card, indent=2, default=str))
    return card


async def publish_model(bus: Bus, folder: Path, card: dict, job_id: str | None = None) -> ArtifactRef:
    """Store the folder as `models/<name>.tar` and announce it."""
    data = await asyncio.to_thread(pack_folder, folder)
    ref = await bus.put_artifact(MODELS_BUCKET, model_artifact(card["name"]), data, description=f"{card['kind']} of {card['base_model']}")
    headline = {k: v for k, v in card["metrics"].items() if isinstance(v, (int, float, str, bool))}
    await bus.publish_event(ModelPublished(model=card["name"], artifact=ref, kind=card["kind"],
                                           base_model=card["base_model"], job_id=job_id,
                                           card={"data": card["data"], "method": card["method"], **headline}))
    return ref


async def store_checkpoint(bus: Bus, job_id: str, folder: Path) -> ArtifactRef:
    data = await asyncio.to_thread(pack_folder, folder)
    return await bus.put_artifact(TRAINING_BUCKET, checkpoint_artifact(job_id), data, description=folder.name)


async def fetch_checkpoint(bus: Bus, job_id: str, into: Path) -> Path | None:
    """The job's last stored checkpoint, unpacked as `into/checkpoint-<step>`; None if none."""
    data = await bus.read_artifact(TRAINING_BUCKET, checkpoint_artifact(job_id))
    if data is None:
        return None
    staging = await asyncio.to_thread(unpack_folder, data, into / "fetched")
    state = json.loads((staging / "trainer_state.json").read_text())
    target = into / f"checkpoint-{state['global_step']}"
    staging.rename(target)
    return target

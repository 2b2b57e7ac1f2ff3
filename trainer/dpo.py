"""Direct Preference Optimization on a LoRA adapter, written here (about forty lines of loss
and loop) rather than taken from `trl`: the reference model is the same weights with the
adapter switched off (no second copy in memory), and samples are rendered with the same masks
as SFT (`masks.py`), so the answer tokens scored are exactly those the worker would produce.

Checkpoints (`checkpoint-<step>`: the adapter, the optimizer's state, the loss and margin so
far) every `save_steps` and when asked to stop; a resumed run takes the same batches as an
uninterrupted one, since a step's batch depends on its number alone.

Pairs come from a JSON Lines file (`{"prompt": str | [messages], "chosen": str, "rejected": str}`)
or from arena votes (`pairs.py`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..proto.messages import ChatMessage
from .data import DataError
from .masks import IGNORE, Sample, render_with_mask
from .progress import Hooks, Meter
from .sft import RunResult, RunSpec, checkpoint_to_resume, load_model, save_result, stopped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    prompt: tuple[ChatMessage, ...]
    chosen: str
    rejected: str

    def key(self) -> tuple:
        return tuple((m.role, m.content) for m in self.prompt), self.chosen, self.rejected


def load_pairs(path: Path) -> list[Pair]:
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt = record["prompt"]
            messages = ((ChatMessage(role="user", content=prompt),) if isinstance(prompt, str)
                        else tuple(ChatMessage(**m) for m in prompt))
            pair = Pair(messages, record["chosen"], record["rejected"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(path, number, None, f"a pair needs prompt (text or messages), chosen and rejected: {err}") from None
        if not isinstance(pair.chosen, str) or not isinstance(pair.rejected, str):
            raise DataError(path, number, None, "chosen and rejected must be strings")
        pairs.append(pair)
    if not pairs:
        raise DataError(path, None, None, "no pairs")
    return pairs


def render_pair(prompts, pair: Pair, max_length: int) -> tuple[Sample, Sample] | None:
    sides = [render_with_mask(prompts, (*pair.prompt, ChatMessage(role="assistant", content=answer)), max_length)
             for answer in (pair.chosen, pair.rejected)]
    return (sides[0], sides[1]) if all(isinstance(s, Sample) for s in sides) else None


def answer_logprob(model, sample: Sample):
    """The summed log-probability of the sample's trained (answer) tokens."""
    import torch

    ids = torch.tensor([sample.input_ids])
    labels = torch.tensor([sample.labels])
    logits = model(input_ids=ids).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """-log sigmoid(beta * (policy margin - reference margin)), and that margin (Rafailov et al.)."""
    import torch.nn.functional as F

    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin), margin


def run_dpo(spec: RunSpec, hooks: Hooks) -> RunResult:
    import torch
    from transformers import AutoTokenizer

    from ..models.templates import PromptBuilder

    s = spec.settings
    torch.manual_seed(s.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(spec.model_path))
    prompts = PromptBuilder(tokenizer, s.conv_template)
    rendered = [r for r in (render_pair(prompts, p, s.max_length) for p in load_pairs(spec.data)) if r is not None]
    if not rendered:
        raise ValueError(f"{spec.data}: no pair can be rendered within max_length {s.max_length}")
    model = load_model(spec.model_path, s)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate)
    total = s.max_steps if s.max_steps > 0 else int(len(rendered) * s.epochs / s.batch_size) or 1
    meter, margins, losses = Meter(), [], []
    start = 0
    if (checkpoint := checkpoint_to_resume(spec)) is not None:
        start, losses, margins = load_checkpoint(checkpoint, model, optimizer)
        log.info("DPO resumes from %s (step %d)", checkpoint, start)
    meter.restart(start)
    for step in range(start + 1, total + 1):
        # the batch is a function of the step alone: a resumed run sees what an uninterrupted one would
        batch = [rendered[((step - 1) * s.batch_size + i) % len(rendered)] for i in range(s.batch_size)]
        loss, margin = _step(model, batch, s.beta, meter)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss)
        margins.append(margin)
        hooks.on_progress(meter.progress(step, total, step * s.batch_size / len(rendered), loss=loss, lr=s.learning_rate))
        stopping = hooks.stop.is_set() and step < total
        if step % s.save_steps == 0 or (stopping and hooks.save_on_stop):
            folder = save_checkpoint(spec.output / "checkpoints", step, model, optimizer, losses, margins)
            hooks.on_checkpoint(folder, step)
        if stopping:
            raise stopped(spec, hooks, step, total)
    folder = spec.output / "final"
    save_result(model, tokenizer, folder, merge=s.merge)
    return RunResult(folder, {"steps": total, "pairs": len(rendered), "first_loss": round(losses[0], 6),
                              "last_loss": round(losses[-1], 6), "first_margin": round(margins[0], 6),
                              "last_margin": round(margins[-1], 6)})


# -- checkpoints: the adapter, the optimizer and the curves so far, as `checkpoint-<step>` -------

STATE_FILE = "trainer_state.json"  # the name and `global_step` key the service's checkpoint store reads


def save_checkpoint(into: Path, step: int, model, optimizer, losses: list, margins: list) -> Path:
    """Write `into/checkpoint-<step>` (replacing older ones: one is kept, as for SFT)."""
    import shutil

    import torch

    folder = into / f"checkpoint-{step}"
    staging = into / f".checkpoint-{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(torch.get_rng_state(), staging / "rng_state.pt")  # LoRA dropout draws from it
    (staging / STATE_FILE).write_text(json.dumps({"global_step": step, "losses": losses, "margins": margins}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # a checkpoint is whole or absent
    for older in into.glob("checkpoint-*"):
        if older != folder:
            shutil.rmtree(older, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, list, list]:
    """Load a checkpoint into `model` (its adapter weights) and `optimizer`; its step and curves."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng_state.pt", weights_only=True))
    return int(state["global_step"]), list(state["losses"]), list(state["margins"])


def _step(model, batch, beta: float, meter: Meter) -> tuple[float, float]:
    import torch

    total_loss, total_margin = 0.0, 0.0
    for chosen, rejected in batch:
        with torch.no_grad(), model.disable_adapter():
            ref = (answer_logprob(model, chosen), answer_logprob(model, rejected))
        loss, margin = dpo_loss(answer_logprob(model, chosen), answer_logprob(model, rejected), *ref, beta)
        (loss / len(batch)).backward()
        total_loss += loss.item() / len(batch)
        total_margin += margin.item() / len(batch)
        meter.tokens += len(chosen.input_ids) + len(rejected.input_ids)
        meter.trained += chosen.trained + rejected.trained
    return total_loss, total_margin

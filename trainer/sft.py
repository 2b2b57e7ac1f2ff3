"""Supervised fine-tuning (full or LoRA) with the Hugging Face Trainer, on masked samples
(`masks.py`) packed padding-free: a batch is one row of whole samples, each with its own
position ids, so attention stays within a sample and no compute is spent on padding.

`run_sft` blocks: callers run it in a thread. It reports progress and checkpoints through
`Hooks`, and when `hooks.stop` is set it saves a checkpoint and raises `Stopped`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .data import load_conversations
from .masks import MaskReport, Sample, render_with_mask
from .progress import Hooks, Meter, Stopped
from .settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    model_path: Path
    data: Path
    output: Path  # checkpoints in output/checkpoints, the result in output/final
    settings: TrainSettings
    eval_data: Path | None = None
    resume: bool | Path = False  # True: the latest checkpoint in output; a path: that checkpoint


@dataclass
class RunResult:
    folder: Path  # the adapter (LoRA) or the model
    metrics: dict = field(default_factory=dict)


def check_device(settings: TrainSettings) -> None:
    import torch

    if settings.qlora and not torch.cuda.is_available():
        raise ValueError("--qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU, and this "
                         "machine has none: use --lora (the same adapter, trained on an unquantized model)")


def load_model(model_path: Path, settings: TrainSettings, trainable: bool = True):
    """The model to train: the base model, wrapped with a LoRA adapter when the method uses one."""
    import torch
    from transformers import AutoModelForCausalLM

    check_device(settings)
    options = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32}
    if settings.qlora:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), **options)
    if not settings.lora:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=settings.targets(), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if settings.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def build_samples(path: Path, prompts, max_length: int) -> tuple[list[Sample], MaskReport]:
    report, samples = MaskReport(), []
    for conversation in load_conversations(path):
        result = render_with_mask(prompts, conversation.messages, max_length, conversation.id)
        report.add(result)
        if isinstance(result, Sample):
            samples.append(result)
    if not samples:
        raise ValueError(f"{path}: no sample can be trained ({report.summary()})")
    return samples, report


class CountingCollator:
    """Packs a batch into one row (the library's flattening collator) and counts its tokens."""

    def __init__(self, meter: Meter):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True)
        self.meter = meter

    def __call__(self, features):
        batch = self.flatten([{"input_ids": list(f.input_ids), "labels": list(f.labels)} for f in features])
        self.meter.tokens += int(batch["input_ids"].numel())
        self.meter.trained += int((batch["labels"] != -100).sum())
        return batch


def _callback(hooks: Hooks, meter: Meter, losses: list):
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.restart(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                losses.append(logs["loss"])
            if "loss" in logs or "eval_loss" in logs:
                hooks.on_progress(meter.progress(state.global_step, state.max_steps, state.epoch or 0.0,
                                                 loss=logs.get("loss"), lr=logs.get("learning_rate"),
                                                 eval_loss=logs.get("eval_loss")))

        def on_step_end(self, args, state, control, **kwargs):
            if hooks.stop.is_set():
                control.should_save = hooks.save_on_stop
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            hooks.on_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    return Report()


@contextlib.contextmanager
def deepspeed_scope(settings: TrainSettings):
    """What a DeepSpeed run needs around it. DeepSpeed needs a process group: under a launcher
    (`deepspeed`, `torchrun`) the environment describes it; without one, this process becomes a
    group of one (rank 0 of 1 on a free local port) instead of DeepSpeed looking for MPI, and
    stays one (DeepSpeed keeps the group for the process's life). Afterwards transformers'
    global ZeRO-3 flag is cleared and the environment variables the run set are removed: a
    trainer service runs job after job in one process, and left set, every later
    `from_pretrained` would build partitioned, empty weights and every later run would ask for
    DeepSpeed."""
    if settings.deepspeed is None:
        yield
        return
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        from ..proto.embedded import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    before = dict(os.environ)
    try:
        yield
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        # the run also left ACCELERATE_USE_DEEPSPEED and the like in the environment, which the
        # process's next run (and every child it starts) would read as "use DeepSpeed"
        os.environ.clear()
        os.environ.update(before)


def training_args(spec: RunSpec, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    s = spec.settings
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(spec.output / "checkpoints"), per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate, num_train_epochs=s.epochs, max_steps=s.max_steps,
        warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay, logging_steps=1,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=1,
        eval_strategy="steps" if has_eval else "no", eval_steps=s.eval_steps,
        report_to="none", use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), seed=s.seed,
        deepspeed=s.deepspeed_config(), gradient_checkpointing=s.gradient_checkpointing,
        remove_unused_columns=False, dataloader_pin_memory=False, disable_tqdm=True,
    )


def quiet_deepspeed() -> None:
    """accelerate imports DeepSpeed whenever it is installed, and DeepSpeed, finding no GPU,
    warns on its own handler that it falls back to the CPU: name the CPU (unless the user named
    an accelerator), which it then takes without a word."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run_sft(spec: RunSpec, hooks: Hooks) -> RunResult:
    with deepspeed_scope(spec.settings):
        return _run_sft(spec, hooks)


def _run_sft(spec: RunSpec, hooks: Hooks) -> RunResult:
    from transformers import AutoTokenizer, PrinterCallback, Trainer

    from ..models.templates import PromptBuilder

    s = spec.settings
    check_device(s)
    tokenizer = AutoTokenizer.from_pretrained(str(spec.model_path))
    prompts = PromptBuilder(tokenizer, s.conv_template)
    train, report = build_samples(spec.data, prompts, s.max_length)
    log.info("training data %s: %s", spec.data, report.summary())
    evaluation = build_samples(spec.eval_data, prompts, s.max_length)[0] if spec.eval_data else None
    meter, losses = Meter(), []
    quiet_deepspeed()
    trainer = Trainer(model=load_model(spec.model_path, s), args=training_args(spec, evaluation is not None),
                      train_dataset=train, eval_dataset=evaluation, data_collator=CountingCollator(meter),
                      callbacks=[_callback(hooks, meter, losses)])
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log dict; our bar shows them
    resume = checkpoint_to_resume(spec)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    rates = meter.progress(0, 0, 0)  # training alone, not the save below
    if hooks.stop.is_set() and trainer.state.global_step < trainer.state.max_steps:
        raise stopped(spec, hooks, trainer.state.global_step, trainer.state.max_steps)
    folder = spec.output / "final"
    save_result(trainer.model, tokenizer, folder, merge=s.merge)
    metrics = {"steps": trainer.state.global_step, "samples": report.kept, "skipped": sum(report.skipped.values()),
               "train_loss": round(output.training_loss, 6), "tokens_per_s": round(rates.tokens_per_s, 1),
               "trained_tokens_per_s": round(rates.trained_tokens_per_s, 1)}
    if losses:
        metrics.update(first_loss=round(losses[0], 6), last_loss=round(losses[-1], 6))
    if evaluation is not None:
        eval_loss = trainer.evaluate()["eval_loss"]
        metrics.update(eval_loss=round(eval_loss, 6), eval_perplexity=round(math.exp(min(eval_loss, 50)), 3))
    return RunResult(folder, metrics)


def checkpoint_to_resume(spec: RunSpec) -> Path | None:
    """The checkpoint `spec.resume` names: None, the latest in `output/checkpoints`, or a path."""
    if spec.resume is False:
        return None
    if spec.resume is not True:
        return Path(spec.resume)
    found = sorted((spec.output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not found:
        raise ValueError(f"--resume: no checkpoint in {spec.output / 'checkpoints'}")
    return found[-1]


def stopped(spec: RunSpec, hooks: Hooks, step: int, total: int) -> Stopped:
    """What a run asked to stop at `step` of `total` raises, saying where its checkpoint is."""
    return Stopped(f"stopped at step {step} of {total}"
                   + (f", checkpoint in {spec.output / 'checkpoints'}" if hooks.save_on_stop else ""))


def save_result(model, tokenizer, folder: Path, merge: bool) -> None:
    """The adapter alone (LoRA), or the whole model (full fine-tuning, or a merged adapter)."""
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))

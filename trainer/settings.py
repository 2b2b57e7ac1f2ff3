"""One run's settings (`TrainSettings`): built from the command line or from a train job's
`params`, validated once, and written into the model card."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Method = Literal["sft", "lora", "dpo"]
DEEPSPEED_PRESETS = {"zero2": "ds_zero2.json", "zero3": "ds_zero3.json"}


@dataclass(frozen=True)
class TrainSettings:
    method: Method = "lora"  # sft: every weight; lora: a LoRA adapter; dpo: DPO on a LoRA adapter
    max_length: int = 2048
    epochs: float = 1.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps
    lr: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full fine-tuning
    batch_size: int = 4  # samples per step and device, packed into one row
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = "q_proj,v_proj"  # comma-separated module names, or all-linear
    qlora: bool = False
    deepspeed: str | None = None  # zero2, zero3 or a config file
    gradient_checkpointing: bool = False
    save_steps: int = 50  # a checkpoint every so many steps
    eval_steps: int = 50
    conv_template: str | None = None
    seed: int = 0
    beta: float = 0.1  # DPO: how far the policy may move from the reference
    merge: bool = False  # publish the merged model instead of the adapter

    def __post_init__(self) -> None:
        if self.method not in ("sft", "lora", "dpo"):
            raise ValueError(f"method must be sft, lora or dpo, not {self.method!r}")
        positive = {"max_length": self.max_length, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lora_r": self.lora_r, "save_steps": self.save_steps, "eval_steps": self.eval_steps,
                    "epochs": self.epochs, "beta": self.beta}
        bad = [name for name, value in positive.items() if value <= 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive")
        if self.lr is not None and self.lr <= 0:
            raise ValueError("lr must be positive")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.qlora and self.method == "sft":
            raise ValueError("--qlora trains a LoRA adapter: it does not go with full fine-tuning (sft)")

    @property
    def lora(self) -> bool:
        return self.method in ("lora", "dpo") or self.qlora

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.lora else 2e-5

    def targets(self) -> str | list[str]:
        return "all-linear" if self.lora_target == "all-linear" else [t for t in self.lora_target.split(",") if t]

    def deepspeed_config(self) -> str | None:
        """The DeepSpeed config file: a shipped preset by name, or the user's file."""
        if self.deepspeed is None:
            return None
        if self.deepspeed in DEEPSPEED_PRESETS:
            return str(Path(__file__).parent / "deepspeed" / DEEPSPEED_PRESETS[self.deepspeed])
        if not Path(self.deepspeed).is_file():
            raise ValueError(f"--deepspeed {self.deepspeed}: not zero2, zero3 or a config file")
        return self.deepspeed

    def to_params(self) -> dict:
        """The settings that differ from the defaults, as a train job's `params`."""
        default = TrainSettings(method=self.method)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "method" and getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_params(cls, method: str, params: dict) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)} - {"method"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(method=method, **params)

    @classmethod
    def from_args(cls, args, method: str) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)} - {"method"}
        return cls(method=method, **{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})

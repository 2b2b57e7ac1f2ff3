"""How far a run is (`Progress`), measured where training happens and reported through `Hooks`,
which the command line turns into a progress bar and the service into `JobProgress` events."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    epoch: float
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float = 0.0  # input tokens (no padding: every one is a real token)
    trained_tokens_per_s: float = 0.0  # tokens with a loss (the assistant's)
    eta_s: float | None = None
    eval_loss: float | None = None

    def metrics(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items() if v is not None}

    def line(self) -> str:
        parts = [f"step {self.step}/{self.total}", f"epoch {self.epoch:.2f}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.eta_s is not None:
            parts.append(f"ETA {self.eta_s:,.0f}s")
        return ", ".join(parts)


class Stopped(Exception):
    """A run asked to stop (`Hooks.stop`) before its last step: what it saved is a checkpoint,
    not a result."""


@dataclass
class Hooks:
    """What a run tells its caller, from the training thread, and how it is asked to stop:
    `stop` set means return at the next step's end, after a checkpoint unless `save_on_stop` was
    cleared first (a cancelled run is not resumed: nothing to save)."""

    on_progress: Callable[[Progress], None] = lambda progress: None
    on_checkpoint: Callable[[Path, int], None] = lambda folder, step: None
    stop: threading.Event = field(default_factory=threading.Event)
    save_on_stop: bool = True


@dataclass
class Meter:
    """Tokens seen since the run (or its resumption) began, for the rates and the ETA."""

    tokens: int = 0
    trained: int = 0
    started: float = field(default_factory=time.monotonic)
    first_step: int = 0

    def restart(self, step: int) -> None:
        self.tokens = self.trained = 0
        self.started, self.first_step = time.monotonic(), step

    def progress(self, step: int, total: int, epoch: float, **values) -> Progress:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = step - self.first_step
        eta = elapsed / done * (total - step) if done > 0 else None
        return Progress(step, total, epoch, tokens_per_s=self.tokens / elapsed,
                        trained_tokens_per_s=self.trained / elapsed, eta_s=eta, **values)

"""Run FastChat 0.2.36's `fastchat/train/train.py` (its own arguments, its own data preparation:
the Vicuna template, every sample padded to `--model_max_length`), with its Trainer wrapped to
count what the batches hold and to time `train()`. Prints one JSON line: tokens in the batches
(all, real, trained), seconds, and the rates.

One shim: train.py reads `tokenizer.legacy`, which only Llama's SentencePiece tokenizer has;
SmolLM2's tokenizer gets `legacy = True` (train.py's original Llama-1 arithmetic). Its masks
assume Llama's tokenizer either way, so most samples end in its "tokenization mismatch" and
train nothing; they are computed all the same, which is what the rate measures. The final
save is skipped (train.py's FSDP-aware save fails without a distributed setup, and it is not
part of the rate).

    FASTCHAT_VENV/bin/python bench/peers/fastchat_train.py --model_name_or_path DIR \
        --data_path FILE --output_dir DIR --model_max_length 512 ...
"""

from __future__ import annotations

import json
import time

import transformers
from fastchat.train import train as fastchat_train

IGNORE = -100


class CountingTrainer(transformers.Trainer):
    counts = {"tokens": 0, "real_tokens": 0, "trained_tokens": 0}
    seconds = 0.0

    def training_step(self, model, inputs, *args, **kwargs):
        counts = CountingTrainer.counts
        counts["tokens"] += int(inputs["input_ids"].numel())
        counts["real_tokens"] += int(inputs["attention_mask"].sum())
        counts["trained_tokens"] += int((inputs["labels"] != IGNORE).sum())
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        started = time.monotonic()
        try:
            return super().train(*args, **kwargs)
        finally:
            CountingTrainer.seconds = time.monotonic() - started


def with_legacy_flag(load):
    def from_pretrained(*args, **kwargs):
        tokenizer = load(*args, **kwargs)
        if not hasattr(tokenizer, "legacy"):
            tokenizer.legacy = True
        return tokenizer
    return from_pretrained


if __name__ == "__main__":
    fastchat_train.Trainer = CountingTrainer
    fastchat_train.trainer_save_model_safe = lambda trainer: None
    transformers.AutoTokenizer.from_pretrained = with_legacy_flag(transformers.AutoTokenizer.from_pretrained)
    fastchat_train.train()
    seconds = CountingTrainer.seconds
    report = {"system": "fastchat-0.2.36 train.py", "seconds": round(seconds, 2), **CountingTrainer.counts}
    report.update({f"{k}_per_s": round(v / seconds, 1) for k, v in CountingTrainer.counts.items()})
    print(json.dumps(report))

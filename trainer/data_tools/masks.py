"""`chatfabric data masks --model-path DIR --data FILE --output MASKS.jsonl`: each sample's
`input_ids`, `labels` (-100 where masked, aligned with the inputs) and conversation, and one
sample in the terminal with its trained tokens highlighted."""

from __future__ import annotations

import sys
from pathlib import Path

from ..masks import IGNORE, MaskReport, Sample, render_with_mask
from .records import write_jsonl


def build_masks(path: str | Path, prompts, max_length: int) -> tuple[list[tuple[Sample, object]], MaskReport]:
    """Each trainable conversation of `path` with its sample, made by the trainer's masking
    function with the trainer's settings; the report counts what was skipped and why."""
    from ..data import load_conversations

    report, out = MaskReport(), []
    for conversation in load_conversations(path):
        result = render_with_mask(prompts, conversation.messages, max_length, conversation.id)
        report.add(result)
        if isinstance(result, Sample):
            out.append((result, conversation))
    return out, report


TRAINED_ON, TRAINED_OFF = "\x1b[1;30;42m", "\x1b[0m"


def render_sample(tokenizer, sample: Sample, color: bool) -> str:
    """The sample's text with the trained runs of tokens highlighted: green when `color`, else
    between [ and ]."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    out = []
    for trained, tokens in runs:
        text = tokenizer.decode(tokens)
        if trained:
            text = f"{TRAINED_ON}{text}{TRAINED_OFF}" if color else f"[{text}]"
        out.append(text)
    return "".join(out)


def masks(path: str | Path, output: str | Path, prompts, max_length: int, show: str | None, color: bool,
          out=None) -> MaskReport:
    out = out or sys.stdout
    samples, report = build_masks(path, prompts, max_length)
    write_jsonl(({"id": s.id, "input_ids": list(s.input_ids), "labels": list(s.labels),
                   "conversation": [m.model_dump() for m in c.messages]} for s, c in samples), output)
    print(f"{output}: {report.summary()}", file=out)
    if not samples:
        return report
    shown = samples[0][0] if show is None else next((s for s, _ in samples if s.id == show), None)
    if shown is None:
        raise ValueError(f"--show {show}: no sample with that id in {output}")
    print(f"sample {shown.id}: {len(shown.input_ids)} tokens, {shown.trained} trained "
          f"({'highlighted' if color else 'in [brackets]'}):", file=out)
    print(render_sample(prompts.tokenizer, shown, color), file=out)
    return report

"""Loss masks: a conversation rendered to token ids with the serving chat template
(`models.templates.PromptBuilder`), and labels that train only the assistant's tokens.

How a sample is built (`render_with_mask`):
1. The conversation's text is the template's rendering of all of it; the prompt before each
   assistant turn is the template's rendering of the messages before it (exactly what a worker
   sends the model when it is asked for that answer). Each such prompt must be a prefix of
   the whole text, or the template cannot be trained with masks and the sample is skipped.
2. The trained span of an assistant turn runs from the end of its prompt through its content
   and the turn's end-of-turn marker (`<|im_end|>`, the eos token, ...). Text after the last
   span (the next generation prompt) is dropped.
3. The text is tokenized piece by piece (prompt, answer, prompt, answer, ...) for the labels
   and also whole; both must give the same ids, token for token, and each prompt alone must
   tokenize to the same ids as in the whole. A sample where they differ is skipped with the
   position of the first difference, never trained with shifted labels.

Labels are aligned with the inputs (not shifted): `labels[i]` is `input_ids[i]` when token i is
trained, else -100. The model's loss shifts them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from ..proto.messages import ChatMessage
from ..models.templates import PromptBuilder, PromptError

IGNORE = -100
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class Skip:
    id: str
    reason: str


@dataclass
class MaskReport:
    """What became of a data file: samples kept, and why the others were skipped."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> the first sample id skipped for it

    def add(self, result: Sample | Skip) -> None:
        if isinstance(result, Sample):
            self.kept += 1
            return
        reason = result.reason.split(":")[0]
        self.skipped[reason] += 1
        self.examples.setdefault(reason, result.id)

    def summary(self) -> str:
        skipped = "; ".join(f"{n} {reason} (e.g. record {self.examples[reason]})"
                            for reason, n in self.skipped.most_common())
        return f"{self.kept} samples kept" + (f", skipped: {skipped}" if skipped else "")


def end_markers(tokenizer) -> tuple[str, ...]:
    eos = tokenizer.eos_token
    return tuple(dict.fromkeys([*END_OF_TURN, *([eos] if eos else [])]))


def trained_spans(prompts: PromptBuilder, messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text (cut after its last assistant turn) and the character spans to
    train; a `ValueError` says why the template does not allow it."""
    text = prompts.chat_text(messages)
    markers = end_markers(prompts.tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = prompts.chat_text(messages[:i])
        if not text.startswith(prompt):
            raise ValueError(f"template: the prompt of turn {i} is not a prefix of the conversation's text")
        spans.append((len(prompt), _turn_end(text, len(prompt), message.content, markers, i)))
    if not spans:
        raise ValueError("no assistant turn")
    return text[: spans[-1][1]], spans


def _turn_end(text: str, start: int, content: str, markers: tuple[str, ...], turn: int) -> int:
    body = content.strip()
    at = text.find(body, start)
    if at < 0 or text[start:at].strip():
        raise ValueError(f"template: the content of turn {turn} does not follow its prompt")
    after = at + len(body)
    ends = [(text.find(m, after), m) for m in markers]
    ends = [(pos, m) for pos, m in ends if pos >= 0 and not text[after:pos].strip()]
    if not ends:
        raise ValueError(f"template: no end-of-turn marker after turn {turn}")
    pos, marker = min(ends)
    return pos + len(marker)


def _ids(prompts: PromptBuilder, text: str) -> list[int]:
    return prompts.encode(text, add_special_tokens=False) if text else []


def render_with_mask(prompts: PromptBuilder, messages: Sequence[ChatMessage], max_length: int,
                     sample_id: str = "") -> Sample | Skip:
    """The sample's `input_ids` and `labels` (module docstring), or why it cannot be trained."""
    tokenizer = prompts.tokenizer
    try:
        text, spans = trained_spans(prompts, messages)
    except (ValueError, PromptError) as err:
        return Skip(sample_id, str(err))
    input_ids, labels, at = [], [], 0
    for start, end in spans:
        prompt_ids = _ids(prompts, text[at:start])
        answer_ids = _ids(prompts, text[start:end])
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
        at = end
        served = _ids(prompts, text[:start])
        if served != input_ids[: len(served)] or len(served) != len(input_ids) - len(answer_ids):
            return Skip(sample_id, f"tokenization mismatch: the prompt before the answer ending at character {end} "
                        "tokenizes differently alone (as a worker serves it) than within the conversation")
    whole = _ids(prompts, text)
    if whole != input_ids:
        first = next((i for i, (a, b) in enumerate(zip(whole, input_ids)) if a != b), min(len(whole), len(input_ids)))
        return Skip(sample_id, f"tokenization mismatch: the masked rendering differs from the full rendering at "
                    f"token {first} ({len(input_ids)} vs {len(whole)} tokens)")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return Skip(sample_id, f"cut by max_length: no assistant token within the first {max_length} tokens")
    return Sample(sample_id, tuple(input_ids), tuple(labels))


def trained_text(tokenizer, sample: Sample) -> list[str]:
    """The decoded runs of trained tokens, in order (for tests and for showing a mask)."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs

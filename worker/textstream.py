"""Token ids to text deltas: incremental detokenization and stop strings.

Deltas never split a UTF-8 character (a token that ends mid-character is held until the
character completes), and text that could be the start of a stop string is held back until it
is known not to be one. Stop strings themselves are never emitted.
"""

from __future__ import annotations

try:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # an older tokenizers: the window decode alone
    Tokenizer = DecodeStream = None

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token sequence into text deltas, O(1) per token.

    With a fast (Rust) tokenizer it steps the tokenizer's own streaming decoder (`DecodeStream`,
    as vLLM's fast detokenizer does): about a tenth of the cost of decoding a window. Otherwise
    it decodes a window of the last tokens twice per token. Either way the stream starts on the
    last few prompt tokens, so that tokenizers which drop a leading space at the start of a
    decode do not drop it at the start of the answer."""

    def __init__(self, tokenizer, prompt_tail: list[int] | None = None, *, streaming: bool = True):
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_tail or [])
        self._prefix = 0
        self._read = len(self._ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        usable = streaming and DecodeStream is not None and isinstance(backend, Tokenizer)
        # a prompt that ends inside a character (token ids cut mid-way) would lend its partial
        # bytes to the first delta: such a stream takes the window decoder, which leaves them out
        if usable and self._ids and self._decode(self._ids).endswith(REPLACEMENT):
            usable = False
        self._backend = backend if usable else None
        if self.streaming:
            self._stream = DecodeStream(ids=self._ids, skip_special_tokens=True)
            self._held: list[int] = []  # stepped but not yet text (a character not complete yet)
            self.push = self._step

    @property
    def streaming(self) -> bool:
        """Whether it steps the tokenizer's streaming decoder (else: window decodes)."""
        return self._backend is not None

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _step(self, token_id: int) -> str:
        text = self._stream.step(self._backend, token_id)
        if text is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character is emitted as it is)."""
        if self.streaming:
            held, self._held = self._held, []
            return self._decode(held) if held else ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Cuts the text stream at the first stop string, holding back possible partial matches."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what can be emitted now. After a stop, returns ''."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

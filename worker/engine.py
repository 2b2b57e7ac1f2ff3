"""Continuous batching for Hugging Face causal LMs (CPU and CUDA).

One engine thread runs the model; the event loop only moves messages. Each iteration of the
engine (`_step`) does three things, in the manner of nano-vllm's scheduler:

1. admit: take newly submitted sequences and drop aborted ones (their slot frees at once);
2. prefill: run up to `prefill_chunk` prompt tokens of waiting sequences: short prompts together
   in one left-padded pass, a long prompt alone over several iterations, so it never stalls the
   others' decoding; a sequence whose prompt is done samples its first token and joins the batch.
   A prompt that starts with a finished sequence's tokens (`prefix_cache.py`) prefills only the
   rest, from that sequence's kept KV;
3. decode: one forward pass over every running sequence, one token each.

The running batch shares one left-padded KV cache: row r holds `pad[r]` padding columns, then
the sequence. A finished sequence leaves a hole (its row is masked); a joining sequence that fits
is written into a hole in place, otherwise the batch is re-laid with it (padded to the batch
length, or the batch to its length). Holes nobody fills for a few steps are compacted away, and
columns that every row pads are trimmed, so steady traffic costs no whole-cache copies. Sampling is per sequence
(`sampling.py`), with each request's own seeded generator.

A failure fails the sequences it concerns and no others: one sequence's sampling, that sequence;
a prefill pass, the prompts in it; a decode pass (or a re-layout of the shared cache), the running
batch. Each of them gets the error from `generate()`, and the engine goes on serving. A sequence
is in exactly one list at a time (`Stage`) until it is done, and its KV reservation is returned
exactly once on every path: finished, aborted, failed, or the engine closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Callable, NamedTuple

import torch

from .backend import KVCacheFull, Sampling, TokenEvent, TooLargeForCache
from .prefix_cache import PrefixCache
from .sampling import make_generator, pick_token

log = logging.getLogger(__name__)


HOLE_PATIENCE = 8  # decode steps a hole may wait for a joining sequence before the batch is compacted
# a cached prefix shorter than this is not reused: prefilling those few tokens together with the
# other waiting prompts in one pass costs less than a pass of the prompt's own
PREFIX_MIN_TOKENS = 64


class Stage(Enum):
    """Where a sequence is: in exactly one of the engine's lists until it is done."""

    SUBMITTED = "submitted"  # in `_incoming`, not yet seen by the engine thread
    WAITING = "waiting"  # in `_prefilling` (slot engine: holding a row once its prefill began)
    RUNNING = "running"  # in the running batch, decoding
    DONE = "done"  # in no list; its KV reservation is returned


@dataclass(eq=False)
class _Seq:
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # engine thread only: a TokenEvent or an exception for the caller (`_Deliveries`)
    reserved: int  # KV tokens reserved for this sequence (prompt + max_tokens)
    # sampling state, made on the engine thread by `prepare` (CUDA work stays off the event loop)
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # token ids seen so far, for the repetition penalty
    output_counts: torch.Tensor | None = None  # per-vocabulary count of generated tokens, for the penalties
    cache: object = None  # own cache while prefilling (padded engine)
    row: int = -1  # the cache row it holds (slot engine)
    prefilled: int = 0
    generated: int = 0
    last_token: int = -1
    output_ids: list[int] = field(default_factory=list)  # the tokens sampled so far
    prefix: tuple | None = None  # (length, layers): a cached prefix its prefill starts from
    aborted: bool = False
    stage: Stage = Stage.SUBMITTED

    def prepare(self, device: str, vocab_size: int) -> None:
        s = self.sampling
        if not s.greedy:
            self.generator = make_generator(s.seed, device)
        if s.repetition_penalty != 1.0:
            self.seen = torch.tensor(sorted(set(self.prompt_ids)), dtype=torch.long, device=device)
        if s.presence_penalty or s.frequency_penalty:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.long, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no logit processing this step: its token is a plain argmax."""
        s = self.sampling
        return (s.greedy and not s.logit_bias and self.generated >= s.min_tokens and s.repetition_penalty == 1.0
                and not s.presence_penalty and not s.frequency_penalty)


class _Joining(NamedTuple):
    """Freshly prefilled sequences, ready to join the running batch, with their own cache rows."""

    seqs: list[_Seq]
    cache: object
    pads: list[int]


@dataclass
class _Batch:
    """The running sequences and their shared left-padded cache (a transformers DynamicCache whose
    layers' keys and values are [batch, heads, width, head_dim]; rows of finished sequences stay
    as masked holes until a joining sequence fills them or the batch is compacted)."""

    seqs: list[_Seq | None] = field(default_factory=list)  # None: a hole left by a finished sequence
    pads: list[int] = field(default_factory=list)
    cache: object = None
    holes_since: int | None = None  # the decode step at which the oldest open hole appeared

    @property
    def live(self) -> list[_Seq]:
        return [s for s in self.seqs if s is not None]

    @property
    def holes(self) -> list[int]:
        return [i for i, s in enumerate(self.seqs) if s is None]

    @property
    def width(self) -> int:
        return self.cache.layers[0].keys.shape[2] if self.cache is not None else 0

    def write_row(self, row: int, cache, source_row: int, length: int) -> None:
        """Copy `length` trailing positions of another cache's row into this row, right-aligned."""
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys[row, :, self.width - length :] = theirs.keys[source_row, :, theirs.keys.shape[2] - length :]
            mine.values[row, :, self.width - length :] = theirs.values[source_row, :, theirs.values.shape[2] - length :]

    def relayout(self, fn) -> None:
        """Replace every layer's keys and values by fn(keys) and fn(values)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = fn(layer.keys), fn(layer.values)


class BatchEngine:
    """The engine behind the transformers backend; see the module docstring."""

    def __init__(
        self,
        model,
        vocab_size: int,
        device: str,
        *,
        max_batch: int,
        kv_budget_tokens: int,
        prefill_chunk: int = 512,
        cache_arg: str = "past_key_values",
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
    ):
        if max_batch < 1 or kv_budget_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_batch, kv_budget_tokens and prefill_chunk must be positive")
        self.model = model
        self.vocab_size = vocab_size
        self.device = device
        self.max_batch = max_batch
        self.kv_budget_tokens = kv_budget_tokens
        self.prefill_chunk = prefill_chunk
        self._cache_arg = cache_arg
        self._cond = threading.Condition()
        self._incoming: list[_Seq] = []
        self._prefilling: deque[_Seq] = deque()
        self._batch = _Batch()
        self._reserved = 0
        # the KV of finished sequences (`prefix_cache.py`), within what reservations leave of the
        # budget and at most `prefix_cache_tokens` (default: the budget)
        self._prefixes = PrefixCache(PREFIX_MIN_TOKENS) if prefix_cache else None
        self.prefix_cache_tokens = min(prefix_cache_tokens or kv_budget_tokens, kv_budget_tokens)
        self._closed = False
        self._deliveries = _Deliveries()
        self.steps = 0  # decode iterations run (for tests and metrics)
        # called from the engine thread after each pass: (phase "prefill" or "decode", seconds,
        # sequences in it); worker/metrics.py records it. It must be cheap and never raise.
        self.on_pass: Callable[[str, float, int], None] | None = None
        self.max_running = 0  # the most sequences ever decoded in one forward pass
        self.holes_filled = 0  # joins written into a finished sequence's row, without a re-layout
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- the event-loop side -----------------------------------------------------------------

    @property
    def kv_free_tokens(self) -> int:
        """KV tokens not reserved by requests (the prefix cache's are given up for them)."""
        return self.kv_budget_tokens - self._reserved

    @property
    def prefix_caching(self) -> bool:
        return self._prefixes is not None

    @property
    def prefix_cached_tokens(self) -> int:
        return self._prefixes.tokens if self._prefixes is not None else 0

    @property
    def max_request_tokens(self) -> int:
        """The most KV tokens (prompt + max_tokens) one request may need."""
        return self.kv_budget_tokens

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]:
        need = len(prompt_ids) + sampling.max_tokens
        if need > self.max_request_tokens:
            raise TooLargeForCache(
                f"this request needs {need} tokens of KV cache (prompt {len(prompt_ids)} + max_tokens "
                f"{sampling.max_tokens}); the worker holds at most {self.max_request_tokens} per request: "
                "lower max_tokens"
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = _Seq(prompt_ids=list(prompt_ids), sampling=sampling, emit=self._deliveries.to(loop, events),
                   reserved=need)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if need > self.kv_free_tokens:
                raise KVCacheFull(f"{need} tokens needed, {self.kv_free_tokens} free")
            self._reserved += need
            if self._prefixes is not None:
                self._prefixes.evict_to(self.kv_free_tokens)
            self._incoming.append(seq)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                seq.aborted = True  # the engine thread drops it at its next iteration
                with self._cond:
                    self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while (arrived := self._wait_for_work()) is not None:
            try:
                self._accept(arrived)
                self._step()
            except Exception as err:  # a failure that no pass could pin on its own sequences
                log.exception("engine step failed")
                self._fail_all(err)
            finally:
                self._deliveries.flush()
        self._fail_all(RuntimeError("the engine was closed"))
        self._deliveries.flush()

    def _wait_for_work(self) -> list[_Seq] | None:
        """Block until there is work; the sequences submitted since the last iteration, or None
        once the engine is closed."""
        with self._cond:
            while not (self._closed or self._incoming or self._prefilling or self._running):
                self._cond.wait()
            if self._closed:
                return None
            arrived, self._incoming = self._incoming, []
            return arrived

    def _accept(self, arrived: list[_Seq]) -> None:
        for seq in arrived:
            seq.stage = Stage.WAITING
            self._prefilling.append(seq)
            with self._isolated("preparing a request", [seq]):
                seq.prepare(self.device, self.vocab_size)
                if self._prefixes is not None:
                    self._reuse_prefix(seq)

    def _reuse_prefix(self, seq: _Seq) -> None:
        """Let seq's prefill start after the longest cached prefix of its prompt, if any: only
        the rest is prefilled (alone, as a chunked prompt is; the layout puts the prefix's KV in
        place when the prefill begins)."""
        with self._cond:
            hit = self._prefixes.match(seq.prompt_ids)
        if hit is not None:
            seq.prefix, seq.prefilled = hit, hit[0]

    def _keep_finished(self, seq: _Seq, copy_kv: Callable[[int], list | None]) -> None:
        """Offer a sequence that finished to the prefix cache: its tokens (all but the last, whose
        KV was never computed) and `copy_kv(n)`, a copy of the KV of its first n positions."""
        if self._prefixes is None or seq.aborted:
            return
        tokens = seq.prompt_ids + seq.output_ids[:-1]
        room = min(self.kv_free_tokens, self.prefix_cache_tokens)  # its reservation is back already (`_emit`)
        if not self._prefixes.min_tokens <= len(tokens) <= room:
            return
        try:
            layers = copy_kv(len(tokens))
            if layers is not None:
                with self._cond:  # the room again, now under the lock: requests may have reserved meanwhile
                    self._prefixes.add(tokens, layers, room=min(self.kv_free_tokens, self.prefix_cache_tokens))
        except Exception:  # out of memory, say: the cache goes without it, no request fails for it
            log.exception("could not keep a finished sequence's KV for the prefix cache")

    @property
    def _running(self) -> list[_Seq]:
        """The sequences that hold a place in the running batch."""
        return self._batch.live

    @torch.inference_mode()
    def _step(self) -> None:
        self._drop_aborted()
        prefilling, began = len(self._prefilling), time.perf_counter()
        self._prefill()
        decoding = [s for s in self._running if s.stage is Stage.RUNNING]
        prefilled = time.perf_counter()
        if decoding:
            # the last first: the slot engine then frees their rows without moving any other
            with self._isolated("decode", decoding[::-1]):
                self._decode()
        if self.on_pass is not None:
            if prefilling:
                self.on_pass("prefill", prefilled - began, prefilling)
            if decoding:
                self.on_pass("decode", time.perf_counter() - prefilled, len(decoding))

    # -- where a sequence is: one place at a time, until it is done ----------------------------

    @contextlib.contextmanager
    def _isolated(self, what: str, seqs: list[_Seq]):
        """Run a pass for `seqs`. If it raises, they fail with the error (their callers get it
        from generate()) and leave the engine; every other sequence carries on."""
        try:
            yield
        except Exception as err:
            log.exception("%s failed; failing its %d sequence(s)", what, len(seqs))
            self._fail(seqs, err)

    def _fail(self, seqs: list[_Seq], err: Exception) -> None:
        for seq in seqs:
            if seq.stage is not Stage.DONE:
                self._drop(seq)
                seq.emit(err)

    def _fail_all(self, err: Exception) -> None:
        """Fail every sequence the engine holds and empty every list without touching the cache:
        the last resort, for a failure no pass could pin on its own sequences, and for close."""
        with self._cond:
            stranded, self._incoming = self._incoming, []
        for seq in dict.fromkeys([*stranded, *self._prefilling, *self._running]):
            if seq.stage is not Stage.DONE:
                self._release(seq)
                seq.stage = Stage.DONE
                seq.emit(err)
        self._prefilling.clear()
        self._clear_running()

    def _clear_running(self) -> None:
        self._batch = _Batch()

    def _start(self, seq: _Seq) -> None:
        """seq's prompt is in the running batch's cache: from waiting to running."""
        self._prefilling.remove(seq)
        seq.stage = Stage.RUNNING

    def _drop(self, seq: _Seq) -> None:
        """Take seq out of the engine for good: finished, aborted or failed."""
        self._remove(seq)
        self._release(seq)
        seq.stage = Stage.DONE

    def _remove(self, seq: _Seq) -> None:
        # by where seq is found, not by its stage: a pass may fail half-way through moving it
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq in self._batch.seqs:
            self._vacate(self._batch.seqs.index(seq))

    def _release(self, seq: _Seq) -> None:
        """Return seq's KV reservation to the budget (once)."""
        with self._cond:
            self._reserved -= seq.reserved
            seq.reserved = 0

    def _drop_aborted(self) -> None:
        for seq in [s for s in dict.fromkeys([*self._prefilling, *self._running]) if s.aborted]:
            self._drop(seq)

    # -- prefill, sampling and the padded batch ------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
        with varying_shape_attention(self.device):
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache},
                             **kwargs)
        return out.logits[:, -1].float()

    def _chunked(self, seq: _Seq) -> bool:
        """Whether seq's prompt is prefilled alone, a chunk per iteration."""
        return bool(seq.prefilled) or len(seq.prompt_ids) > self.prefill_chunk

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens this iteration, oldest request first. Prompts that
        fit whole are prefilled together in one left-padded forward pass; a longer one is
        prefilled alone, a chunk per iteration, so the running batch keeps decoding meanwhile."""
        room = self.max_batch - len(self._batch.live)
        if not self._prefilling or room <= 0:
            return
        head = self._prefilling[0]
        chunked = self._chunked(head)
        seqs = [head] if chunked else self._take_group(room)
        joining = None
        with self._isolated("prefill", seqs):
            joining = self._prefill_chunk(head) if chunked else self._prefill_group(seqs)
        if joining:
            # joining re-lays the shared cache: if that fails part-way, the cache no longer
            # matches the running sequences either
            with self._isolated("joining the running batch", [*joining.seqs, *self._batch.live]):
                self._join(joining)

    def _take_group(self, room: int) -> list[_Seq]:
        """The oldest waiting prompts that fit one pass: at most `room` of them, none begun,
        `prefill_chunk` tokens in all. They stay waiting until their pass is done."""
        group, budget = [], self.prefill_chunk
        for seq in self._prefilling:
            if len(group) == room or seq.prefilled or len(seq.prompt_ids) > budget:
                break
            group.append(seq)
            budget -= len(seq.prompt_ids)
        return group

    def _prefill_chunk(self, seq: _Seq) -> _Joining | None:
        from transformers import DynamicCache

        if seq.cache is None:
            seq.cache = DynamicCache(config=self.model.config)
            if seq.prefix is not None:
                (length, layers), seq.prefix = seq.prefix, None
                for index, (keys, values) in enumerate(layers):
                    seq.cache.update(keys[:, :, :length].to(self.device), values[:, :, :length].to(self.device), index)
        chunk = seq.prompt_ids[seq.prefilled : seq.prefilled + self.prefill_chunk]
        logits = self._forward(torch.tensor([chunk], device=self.device), seq.cache)
        seq.prefilled += len(chunk)
        if seq.prefilled < len(seq.prompt_ids):
            return None
        cache, seq.cache = seq.cache, None
        return self._admit([seq], cache, [0], logits)

    def _prefill_group(self, group: list[_Seq]) -> _Joining | None:
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in group)
        pads = [width - len(s.prompt_ids) for s in group]
        input_ids = torch.tensor([[0] * p + s.prompt_ids for s, p in zip(group, pads)], device=self.device)
        pad_t = torch.tensor(pads, device=self.device)[:, None]
        columns = torch.arange(width, device=self.device)[None, :]
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            input_ids, cache, attention_mask=(columns >= pad_t).long(), position_ids=(columns - pad_t).clamp(min=0)
        )
        for seq in group:
            seq.prefilled = len(seq.prompt_ids)
        return self._admit(group, cache, pads, logits)

    def _admit(self, seqs: list[_Seq], cache, pads: list[int], logits: torch.Tensor) -> _Joining | None:
        """Sample the first token of freshly prefilled sequences; the unfinished ones are ready
        to join the running batch (their rows of `cache`)."""
        done = self._sample_rows(seqs, logits)
        for seq, finished in zip(seqs, done):
            if finished:
                self._drop(seq)
        keep = [row for row, finished in enumerate(done) if not finished]
        if not keep:
            return None
        if len(keep) < len(seqs):
            index = torch.tensor(keep, device=self.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        return _Joining([seqs[r] for r in keep], cache, [pads[r] for r in keep])

    def _sample_rows(self, seqs: list[_Seq | None], logits: torch.Tensor) -> list[bool]:
        """Sample each sequence's next token from its row of logits (None: a row to skip) and hand
        it over; True where that sequence is done. Plain greedy rows share one argmax, so a
        batch costs one device sync, not one per row."""
        plain = [i for i, s in enumerate(seqs) if s is not None and s.plain_greedy]
        tokens = dict(zip(plain, logits[plain].argmax(-1).tolist())) if plain else {}
        done = [seq is not None and self._next_token(seq, logits[i], tokens.get(i)) for i, seq in enumerate(seqs)]
        self._deliveries.flush()  # the tokens leave now, before any re-layout of the cache after them
        return done

    def _next_token(self, seq: _Seq, logits: torch.Tensor, token: int | None) -> bool:
        """Sample seq's next token (unless already picked) and hand it over. True when seq is
        done: finished, or failed alone (its caller gets the error, the batch goes on)."""
        try:
            if token is None:
                token = pick_token(logits, seq.sampling, seq.seen, seq.output_counts, seq.generated, seq.generator)
            return self._emit(seq, token)
        except Exception as err:
            log.exception("sampling failed for one sequence")
            self._release(seq)
            seq.emit(err)
            return True

    def _emit(self, seq: _Seq, token: int) -> bool:
        seq.generated += 1
        seq.last_token = token
        seq.output_ids.append(token)
        if seq.output_counts is not None:
            seq.output_counts[token] += 1
        if seq.seen is not None:
            seq.seen = torch.unique(torch.cat([seq.seen, seq.seen.new_tensor([token])]))
        finish = None
        if token in seq.sampling.stop_token_ids:
            finish = "stop"
        elif seq.generated >= seq.sampling.max_tokens:
            finish = "length"
        if finish is not None:
            self._release(seq)  # before the last event: its receiver may admit the next request at once
        if not seq.aborted:
            seq.emit(TokenEvent(token, finish))
        return finish is not None

    def _join(self, joining: _Joining) -> None:
        """Add prefilled sequences (rows of their own left-padded cache) to the running batch:
        into holes in place where they fit, by re-laying the batch otherwise."""
        seqs, cache, pads = joining
        if not self._batch.seqs:
            self._batch = _Batch(seqs=list(seqs), pads=list(pads), cache=cache)
            for seq in seqs:
                self._start(seq)
        else:
            rest = self._fill_holes(joining)
            if rest:
                self._append_rows(joining, rest)
        self.max_running = max(self.max_running, len(self._batch.live))

    def _fill_holes(self, joining: _Joining) -> list[int]:
        """Write joining sequences into holes they fit, in place; the rows of `joining` left over."""
        batch, rest = self._batch, []
        own = joining.cache.layers[0].keys.shape[2]
        holes = batch.holes
        for row, (seq, pad) in enumerate(zip(joining.seqs, joining.pads)):
            length = own - pad
            if holes and length <= batch.width:
                hole = holes.pop(0)
                batch.write_row(hole, joining.cache, row, length)
                batch.seqs[hole], batch.pads[hole] = seq, batch.width - length
                self._start(seq)
                self.holes_filled += 1
            else:
                rest.append(row)
        if not batch.holes:
            batch.holes_since = None
        return rest

    def _append_rows(self, joining: _Joining, rows: list[int]) -> None:
        """Re-lay the batch with `rows` of `joining` added below, padded to a common width."""
        batch, cache = self._batch, joining.cache
        own = cache.layers[0].keys.shape[2]
        index = torch.tensor(rows, device=self.device)
        width = batch.width
        target = max(width, own)
        if target > width:
            batch.relayout(lambda t: _pad_left(t, target - width))
            batch.pads = [p + target - width for p in batch.pads]
        for mine, theirs in zip(batch.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, _pad_left(theirs.keys.index_select(0, index), target - own)])
            mine.values = torch.cat([mine.values, _pad_left(theirs.values.index_select(0, index), target - own)])
        batch.seqs.extend(joining.seqs[r] for r in rows)
        batch.pads.extend(joining.pads[r] + target - own for r in rows)
        for r in rows:
            self._start(joining.seqs[r])

    def _vacate(self, row: int) -> None:
        """Leave a hole where a sequence was; an empty batch starts afresh."""
        batch = self._batch
        batch.seqs[row] = None
        if not batch.live:
            self._batch = _Batch()
        elif batch.holes_since is None:
            batch.holes_since = self.steps

    def _leave(self, rows: list[int]) -> None:
        """Finished sequences leave holes (their KV kept in the prefix cache, as far as the budget
        allows); compact once holes wait too long."""
        batch = self._batch
        for row in rows:
            seq, pad = batch.seqs[row], batch.pads[row]

            def copy_kv(n: int, row=row, pad=pad) -> list | None:
                if batch.width - pad != n:
                    return None  # not the columns it should hold: keep nothing
                return [(layer.keys[row : row + 1, :, pad:].clone(), layer.values[row : row + 1, :, pad:].clone())
                        for layer in batch.cache.layers]

            self._keep_finished(seq, copy_kv)
            self._drop(seq)
        if self._batch.live:
            self._compact_if_stale()

    def _compact_if_stale(self) -> None:
        batch = self._batch
        holes = batch.holes
        stale = batch.holes_since is not None and self.steps - batch.holes_since >= HOLE_PATIENCE
        if holes and (stale or 2 * len(holes) > len(batch.seqs)):
            keep = [i for i, s in enumerate(batch.seqs) if s is not None]
            index = torch.tensor(keep, device=self.device)
            batch.relayout(lambda t: t.index_select(0, index))
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.pads = [batch.pads[i] for i in keep]
            batch.holes_since = None
        trim = min(p for p, s in zip(batch.pads, batch.seqs) if s is not None)
        if trim:
            batch.relayout(lambda t: t[:, :, trim:])
            batch.pads = [p - trim for p in batch.pads]

    def _decode(self) -> None:
        batch = self._batch
        width = batch.width
        # a hole attends only to its own new column; its output is ignored
        pads = torch.tensor([p if s is not None else width for p, s in zip(batch.pads, batch.seqs)],
                            device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        attention_mask = (columns[None, :] >= pads[:, None]).long()
        position_ids = (width - pads)[:, None]
        input_ids = torch.tensor([[s.last_token if s is not None else 0] for s in batch.seqs], device=self.device)
        logits = self._forward(input_ids, batch.cache, attention_mask=attention_mask, position_ids=position_ids)
        self.steps += 1
        batch.pads = [p if s is not None else width + 1 for p, s in zip(batch.pads, batch.seqs)]
        done = [row for row, finished in enumerate(self._sample_rows(batch.seqs, logits)) if finished]
        if done:
            self._leave(done)
        elif batch.holes:
            self._compact_if_stale()


def varying_shape_attention(device: str):
    """The attention kernels for passes whose shapes change from call to call (prefill, and every
    step of the padded engine): on CUDA, torch's SDPA minus its cuDNN backend, which builds a plan
    for each new shape (measured on an H200: a first-token latency of 79 ms median and 1.1 s worst
    over prompts of varied length, against 18 and 41 ms without it). CUDA graphs, whose shapes
    are fixed, keep cuDNN: it is the fastest decode kernel there."""
    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _Deliveries:
    """What the engine thread emits during a pass, handed to the event loops once the pass has
    sampled it, in one thread-safe call per loop, not one per token: waking a loop from another
    thread is a system call, and on a GPU a pass emits a token for every running sequence."""

    def __init__(self):
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    def to(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[object], None]:
        """An emit for the engine thread: its items reach `queue` at the next `flush`."""

        def emit(item: object) -> None:
            self._pending.setdefault(loop, []).append((queue, item))

        return emit

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            if loop.is_closed():  # its callers are gone: nothing waits for these
                continue
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # closed between the check and the call
                pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)

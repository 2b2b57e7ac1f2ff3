"""Continuous batching over a preallocated KV cache with one row ("slot") per sequence, the
engine the transformers backend runs on CUDA (and on CPU with `--engine slots`).

The padded engine (`engine.py`) re-lays its cache as sequences join and leave, and every decode
step has a new shape. Here every tensor a step touches lives at a fixed address:

- `SlotCache` holds, per layer, keys and values of shape [slots, kv_heads, slot_length + 1,
  head_dim]. Sequence i's token at position p sits in row `seq.row`, column p. The last column
  is scratch: rows that are not decoding this step (still prefilling, or beyond the batch) write
  their throwaway key there. The rows in use are always 0..n-1; a sequence that leaves hands its
  row to the last one (one row copy), so the batch never has holes.
- A decode step reads `[n, kv_heads, L, head_dim]` views of the cache, with L the longest
  position in the batch, and an additive mask from each row's position; new keys are written
  with one `index_copy_` per layer.
- On CUDA, decode steps run as CUDA graphs for bucketed batch sizes and attention lengths
  (`batch_buckets`, `length_buckets`): every batch size at the shortest length is captured at
  start, longer lengths when first needed. A step copies its token ids and positions into static
  buffers and replays, so the Python and kernel-launch cost of the model's forward is paid once
  per shape, not once per step. Prefill stays eager: it is one pass per prompt chunk, run with
  attention kernels that need no per-shape setup (`varying_shape_attention`).

Scheduling, sampling, failure isolation and the KV budget are the padded engine's
(`BatchEngine`); each request's prompt + max_tokens must also fit one slot. A row belongs to one
sequence, so here a failure to join the running batch touches no other sequence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .engine import BatchEngine, Stage, _Seq, varying_shape_attention

log = logging.getLogger(__name__)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """Rows first..first+count-1 write columns from `start` and attend to columns 0..length-1."""

    first: int
    count: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """Rows 0..n-1 write one column each (flat positions `index`) and attend to 0..length-1."""

    n: int
    index: torch.Tensor
    length: int


class SlotCache:
    """A transformers-compatible KV cache over fixed per-sequence rows (see the module docstring).

    Before each forward pass the engine says what it is for: `for_prefill` (a run of rows, each
    writing the same columns) or `for_decode` (the first n rows, each writing one column of its
    own). `update`, which the model's attention layers call, writes the new keys and values and
    returns views of the cache that the attention reads."""

    def __init__(self, config, slots: int, slot_length: int, dtype: torch.dtype, device: str):
        text = _text_config(config)
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_layers = text.num_hidden_layers
        self.slots, self.slot_length = slots, slot_length
        self.scratch = slot_length  # the column nobody reads
        shape = (slots, self.kv_heads, slot_length + 1, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        # flat index of (row, head, column 0) in a [slots * kv_heads * (slot_length + 1), head_dim] view
        rows = torch.arange(slots, device=device)[:, None] * self.kv_heads + torch.arange(self.kv_heads, device=device)
        self._base = rows * (slot_length + 1)
        self._plan: PrefillPlan | DecodePlan | None = None  # what the next forward pass does

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # -- transformers' Cache interface, as far as decoder-only models use it --------------------

    is_compileable = False

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._planned().length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        plan = self._planned()
        if isinstance(plan, DecodePlan):
            flat = (-1, self.head_dim)
            keys.view(flat).index_copy_(0, plan.index, key_states.reshape(flat))
            values.view(flat).index_copy_(0, plan.index, value_states.reshape(flat))
            return keys[:plan.n, :, :plan.length], values[:plan.n, :, :plan.length]
        rows, width = slice(plan.first, plan.first + plan.count), key_states.shape[2]
        keys[rows, :, plan.start : plan.start + width] = key_states
        values[rows, :, plan.start : plan.start + width] = value_states
        return keys[rows, :, :plan.length], values[rows, :, :plan.length]

    def _planned(self) -> PrefillPlan | DecodePlan:
        if self._plan is None:
            raise RuntimeError("SlotCache used outside a planned forward pass")
        return self._plan

    # -- planning ---------------------------------------------------------------------------------

    def for_prefill(self, first: int, count: int, start: int, width: int) -> None:
        """Rows first..first+count-1 write columns start..start+width-1 and attend to 0..start+width-1."""
        self._plan = PrefillPlan(first, count, start, start + width)

    def for_decode(self, n: int, write: torch.Tensor, length: int) -> None:
        """Rows 0..n-1 write one column each (`write`, shape [n]) and attend to columns 0..length-1."""
        index = (self._base[:n] + write[:, None]).reshape(-1)
        self._plan = DecodePlan(n, index, length)

    def move_row(self, source: int, target: int, length: int) -> None:
        for t in (*self.keys, *self.values):
            t[target, :, :length] = t[source, :, :length]

    def copy_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the first `length` columns of a row, per layer, in host memory (the rows
        take the whole budget on the device)."""
        return [(k[row : row + 1, :, :length].to("cpu", copy=True), v[row : row + 1, :, :length].to("cpu", copy=True))
                for k, v in zip(self.keys, self.values)]

    def write_prefix(self, row: int, length: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the first `length` columns of a row from `copy_row`'s layers."""
        for k, v, (keys, values) in zip(self.keys, self.values, layers):
            k[row, :, :length] = keys[0, :, :length]
            v[row, :, :length] = values[0, :, :length]


def batch_buckets(limit: int) -> list[int]:
    """Batch sizes to capture decode graphs for: 1, 2, 4, then multiples of 8, and `limit`."""
    sizes = [s for s in (1, 2, 4) if s < limit] + list(range(8, limit, 8))
    return sizes + [limit]


def length_buckets(limit: int) -> list[int]:
    """Attention lengths to capture decode graphs for: multiples of 256 up to 1024, then growing by
    half each time (1536, 2048, 3072, ...), and `limit`. A step reads at most half again the
    columns it needs, with a handful of graphs per batch size even for long contexts."""
    sizes, size = [], 256
    while size < limit:
        sizes.append(size)
        size = size + 256 if size < 1024 else size * 3 // 2 // 256 * 256
    return sizes + [limit]


class SlotEngine(BatchEngine):
    """Continuous batching over `SlotCache`, with CUDA graphs for decode on CUDA; see the module
    docstring. Same interface and guarantees as `BatchEngine`."""

    def __init__(self, model, vocab_size: int, device: str, *, max_batch: int, kv_budget_tokens: int,
                 slot_length: int, prefill_chunk: int = 512, cache_arg: str = "past_key_values",
                 cuda_graphs: bool | None = None, prefix_cache: bool = True, prefix_cache_tokens: int | None = None):
        if slot_length < 2:
            raise ValueError("slot_length must be at least 2")
        self.slot_length = slot_length
        self.cache = SlotCache(model.config, max_batch, slot_length, model.dtype, device)
        self.rows: list[_Seq] = []  # row i holds rows[i]: prefilling or decoding
        self.cuda_graphs = str(device).startswith("cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not str(device).startswith("cuda"):
            raise ValueError("CUDA graphs need a CUDA device")
        self._mask_min = torch.finfo(model.dtype).min
        self._columns = torch.arange(slot_length, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_replays = 0  # decode steps served by a captured graph (for tests and metrics)
        self.rows_moved = 0  # rows handed to another sequence when one left from the middle
        if self.cuda_graphs:
            self._batch_sizes = batch_buckets(max_batch)
            self._lengths = length_buckets(slot_length)
            # static inputs: token ids, positions and write columns of every row
            self._static = torch.zeros(3, max_batch, dtype=torch.long, device=device)
            self._staging = torch.zeros(3, max_batch, dtype=torch.long).pin_memory()
            self._pool = torch.cuda.graph_pool_handle()
        super().__init__(model, vocab_size, device, max_batch=max_batch, kv_budget_tokens=kv_budget_tokens,
                         prefill_chunk=prefill_chunk, cache_arg=cache_arg, prefix_cache=prefix_cache,
                         prefix_cache_tokens=prefix_cache_tokens)
        log.info("slot KV cache: %d rows x %d tokens, %.1f MiB%s", max_batch, slot_length,
                 self.cache.bytes / 2**20, ", CUDA graphs" if self.cuda_graphs else "")
        try:
            self._warm_up()
        except BaseException:
            self.close()
            raise

    @property
    def max_request_tokens(self) -> int:
        return min(self.kv_budget_tokens, self.slot_length)

    def _warm_up(self) -> None:
        """Capture the decode graphs of every batch size at the shortest attention length before
        serving (on the constructing thread, while the engine thread has nothing to do yet), so
        that the first requests do not pay for captures; longer lengths are captured when first
        needed."""
        if not self.cuda_graphs:
            return
        started = time.perf_counter()
        with torch.inference_mode():
            for size in reversed(self._batch_sizes):  # the largest first: the pool is sized once
                self._capture(size, self._lengths[0])
        log.info("captured %d decode graphs in %.1f s", len(self._graphs), time.perf_counter() - started)

    # -- the engine thread -----------------------------------------------------------------------

    @property
    def _running(self) -> list[_Seq]:
        """Every sequence holding a row: decoding, or prefilling its prompt in chunks."""
        return self.rows

    def _clear_running(self) -> None:
        for seq in self.rows:
            seq.row = -1
        self.rows = []

    def _remove(self, seq: _Seq) -> None:
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.row >= 0:
            self._free_row(seq)

    def _take_row(self, seq: _Seq) -> None:
        seq.row = len(self.rows)
        self.rows.append(seq)
        self.max_running = max(self.max_running, len(self.rows))

    def _free_row(self, seq: _Seq) -> None:
        """Give seq's row to the last row's sequence, so rows in use stay 0..n-1."""
        last = self.rows.pop()
        if last is not seq:
            self.cache.move_row(last.row, seq.row, len(last.prompt_ids) + last.generated)
            last.row = seq.row
            self.rows[seq.row] = last
            self.rows_moved += 1
        seq.row = -1

    def _prefill(self) -> None:
        """Like the padded engine: short prompts together (right-padded into their new rows), a
        long one alone, a chunk per step. A prompt's row is taken when its prefill starts."""
        seqs = self._next_prefill()
        if seqs:
            # the last rows first: freeing them moves no other sequence's row
            with self._isolated("prefill", seqs[::-1]):
                self._prefill_rows(seqs)

    def _next_prefill(self) -> list[_Seq]:
        """The sequences to prefill this step, each given a row: the head alone if its prompt is
        prefilled in chunks, else a group of short prompts; none while no row is free."""
        if not self._prefilling:
            return []
        head = self._prefilling[0]
        room = self.max_batch - len(self.rows)
        if self._chunked(head):
            seqs = [head] if head.row >= 0 or room else []
        else:
            seqs = self._take_group(room)
        for seq in seqs:
            if seq.row < 0:
                self._take_row(seq)
        return seqs

    def _prefill_rows(self, seqs: list[_Seq]) -> None:
        """One prefill pass: the next chunk of one long prompt, or several whole short ones. A
        sequence whose prompt is done samples its first token and starts decoding."""
        start = seqs[0].prefilled  # 0 for a group
        for seq in seqs:
            if seq.prefix is not None:  # its prefill starts after a cached prefix: put it in its row
                (length, layers), seq.prefix = seq.prefix, None
                self.cache.write_prefix(seq.row, length, layers)
        chunks = [s.prompt_ids[start : start + self.prefill_chunk] for s in seqs]
        logits = self._prefill_pass(seqs, chunks, start)
        for seq, chunk in zip(seqs, chunks):
            seq.prefilled += len(chunk)
        if seqs[0].prefilled == len(seqs[0].prompt_ids):
            self._first_tokens(seqs, logits)

    def _prefill_pass(self, seqs: list[_Seq], chunks: list[list[int]], start: int) -> torch.Tensor:
        """One forward pass over `chunks` (one per sequence, in consecutive rows, all starting at
        column `start`); returns the logits at each chunk's last token."""
        width = max(len(c) for c in chunks)
        input_ids = torch.tensor([c + [0] * (width - len(c)) for c in chunks], device=self.device)
        positions = torch.arange(start, start + width, device=self.device)
        # causal over the prefix and the chunk; padding after a short prompt is never attended
        visible = self._columns[: start + width][None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=self.model.dtype, device=self.device)
        mask.masked_fill_(~visible, self._mask_min)
        last = [len(c) - 1 for c in chunks]
        keep = sorted(set(last))
        self.cache.for_prefill(seqs[0].row, len(seqs), start, width)
        with varying_shape_attention(self.device):
            out = self.model(
                input_ids=input_ids, position_ids=positions[None, :].expand(len(chunks), -1),
                attention_mask=mask[None, None].expand(len(chunks), 1, -1, -1), use_cache=True,
                logits_to_keep=torch.tensor(keep, device=self.device), **{self._cache_arg: self.cache},
            )
        index = torch.tensor([keep.index(i) for i in last], device=self.device)
        return out.logits[torch.arange(len(chunks), device=self.device), index].float()

    def _first_tokens(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        for seq, done in zip(seqs, self._sample_rows(seqs, logits)):
            if done:
                self._drop(seq)
            else:
                self._start(seq)

    def _decode(self) -> None:
        n = len(self.rows)
        live = [s if s.stage is Stage.RUNNING else None for s in self.rows]
        ids = [s.last_token if s else 0 for s in live]
        # the token fed now sits at position prompt + generated - 1
        positions = [len(s.prompt_ids) + s.generated - 1 if s else 0 for s in live]
        writes = [p if s else self.cache.scratch for p, s in zip(positions, live)]
        length = max(positions) + 1
        if self.cuda_graphs:
            logits = self._replay(n, length, ids, positions, writes)
        else:
            with varying_shape_attention(self.device):
                logits = self._decode_pass(n, length, torch.tensor([ids, positions, writes], device=self.device))
        self.steps += 1
        for seq in [s for s, done in zip(live, self._sample_rows(live, logits)) if done]:
            self._keep_finished(seq, lambda n, row=seq.row: self.cache.copy_row(row, n))
            self._drop(seq)

    def _decode_pass(self, n: int, length: int, inputs: torch.Tensor) -> torch.Tensor:
        """The decode forward over rows 0..n-1; `inputs` is [3, n]: token ids, positions, write
        columns. Eager on CPU; captured into a graph on CUDA."""
        ids, positions, writes = inputs[0, :n], inputs[1, :n], inputs[2, :n]
        mask = torch.zeros((n, length), dtype=self.model.dtype, device=self.device)
        mask.masked_fill_(self._columns[:length][None, :] > positions[:, None], self._mask_min)
        self.cache.for_decode(n, writes, length)
        out = self.model(input_ids=ids[:, None], position_ids=positions[:, None], attention_mask=mask[:, None, None],
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        return out.logits[:, -1].float()

    # -- CUDA graphs -------------------------------------------------------------------------------

    def _replay(self, n: int, length: int, ids: list[int], positions: list[int], writes: list[int]) -> torch.Tensor:
        size = next(b for b in self._batch_sizes if b >= n)
        span = next(L for L in self._lengths if L >= length)
        pad = size - n  # rows past the batch: token 0 at position 0, written to scratch
        staging = self._staging[:, :size]
        staging[0] = torch.tensor(ids + [0] * pad)
        staging[1] = torch.tensor(positions + [0] * pad)
        staging[2] = torch.tensor(writes + [self.cache.scratch] * pad)
        self._static[:, :size].copy_(staging, non_blocking=True)
        graph, logits = self._graphs.get((size, span)) or self._capture(size, span)
        graph.replay()
        self.graph_replays += 1
        return logits[:n]

    def _capture(self, size: int, span: int):
        """Capture the decode pass for `size` rows attending to `span` columns. Warm-up passes run
        first on a side stream (as CUDA graphs require) with every row writing to scratch, so no
        sequence's cache is touched."""
        saved = self._static.clone()
        self._static[0].zero_()
        self._static[1].zero_()
        self._static[2].fill_(self.cache.scratch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_pass(size, span, self._static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._decode_pass(size, span, self._static)
        self._static.copy_(saved)
        self._graphs[(size, span)] = (graph, logits)
        log.debug("captured a decode graph for %d rows x %d columns (%d graphs)", size, span, len(self._graphs))
        return graph, logits

"""CUDA graphs for decode steps (vLLM / nano-vllm style).

A decode step (every chunk one query row) of n rows runs the graph captured at
the smallest batch size >= n: the live tensors are copied into the first n rows
of static buffers, the other rows are padding, the graph is replayed and the
first n rows of its output are returned. Embedding rows are allowed (MemGen's
weaver rows, whose input is a projected reasoner embedding): the graph's input
layer is the latent-injection kernel over a static latents buffer, which with no
embedding rows is a plain embedding gather. Anything else (prefill, catch-up
and latent chunks, more rows than the largest graph, a wider block table) runs
eagerly.

Padding rows are made harmless for the Triton kernels they meet:
  slot_mapping -1        the KV store skips the row (nothing is written)
  context_lens 1         the decode kernel attends to one key ...
  block_tables [0, -1..] ... slot 0 of block 0, which exists (any finite value)
  adapter_ids -1         no LoRA delta
  latent_index -1        a token row (embedding gather)
  input_ids / positions  whatever a live row left there (always valid indices)
Live rows copy only block_tables[:, :w]; the kernel never reads a table entry
past its context_lens, so stale entries beyond w are never read. The decode
kernel's split choice depends only on block_tables' width (static here), so one
graph serves every context length.

LoRA: the Triton backend's row grouping (device-only ops) is part of the graph.
With LoRA hooks, graphs are captured without adapter ids (the hooks return at
once: a pure reasoner decode step pays no LoRA kernels) and with a static
adapter_ids buffer (-1 in padded rows); a step picks the variant of its context.
The stacked adapters and the KV cache are baked in by address: a same-shape
weight push copies into the same tensors (layers/lora.py); new tensors are
noticed by `can_run`, which captures again before the next replay.
"""
from __future__ import annotations

import warnings

import torch

from memgen.layers.context import ForwardContext, forward_context
from memgen.layers.lora import LoraHook


def default_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then multiples of 8 up to max_batch (and max_batch itself)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sizes


class CudaGraph:
    """The default graph: torch.cuda.CUDAGraph. `capture(fn, pool)` records fn's
    kernels (fn runs once, on the capture stream); `replay()` re-launches them;
    `pool()` is the memory pool handle to share with the next capture."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn, pool) -> None:
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()

    def pool(self):
        return self.graph.pool()


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks_per_seq: int, graph_factory=None,
                 batch_sizes: list[int] | None = None, adapter_variants: bool | None = None):
        """`runner`: a ModelRunner whose KV cache is allocated. `graph_factory()`
        makes one graph object (see CudaGraph; default CudaGraph). `batch_sizes`:
        the sizes to capture (default `default_batch_sizes(max_batch)`).
        `adapter_variants`: also capture graphs that read adapter ids (default:
        when the model has LoRA hooks)."""
        if max_batch < 1 or max_blocks_per_seq < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_blocks_per_seq ({max_blocks_per_seq}) must be >= 1")
        sizes = sorted(set(batch_sizes if batch_sizes is not None else default_batch_sizes(max_batch)))
        if not sizes or sizes[0] < 1 or sizes[-1] > max_batch:
            raise ValueError(f"batch sizes {sizes} must lie in 1..max_batch={max_batch}")
        if runner.num_kv_blocks < 1:
            raise ValueError("capture CUDA graphs after runner.allocate_kv_cache()")
        self.runner, self.max_batch, self.max_blocks_per_seq = runner, max_batch, max_blocks_per_seq
        self.batch_sizes = sizes
        self.graph_factory = graph_factory or CudaGraph
        self.lora_hooks = [m.lora for m in runner.model.modules() if isinstance(getattr(m, "lora", None), LoraHook)]
        self._attn0 = runner.model.attention_layers()[0]
        self.adapter_variants = bool(self.lora_hooks) if adapter_variants is None else adapter_variants
        # n -> smallest captured size >= n (0: none)
        self._padded = [0] + [next((s for s in sizes if s >= n), 0) for n in range(1, max_batch + 1)]

        device = runner.device
        with torch.inference_mode():
            def index(n: int, fill: int) -> torch.Tensor:
                return torch.full((n,), fill, dtype=torch.int64, device=device)

            self.input_ids, self.positions = index(max_batch, 0), index(max_batch, 0)
            self.slot_mapping, self.context_lens = index(max_batch, -1), index(max_batch, 1)
            self.adapter_ids, self.latent_index = index(max_batch, -1), index(max_batch, -1)
            self.latents = torch.zeros(max_batch, runner.model.hidden_size, dtype=runner.dtype, device=device)
            self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
            self.block_tables = torch.full((max_batch, max_blocks_per_seq), -1, dtype=torch.int64, device=device)
            self.block_tables[:, 0] = 0
            self.output = torch.zeros(max_batch, runner.model.hidden_size, dtype=runner.dtype, device=device)
        self._dirty = 0        # rows [0, _dirty) may hold live values; the rest are padding
        self._had_latents = False   # the last replay's latent_index rows may be >= 0
        self.graphs: dict[tuple[int, bool], object] = {}   # (batch size, with adapter ids) -> graph
        self.num_replays = 0
        self._snapshot = None

    # ---- capture -----------------------------------------------------------------------
    def _forward_fn(self, bs: int, with_adapters: bool):
        """The captured callable: the model over the first bs static rows, into output[:bs].
        It builds its context each call, so that nothing (e.g. the LoRA grouping in
        ctx.lora_meta) is cached outside the graph."""
        runner = self.runner
        backend = runner.attn_backend

        def fn() -> None:
            ctx = ForwardContext(
                cu_seqlens_q=self.cu_seqlens_q[:bs + 1], context_lens=self.context_lens[:bs],
                slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                max_seqlen_q=1, max_seqlen_k=self.max_blocks_per_seq * runner.block_size,
                block_size=runner.block_size, adapter_ids=self.adapter_ids[:bs] if with_adapters else None,
                backend=backend)
            ctx.attn_metadata = backend.prepare(ctx)
            with forward_context(ctx):
                hidden = runner.model(self.input_ids[:bs], self.positions[:bs], self.latents[:bs],
                                      self.latent_index[:bs])
            self.output[:bs].copy_(hidden)

        return fn

    def capture(self) -> None:
        """(Re)capture every size and variant, largest first, in one memory pool."""
        self.graphs.clear()
        self._reset_padding(0)
        self._had_latents = False
        variants = (False, True) if self.adapter_variants else (False,)
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):
                for with_adapters in variants:
                    fn = self._forward_fn(bs, with_adapters)
                    fn()                                    # warm-up: Triton compiles here
                    if self.runner.device.type == "cuda":
                        torch.cuda.synchronize(self.runner.device)
                    graph = self.graph_factory()
                    graph.capture(fn, pool)
                    if pool is None:
                        pool = graph.pool()
                    self.graphs[(bs, with_adapters)] = graph
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize(self.runner.device)
        self._snapshot = self._state()

    def _state(self) -> list:
        """What the graphs bake in by address and may change between steps: the
        hooks' stacked adapters, the KV cache (references: no id() reuse)."""
        return [h._stacks for h in self.lora_hooks] + [self._attn0.k_cache]

    def _stale(self) -> bool:
        return self._snapshot is None or any(now is not then for now, then in zip(self._state(), self._snapshot))

    # ---- replay ------------------------------------------------------------------------
    def can_run(self, inp) -> bool:
        """A decode step that fits a captured graph (host-side checks only)."""
        ctx = inp.context
        n = inp.input_ids.shape[0]
        if ctx.max_seqlen_q != 1 or n == 0 or n > self.max_batch or ctx.num_chunks != n \
                or ctx.block_tables.shape[1] > self.max_blocks_per_seq:
            return False
        bs = self._padded[n]
        if not bs or (bs, ctx.adapter_ids is not None) not in self.graphs:
            return False
        if self._stale():
            try:
                self.capture()
            except Exception as e:  # e.g. out of memory after new weights: run eagerly from now on
                warnings.warn(f"CUDA graph recapture failed ({type(e).__name__}: {e}); decode steps run "
                              "eagerly from now on", RuntimeWarning, stacklevel=2)
                self.graphs.clear()
                return False
        return True

    def _reset_padding(self, n: int) -> None:
        """Rows [n, _dirty) back to padding; afterwards rows >= n are padding."""
        if self._dirty > n:
            rows = slice(n, self._dirty)
            self.slot_mapping[rows] = -1
            self.context_lens[rows] = 1
            self.block_tables[rows, 0] = 0
            self.adapter_ids[rows] = -1
            self.latent_index[rows] = -1
        self._dirty = n

    def run(self, inp) -> torch.Tensor:
        """Replay the step `can_run` accepted; the post-norm hidden states [n, H], a copy:
        the latent runtime keeps hidden rows across steps (a waiting request's reasoner row,
        a stream's last_hidden), which the next replay would overwrite in a view."""
        ctx = inp.context
        n, w = inp.input_ids.shape[0], ctx.block_tables.shape[1]
        with_adapters = ctx.adapter_ids is not None
        graph = self.graphs[(self._padded[n], with_adapters)]
        self._reset_padding(n)
        self.input_ids[:n].copy_(inp.input_ids)
        self.positions[:n].copy_(inp.positions)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.context_lens[:n].copy_(ctx.context_lens)
        self.block_tables[:n, :w].copy_(ctx.block_tables)
        if with_adapters:
            self.adapter_ids[:n].copy_(ctx.adapter_ids)
        if inp.latents is not None:
            self.latents[:inp.latents.shape[0]].copy_(inp.latents)
            self.latent_index[:n].copy_(inp.latent_index)
        elif self._had_latents:
            self.latent_index[:n].fill_(-1)
        self._had_latents = inp.latents is not None
        graph.replay()
        self.num_replays += 1
        return self.output[:n].clone()


def max_blocks_per_seq(runner) -> int:
    """Block-table width the graphs hold: no context is longer than the rotary
    table (the runner's max_position), plus one block of slack."""
    return -(-runner.model.model.rotary.cos.shape[0] // runner.block_size) + 1


def build_decode_graphs(runner, config, rows_per_seq: int = 1) -> DecodeGraphs | None:
    """Captured decode graphs for `runner` (after allocate_kv_cache), or None where the
    step runs eagerly: config.enforce_eager, not CUDA, or a backend that is not
    `graph_safe` (the torch one syncs in prepare(): a capture cannot hold it).
    `rows_per_seq`: decode rows one sequence can put in this runner's step (its pool's
    number of streams); graphs go up to min(max_num_seqs * rows_per_seq,
    max_num_batched_tokens) rows."""
    if config.enforce_eager or runner.device.type != "cuda" or not getattr(runner.attn_backend, "graph_safe", False):
        return None
    max_batch = max(1, min(config.max_num_seqs * max(1, rows_per_seq), config.max_num_batched_tokens))
    try:
        graphs = DecodeGraphs(runner, max_batch, max_blocks_per_seq(runner))
        graphs.capture()
    except Exception as e:  # a capture problem must cost speed, never the run
        warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decode steps run eagerly. "
                      "Pass enforce_eager=True to skip the attempt.", RuntimeWarning, stacklevel=2)
        return None
    return graphs

"""The kernel backends of a step's hot paths, behind one protocol.

A backend has, per forward:
  prepare(ctx) -> metadata                          once per forward (ctx.attn_metadata)
  forward(q, k, v, k_cache, v_cache, ctx, scale)    store this forward's K/V, then paged attention
  inject_latents(token_ids, latent_index, embed_weight, latents) -> [N, H]
  trigger_decisions(hidden, weight, bias, temperature, uniforms) -> [B] 0/1
  add_lora(y, x, lora_a, lora_b, scaling, ctx)      stacked multi-LoRA (layers.lora's hooks)
  rms_norm, silu_and_mul, linear, tied_logits       a layer's dense ops (LayerOps: native CPU
                                                    kernels for float32/bfloat16, else torch's)
and says what it can do (callers test these, never the name):
  graph_safe   prepare() never reads device tensors on the host: CUDA graphs can capture it
  dtypes       the dtypes it computes in
q: [N, Hq, D], k/v: [N, Hk, D] (rotated), caches: [num_blocks, block_size, Hk, D].
`TorchBackend` runs everywhere (the CPU default, and float64); `TritonBackend`
runs the Triton kernels (the CUDA default). Each op's torch version lives in
`memgen.kernels.reference`, beside the checks it shares with its kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memgen.kernels.reference import (SDPAGroup, add_lora_rows, inject_latents_ref, lora_metadata, lora_rows,
                                     sdpa_attend, sdpa_groups, store_kvcache_ref, trigger_decisions_ref)
from memgen.layers import native
from memgen.layers import context
from memgen.layers.context import ForwardContext
from memgen.layers.lora import LoraHook


class LayerOps:
    """A decoder layer's dense ops, one place each decides between the native CPU kernels
    (float32 and bfloat16 CPU tensors outside autograd: engine/cpu_ops.cpp, cpu_gemm.cpp)
    and torch's ops (float64 keeps HF's op order, bit for bit; CUDA; autograd). Every
    backend has them; a layer reaches them through `layer_ops()`."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        """RMSNorm as HF computes it; with `residual`, (norm(residual + x), residual + x),
        the sum written into `residual` in place on the native path."""
        if native.rms_norm_cpu is not None and x.dim() == 2 \
                and native.fused_ok(x, weight, *(() if residual is None else (residual,))):
            out = torch.empty_like(x)
            native.rms_norm_cpu(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                                out.data_ptr(), x.shape[0], x.shape[1], eps, native.FUSED_DTYPE_CODES[x.dtype])
            return out if residual is None else (out, residual)
        if residual is None:
            return _rms_norm_torch(x, weight, eps)
        residual = residual + x
        return _rms_norm_torch(residual, weight, eps), residual

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a packed [.., 2*I] gate-up output."""
        if native.silu_and_mul_cpu is not None and x.dim() == 2 and native.fused_ok(x):
            out = x.new_empty(x.shape[0], x.shape[1] // 2)
            native.silu_and_mul_cpu(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1] // 2,
                                    native.FUSED_DTYPE_CODES[x.dtype])
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def linear(layer, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b of a layers.linear.Linear: the native kernel on its packed panels
        (float32 or bfloat16), else F.linear."""
        if not layer.packed:
            return F.linear(x, layer.weight, layer.bias)
        w = layer.weight
        if x.dim() != 2 or x.dtype != w.dtype or x.shape[1] != layer.in_features or torch.is_grad_enabled():
            raise RuntimeError(f"a packed Linear takes {str(w.dtype).replace('torch.', '')} [N, {layer.in_features}] "
                               f"inputs outside autograd, got {str(x.dtype).replace('torch.', '')} {tuple(x.shape)}")
        x = x.contiguous()
        y = x.new_empty(x.shape[0], layer.out_features)
        run = native.packed_linear if w.dtype == torch.float32 else native.packed_linear_bf16
        run(x.data_ptr(), x.shape[0], layer.in_features, w.data_ptr(), layer.out_features,
            0 if layer.bias is None else layer.bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y

    def decoder_layers(self, layers, x, rope):
        """All decoder layers in one native call, (output, residual); None: op by op."""
        return None

    @staticmethod
    def tied_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden @ weight^T for a tied LM head kept as an embedding (weight: [V, H]
        row-major; on the CPU in float32 / bfloat16 the head is a packed TiedEmbedding)."""
        if hidden.shape[0] >= 8 and hidden.device.type == "cpu":
            # W @ x^T: a tall GEMM, ~1.3x faster on CPU than x @ W^T for 8+ rows
            return torch.mm(weight, hidden.t()).t()
        return F.linear(hidden, weight)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    if dtype == torch.float64:   # HF's own ops, one by one: float64 parity runs match it bit for bit
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:                        # one fused op (the same math in float32, fewer dispatches)
        h = F.rms_norm(h, (h.shape[-1],), eps=eps)
    return weight * h.to(dtype)


@dataclass
class SDPAMetadata:
    groups: list[SDPAGroup]
    store_index: torch.Tensor | slice | None  # rows whose K/V are stored (slice(None): all rows)
    native: tuple | None = None       # the native CPU kernel's (slot_mapping, cu_seqlens_q, context_lens,
                                      # block_tables), contiguous: it attends instead of the groups
    sdpa: SDPAMetadata | None = None  # native, for a dtype the kernel does not take: SDPA's, made on first use


class TorchBackend(LayerOps):
    """Torch on any device and dtype: attention on the CPU by the native paged
    kernel (engine/cpu_attention.cpp: K/V read straight from the blocks, no padding),
    elsewhere by SDPA over each group of chunks gathered into a padded batch; the rest
    the kernels' torch versions (LoRA in PEFT's order of operations). `cpu_attention=
    False` keeps SDPA on the CPU too."""
    name = "torch"
    graph_safe = False      # prepare() reads lengths on the host (syncs, data-dependent shapes)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    inject_latents = staticmethod(inject_latents_ref)
    trigger_decisions = staticmethod(trigger_decisions_ref)

    def __init__(self, cpu_attention: bool = True):
        self._native = native.paged_attention_cpu if cpu_attention else None

    def reads_only_written_slots(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True where attention reads no KV slot but those written before (the native CPU
        kernel): the cache then needs no zero fill."""
        return self._native is not None and device.type == "cpu" and dtype in native.DTYPE_CODES

    def prepare(self, ctx: ForwardContext) -> SDPAMetadata:
        if self._native is not None and ctx.slot_mapping.device.type == "cpu":
            # the native call stores K/V itself (slot -1 skipped): nothing else to prepare
            return SDPAMetadata([], None, native=tuple(t.contiguous() for t in (
                ctx.slot_mapping, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables)))
        store_index = slice(None)
        if bool((ctx.slot_mapping < 0).any()):
            store_index = (ctx.slot_mapping >= 0).nonzero().squeeze(1)
        groups = sdpa_groups(ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, ctx.block_size,
                             ctx.max_seqlen_q, ctx.max_seqlen_k)
        return SDPAMetadata(groups, store_index)

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        meta: SDPAMetadata = ctx.attn_metadata
        if meta.native and q.dtype in native.DTYPE_CODES:
            return self._attend_native(q, k, v, k_cache, v_cache, ctx, scale)
        if meta.native:   # a dtype the native kernel does not take (float16): SDPA, the metadata's own
            meta.sdpa = meta.sdpa or TorchBackend(cpu_attention=False).prepare(ctx)
            meta = meta.sdpa
        store_kvcache_ref(k, v, k_cache, v_cache, ctx.slot_mapping, meta.store_index, check=False)
        return sdpa_attend(q, k_cache, v_cache, meta.groups, scale)

    @staticmethod
    def add_lora(y, x, lora_a, lora_b, scaling, ctx: ForwardContext) -> None:
        """y += each row's adapter delta, in place (y may be a column slice); the rows'
        grouping by adapter is computed once per forward and shared by every layer."""
        # the stacks were checked at install: the per-layer call skips add_lora_ref's checks
        rows = ctx.lora_meta.get(lora_a.shape[0])
        if rows is None:
            rows = ctx.lora_meta[lora_a.shape[0]] = lora_rows(lora_metadata(ctx.adapter_ids, lora_a.shape[0]))
        add_lora_rows(y, x, lora_a, lora_b, scaling, rows)

    def fuses_rope(self, x: torch.Tensor) -> bool:
        """Whether attend_rotating applies the rotary embedding inside the native call
        (float32 and bfloat16 on the CPU, rotated in float): q and k then arrive unrotated,
        as views of the packed QKV."""
        return self._native is not None and x.device.type == "cpu" and x.dtype in native.FUSED_DTYPE_CODES

    # a CPU forward runs its plain decoder layers in one native call (decoder_layers); False:
    # op by op (the tests compare the two, bit for bit)
    fused_layers = True

    def decoder_layers(self, layers, x, rope):
        """A DecoderModel's layers in one native call (cpu_ops.h decoder_layers_cpu: each layer's
        kernels in its ops' order, so the same bits) where every layer fuses (_LayerPlan); rope:
        (cos, sin) float32 [N, D]. Returns (out, residual), or None where it does not apply."""
        if not self.fused_layers or native.decoder_layers_cpu is None or torch.is_grad_enabled() \
                or x.dtype not in native.FUSED_DTYPE_CODES or x.dim() != 2 or not x.is_contiguous():
            return None
        ctx = context._CONTEXT
        meta = None if ctx is None else ctx.attn_metadata
        if not isinstance(meta, SDPAMetadata) or meta.native is None:
            return None
        plan = layers.__dict__.get("_native_plan")
        if plan is None or plan.stale(self, x.dtype):
            plan = layers.__dict__["_native_plan"] = _LayerPlan(self, layers, x.dtype)
        if plan.table is None or (plan.rotates and rope is None) or (plan.hooked and ctx.adapter_ids is not None):
            return None
        slots, cu_q, lens, tables = meta.native
        cos, sin = (0, 0) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr())
        outs = (torch.empty_like(x), torch.empty_like(x))
        last = native.decoder_layers_cpu(
            plan.table.data_ptr(), plan.table.shape[1], plan.reals.data_ptr(), len(plan.layers), x.data_ptr(),
            outs[0].data_ptr(), outs[1].data_ptr(), x.shape[0], slots.data_ptr(), cu_q.data_ptr(),
            lens.data_ptr(), tables.data_ptr(), ctx.num_chunks, tables.shape[1], torch.get_num_threads(), cos, sin)
        return outs[last], x

    def attend_rotating(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
        """forward() for unrotated q and k: the native kernel rotates them (HF's
        rotate_half form) as it reads q and stores k. Only where fuses_rope(q)."""
        return self._attend_native(q, k, v, k_cache, v_cache, ctx, scale,
                                   (cos.float().contiguous(), sin.float().contiguous()))

    def _attend_native(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float,
                       rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Store this forward's K/V and attend, in one native call (engine/cpu_attention.cpp).
        Rows may be strided (views of a packed QKV): only each row's heads must be contiguous."""
        q = _heads_contiguous(q)
        k, v = _heads_contiguous(k), _heads_contiguous(v)
        if k.stride(0) != v.stride(0):   # one row stride for both
            k, v = k.contiguous(), v.contiguous()
        out = q.new_empty(q.shape)
        slots, cu_seqlens_q, context_lens, tables = ctx.attn_metadata.native
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        cos, sin = rope if rope is not None else (None, None)
        self._native(k.data_ptr(), v.data_ptr(), slots.data_ptr(), k.shape[0], q.data_ptr(),
                     k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), cu_seqlens_q.data_ptr(),
                     context_lens.data_ptr(), tables.data_ptr(), ctx.num_chunks, tables.shape[1], q.shape[1],
                     num_kv_heads, head_dim, block_size, num_blocks, float(scale), native.DTYPE_CODES[q.dtype],
                     torch.get_num_threads(), q.stride(0), k.stride(0), 0 if cos is None else cos.data_ptr(),
                     0 if sin is None else sin.data_ptr())
        return out


class _LayerPlan:
    """decoder_layers_cpu's table, a row per layer (float32 / bfloat16 packed linears, no q/k norm, this
    backend's attention; else None), remade when a hook, KV cache or backend changes (as DecodeGraphs, it
    takes packed weights not to move). LoraHooks add nothing without adapter rows; other hooks: op by op."""

    def __init__(self, backend, layers, dtype: torch.dtype):
        self.backend, self.dtype, self.layers = backend, dtype, list(layers)
        self.parts = [(l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj,
                       l.self_attn.attn) for l in self.layers]
        self.state = self._state()
        self.rotates = any(l.self_attn.use_rope for l in self.layers)
        self.hooked = any(m.lora is not None for parts in self.parts for m in parts[:4])
        self.table, rows, reals = None, [], []
        for layer, (qkv, o, gu, down, a) in zip(self.layers, self.parts):
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            if not all(m.packed and (m.lora is None or isinstance(m.lora, LoraHook)) and m.weight.dtype == dtype
                       for m in (qkv, o, gu, down)) \
                    or layer.self_attn.q_norm is not None or a.backend is not backend or a.k_cache is None \
                    or ln1.weight.dtype != dtype or ln2.weight.dtype != dtype:
                return
            tensors = (ln1.weight, ln2.weight, qkv.weight, qkv.bias, o.weight, o.bias, gu.weight, gu.bias,
                       down.weight, down.bias, a.k_cache, a.v_cache)
            ptr = [0 if t is None else t.data_ptr() for t in tensors]
            num_blocks, block_size, num_kv_heads, head_dim = a.k_cache.shape
            rows.append([qkv.in_features, down.in_features, *layer.self_attn.split_sizes[:2], *ptr, a.num_heads,
                         num_kv_heads, head_dim, block_size, num_blocks, native.DTYPE_CODES[dtype],
                         int(layer.self_attn.use_rope)])
            reals.append([ln1.eps, float(a.scale)])
        self.table, self.reals = torch.tensor(rows, dtype=torch.int64), torch.tensor(reals, dtype=torch.float64)

    def _state(self) -> list:
        return [x for *lin, a in self.parts for x in (*(m.lora for m in lin), a.k_cache, a.v_cache, a.backend)]

    def stale(self, backend, dtype: torch.dtype) -> bool:
        return backend is not self.backend or dtype != self.dtype or \
            any(now is not then for now, then in zip(self._state(), self.state))


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, D] as is when each row's heads lie contiguously (any row stride), else a copy."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


class TritonBackend(LayerOps):
    """The kernels of `memgen.kernels`: on CUDA; on a CPU only under
    TRITON_INTERPRET=1 (tests), where it is slow but exact in fp32."""
    name = "triton"
    graph_safe = True       # device-only metadata: CUDA graphs capture its decode steps
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self):
        # imported here so that a machine without Triton can still use the torch path
        from memgen.kernels import latent_injection, lora, trigger_scoring
        from memgen.kernels.kv_store import store_kvcache
        from memgen.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

        self._store, self._decode, self._prefill = store_kvcache, paged_decode_attention, paged_prefill_attention
        self.inject_latents = latent_injection.inject_latents
        self.trigger_decisions = trigger_scoring.trigger_decisions
        self._lora = lora

    def prepare(self, ctx: ForwardContext) -> None:
        return None

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        self._store(k, v, k_cache, v_cache, ctx.slot_mapping)
        q = q.contiguous()
        if ctx.max_seqlen_q == 1:   # every chunk is a single decode row
            return self._decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
        return self._prefill(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, scale,
                             max_seqlen_q=ctx.max_seqlen_q)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: torch.Tensor, ctx: ForwardContext) -> None:
        """TorchBackend.add_lora with Triton's kernels (the grouping: device-only ops, CUDA-graph safe)."""
        meta = ctx.lora_meta.get(lora_a.shape[0])
        if meta is None:
            meta = ctx.lora_meta[lora_a.shape[0]] = self._lora.lora_metadata(ctx.adapter_ids, lora_a.shape[0])
        self._lora.add_lora(y, x, lora_a, lora_b, scaling, ctx.adapter_ids, meta=meta)


_DEFAULT_OPS = LayerOps()


def layer_ops() -> LayerOps:
    """The dense ops of the forward running now (its backend), or the default ones
    outside a forward (a layer called alone, training)."""
    ctx = context._CONTEXT
    return ctx.backend if ctx is not None and ctx.backend is not None else _DEFAULT_OPS


def select_backend(name: str, device: torch.device, dtype: torch.dtype | None = None):
    """'auto' -> Triton on CUDA (torch for float64), torch SDPA on CPU; or 'torch' / 'triton'."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and dtype in (None, *TritonBackend.dtypes) else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        if dtype is not None and dtype not in TritonBackend.dtypes:
            raise ValueError(f"attention_backend='triton' runs float16, bfloat16 or float32, not "
                             f"{str(dtype).replace('torch.', '')}: use attention_backend='torch' for it")
        try:
            return TritonBackend()
        except ImportError as e:
            raise ValueError(f"attention_backend='triton' needs Triton ({e}); use attention_backend='torch'") from e
    raise ValueError(f"unknown attention_backend {name!r}: use 'auto', 'torch' or 'triton'")

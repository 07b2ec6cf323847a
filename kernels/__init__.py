"""Triton kernels for memgen's hot paths, each beside a plain-torch reference
(importable as `memgen.kernels`).

Modules (import them explicitly; this package imports nothing eagerly, so
TRITON_INTERPRET can still be set before the kernels are decorated):
- kv_store:         store_kvcache            K/V rows -> paged cache slots (slot -1 skipped)
- paged_attention:  paged_prefill_attention  varlen causal chunks over block tables
                    paged_decode_attention   one query per sequence, GQA, split-K
- latent_injection: inject_latents           token embeddings and latent rows in one pass
- trigger_scoring:  trigger_decisions        delimiter + budget + 2-way head + decision
- lora:             add_lora (lora_shrink, lora_expand, lora_metadata)  multi-LoRA
- reference:        every `*_ref` (same signatures) and fold_query_latents
The engine calls them through `memgen.layers.triton_backend.TritonBackend`;
its torch backend (layers.attention) has the same interface.
Sampling stays in torch (see the engine's sampler): a kernel does not pay there.
"""

"""Triton kernels for memgen's hot paths, each beside a plain-torch reference
(importable as `memgen.kernels`).

Modules (import them explicitly; this package imports nothing eagerly, so
TRITON_INTERPRET can still be set before the kernels are decorated):
- kv_store:         store_kvcache            K/V rows -> paged cache slots (slot -1 skipped)
- paged_attention:  paged_prefill_attention  varlen causal chunks over block tables
                    paged_decode_attention   one query per sequence, GQA, split-K
- latent_injection: inject_latents           token embeddings and latent rows in one pass
- trigger_scoring:  trigger_decisions        2-way head + decision (the host picks who is consulted)
- lora:             add_lora (lora_shrink, lora_expand, lora_metadata)  multi-LoRA
- reference:        the torch version of every op (`*_ref`, same signatures, the inputs'
                    dtype) with the checks it shares with its kernel, and
                    fold_query_latents; importing it never imports Triton
The engine calls them through `memgen.layers.backend.TritonBackend`; its
`TorchBackend` has the same interface and runs the torch versions (attention on
the CPU: the native kernel of engine/cpu_attention.cpp).
Sampling stays in torch (see the engine's sampler): a kernel does not pay there.
"""

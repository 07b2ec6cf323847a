"""memgen.layers: the building blocks of engine-native models (attention over a
paged KV cache, packed linears with a LoRA hook, RMSNorm, rotary, sampler) and
the per-forward context they read."""

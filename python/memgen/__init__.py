"""memgen: a fast, exact inference engine for MemGen latent-memory models.

`from memgen import LLM, SamplingParams, RequestOutput`; imported lazily so that
light submodules (memgen.sources, the CLI's --help) do not pay for torch."""

import os

__version__ = "0.1.0"

# Large CPU tensors (weights, KV cache) on transparent huge pages: torch's CPU allocator
# does so for allocations of 2 MiB and more when THP_MEM_ALLOC_ENABLE=1 (read at its first
# large allocation). A decode step streams every weight and the KV cache, and 4 KiB pages
# cost a TLB miss each: decoding ran 8-19% faster here with it. THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "LatentPolicy", "PolicyContext",
           "SAMPLE", "WAIT", "Insert", "Feed", "StreamSpec", "StructuredOutputsParams", "__version__"]

_EXPORTS = {"LLM": "memgen.llm", "SamplingParams": "memgen.sampling_params", "RequestOutput": "memgen.outputs",
            "CompletionOutput": "memgen.outputs", "LatentPolicy": "memgen.latent_policy",
            "PolicyContext": "memgen.latent_policy", "SAMPLE": "memgen.latent_policy",
            "Insert": "memgen.latent_policy", "Feed": "memgen.latent_policy", "WAIT": "memgen.latent_policy",
            "StreamSpec": "memgen.latent_policy", "StructuredOutputsParams": "memgen.structured.params"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memgen' has no attribute {name!r}")

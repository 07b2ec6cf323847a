"""memgen: a fast, exact inference engine for MemGen latent-memory models.

`from memgen import LLM, SamplingParams, RequestOutput`; imported lazily so that
light submodules (memgen.sources, the CLI's --help) do not pay for torch."""

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "LatentPolicy", "PolicyContext",
           "SAMPLE", "WAIT", "Insert", "Feed", "StreamSpec", "__version__"]

_EXPORTS = {"LLM": "memgen.llm", "SamplingParams": "memgen.sampling_params", "RequestOutput": "memgen.outputs",
            "CompletionOutput": "memgen.outputs", "LatentPolicy": "memgen.latent_policy",
            "PolicyContext": "memgen.latent_policy", "SAMPLE": "memgen.latent_policy",
            "Insert": "memgen.latent_policy", "Feed": "memgen.latent_policy", "WAIT": "memgen.latent_policy",
            "StreamSpec": "memgen.latent_policy"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memgen' has no attribute {name!r}")

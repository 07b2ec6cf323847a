"""memgen: a fast, exact inference engine for MemGen latent-memory models."""

__version__ = "0.1.0"

"""Triton kernels for memgen's hot paths, each beside a plain-torch reference
(importable as `memgen.kernels`)."""

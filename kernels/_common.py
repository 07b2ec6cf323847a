"""Shared plumbing for the kernel modules: a guarded Triton import (so the torch
references import on machines without Triton), the interpreter switch (with a
fix for triton 3.6's interpreter under numpy >= 2.4), and the kernels' upcast rule.
The input checks live in _checks.py (Triton-free, shared with reference.py)."""
from __future__ import annotations

import os
import types
import warnings

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch references still work
    HAS_TRITON = False

    def _jit_unavailable(fn):
        def launch_unavailable(*args, **kwargs):
            raise RuntimeError(f"{fn.__name__} needs Triton, which is not installed")

        return launch_unavailable

    triton = types.SimpleNamespace(jit=_jit_unavailable, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()))
    tl = types.SimpleNamespace(constexpr=None)

__all__ = ["HAS_TRITON", "triton", "tl", "is_interpreting", "upcast_inside", "next_pow2"]

_TRUE = ("1", "true", "yes", "on", "y")


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _backport_interpreter_index_fix() -> bool:
    """Give triton's CPU interpreter the `__index__` of triton-lang/triton#9172.

    In triton <= 3.6 the interpreter turns a runtime scalar into a Python int with
    `int(data)` on a shape-(1,) array, which numpy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"), so every
    `range(lo, hi, BLOCK)` over a runtime bound fails. Triton 3.9 squeezes first;
    this installs the same lambda, and only where a probe shows the installed
    interpreter fails. Returns whether it did. Compiled (GPU) kernels never see it.
    """
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_memgen_backport", False):
        return False

    class _Record:  # a stand-in for interpreter._LangPatchScope
        def __init__(self):
            self.attrs = {}

        def set_attr(self, obj, name, value):
            self.attrs[name] = value

    class _Probe:
        handle = types.SimpleNamespace(data=np.array([3], dtype=np.int32))

    record = _Record()
    try:
        original(type("_ProbeTensor", (), {}), record)
        index = record.attrs["__index__"]
    except Exception:  # an interpreter laid out differently: leave it alone
        return False
    try:
        with warnings.catch_warnings():  # numpy 1.25-2.3 only warn
            warnings.simplefilter("ignore", DeprecationWarning)
            if index(_Probe()) == 3:
                return False  # this interpreter (or numpy) is fine as it is
    except TypeError:
        pass

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._memgen_backport = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


INTERPRETER_BACKPORT = HAS_TRITON and is_interpreting() and _backport_interpreter_index_fix()


def upcast_inside(dtype: torch.dtype) -> bool:
    """Whether a kernel should turn its operands to fp32 right after loading them.

    Always under the interpreter (its bf16 arithmetic is wrong) and for fp32 inputs
    (then `tl.dot` runs with input_precision="ieee", no TF32). On a GPU, fp16/bf16
    operands stay native for the tensor cores and accumulate in fp32.
    """
    return is_interpreting() or dtype == torch.float32


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))

"""The native CPU ops of memgen._native (engine/cpu_attention.cpp, engine/cpu_ops.cpp,
engine/cpu_gemm.cpp), looked up once; None where the build lacks one (an older build:
torch's ops run). The layers reach them through their backend (layers/backend.py)."""
from __future__ import annotations

import torch

# engine/cpu_attention.h's AttnDtype codes
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# the fused layer ops (cpu_ops.h) and the linears (cpu_gemm.h) take float32 and bfloat16:
# float64 keeps torch's ops
FUSED_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2}


def native_op(name: str):
    try:
        import memgen._native as native
    except ImportError:
        return None
    return getattr(native, name, None)


paged_attention_cpu = native_op("paged_attention_cpu")
rms_norm_cpu = native_op("rms_norm_cpu")
silu_and_mul_cpu = native_op("silu_and_mul_cpu")
argmax_rows_f32 = native_op("argmax_rows_f32")   # the greedy sampler's argmax (cpu_ops.h)
bf16_to_f32 = native_op("bf16_to_f32")           # bfloat16 logits to float32 on the caller's thread
decoder_layers_cpu = native_op("decoder_layers_cpu")   # a model's decoder layers in one call (cpu_ops.h)
packed_linear = native_op("packed_linear")   # engine/cpu_gemm.h, with pack_weight and packed_size
pack_weight = native_op("pack_weight")
pack_rows = native_op("pack_rows")
packed_size = native_op("packed_size")
packed_linear_bf16 = native_op("packed_linear_bf16")   # bfloat16 weights: panels of k pairs
pack_rows_bf16 = native_op("pack_rows_bf16")
packed_size_bf16 = native_op("packed_size_bf16")
unpack_rows = native_op("unpack_rows")         # W's rows back from the panels: a tied embedding's lookup
advise_huge_pages = native_op("advise_huge_pages")   # madvise(MADV_HUGEPAGE) before first write
linear_isa = native_op("linear_isa")           # the instruction sets the linears run
linear_isa_bf16 = native_op("linear_isa_bf16")
linear_threads = native_op("linear_threads")   # threads packed_linear uses for a call
set_linear_split = native_op("set_linear_split")   # 'stream' (default: decode rows too), 'sums', 'off'
linear_split = native_op("linear_split")


def fused_ok(*tensors: torch.Tensor) -> bool:
    """The fused CPU ops apply: CPU tensors of one float32/bfloat16 dtype, contiguous,
    outside autograd (they write in place)."""
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in FUSED_DTYPE_CODES and not torch.is_grad_enabled()
            and all(t.dtype == first.dtype and t.is_contiguous() for t in tensors))


def huge_page_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor that the kernel is asked to back with transparent huge
    pages (where it can: Linux, THP on madvise or always), before anything writes it: the
    weights' stream then walks a page table entry per 2 MiB, not per 4 KiB (the decode
    linears read 11-13 -> 15-17 GB/s on one thread on the development machine)."""
    align = (2 << 20) // torch.empty((), dtype=dtype).element_size()
    base = torch.empty(numel + align, dtype=dtype)
    if advise_huge_pages is None:
        return base[:numel]
    # start on a 2 MiB boundary: every whole huge page of the tensor can be one
    offset = (-base.data_ptr() % (2 << 20)) // base.element_size()
    out = base[offset:offset + numel]
    advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out

"""Linear layers that load HF weights into packed matrices (QKV, gate-up) and
carry an optional per-row LoRA hook.

LoRA later: set `layer.lora = hook`, a callable `hook(x, y, layer) -> y` that
adds `scale * (x @ A[a].T) @ B[a].T` to the rows of `y` whose adapter id
(`get_context().adapter_ids`) is `a`, restricted to the output slice of the
targeted sub-projection (`layer.output_slices["q"]`, `["v"]` for a packed QKV).
With no hook, the forward is one linear op of the forward's backend (layers/backend.py):
the native kernel on weights packed for the CPU (float32, bfloat16), else `F.linear`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memgen.layers import native
from memgen.layers.backend import layer_ops


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out, in]. `output_sizes` names the packed parts."""

    def __init__(self, in_features: int, output_sizes: dict[str, int] | int, bias: bool = False):
        super().__init__()
        if isinstance(output_sizes, int):
            output_sizes = {"": output_sizes}
        self.output_slices: dict[str, slice] = {}
        start = 0
        for name, size in output_sizes.items():
            self.output_slices[name] = slice(start, start + size)
            start += size
        self.in_features, self.out_features = in_features, start
        # [out, in] like HF, stored transposed ([in, out] contiguous): F.linear then multiplies by a
        # plain row-major matrix, which MKL runs up to 2x faster for the few-row GEMMs of decode steps
        self.weight = nn.Parameter(torch.empty(in_features, start).t(), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(start), requires_grad=False) if bias else None
        self.lora: Callable[[torch.Tensor, torch.Tensor, "Linear"], torch.Tensor] | None = None
        self.packed = False   # True: `weight` holds W in the native CPU kernel's panels (pack_for_cpu)

    def load_part(self, name: str, tensor: torch.Tensor, is_bias: bool = False) -> None:
        """Copy one HF sub-projection (e.g. 'k' of a packed QKV; '' for a whole
        projection) into its slice; straight into the panels when packed."""
        param = self.bias if is_bias else self.weight
        if param is None:
            raise ValueError(f"checkpoint has a bias for a projection built without one ({name!r})")
        part = self.output_slices[name]
        want = (part.stop - part.start,) if is_bias else (part.stop - part.start, self.in_features)
        if tuple(tensor.shape) != want:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {want}")
        if self.packed and not is_bias:
            w = self.weight
            rows = tensor.to(w.dtype).contiguous()
            pack = native.pack_rows if w.dtype == torch.float32 else native.pack_rows_bf16
            pack(rows.data_ptr(), want[0], self.in_features, self.out_features, part.start, w.data_ptr())
            return
        param.data[part].copy_(tensor)

    def packed_numel(self) -> int | None:
        """Elements of this layer's packed weight, None where it does not pack."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or native.packed_linear is None \
                or (w.dtype == torch.bfloat16 and native.packed_linear_bf16 is None):
            return None
        size = native.packed_size if w.dtype == torch.float32 else native.packed_size_bf16
        return size(self.in_features, self.out_features)

    def pack_for_cpu(self, keep_values: bool = True, storage: torch.Tensor | None = None) -> bool:
        """On the CPU in float32 or bfloat16, hold W in the native kernel's 16-column
        panels (engine/cpu_gemm.h; bfloat16: pairs of k per column) instead of the plain
        layout, so that W is stored once. keep_values=False before loading (load_part then
        writes straight into the panels); else the current weight is repacked. Returns
        whether it is packed."""
        if self.packed:
            return True
        numel = self.packed_numel()
        if numel is None:
            return False
        w = self.weight
        k, n = self.in_features, self.out_features
        if storage is not None:   # a slice of a model-wide buffer (pack_linears_for_cpu)
            if storage.numel() != numel or storage.dtype != w.dtype:
                raise ValueError(f"packed storage of {storage.numel()} {storage.dtype} for {numel} {w.dtype}")
            packed = storage
        else:
            packed = native.huge_page_empty(numel, w.dtype)
        if w.dtype == torch.float32:
            if keep_values:   # pack_weight also zeroes the last panel's padding columns
                w_t = w.detach().t().contiguous()   # [in, out] row-major (already so: a free view)
                native.pack_weight(w_t.data_ptr(), k, n, packed.data_ptr())
            elif n % 16:      # the padding columns must be zeros (they are multiplied, then dropped)
                packed.view(-1, k, 16)[-1, :, n % 16:] = 0
        else:
            if n % 16:        # [panels, k pairs, 16 columns, 2]: padding columns zero
                packed.view(-1, (k + 1) // 2, 16, 2)[-1, :, n % 16:] = 0
            if keep_values:   # pack_rows_bf16 writes each column's pad of an odd K
                rows = w.detach().contiguous()      # [out, in] row-major
                native.pack_rows_bf16(rows.data_ptr(), n, k, n, 0, packed.data_ptr())
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed = True
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(x)
        if self.lora is not None:
            y = self.lora(x, y, self)
        return y

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b, without the LoRA hook."""
        return layer_ops().linear(self, x)


class TiedEmbedding(Linear):
    """A tied model's embedding held as its LM head, a Linear hidden -> vocab: on the CPU
    its panels are read whole by the logits (`project`: the kernel of every other linear,
    1.1-1.7x faster than reading [V, H] rows at 8-32 rows) and gathered token by token by
    the lookup (`forward`), so the matrix is stored once."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(hidden_size, vocab_size)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embedding rows, token_ids.shape + [hidden]."""
        w, k = self.weight, self.in_features
        if not self.packed:
            return w[token_ids]
        ids = token_ids.reshape(-1).long().contiguous()
        out = w.new_empty(ids.shape[0], k)
        # natively, on the calling thread (torch's indexing of the panels woke its OpenMP
        # pool, whose spinning then took a core from the next linear)
        native.unpack_rows(w.data_ptr(), k, self.out_features, ids.data_ptr(), ids.shape[0], out.data_ptr(),
                           w.dtype == torch.bfloat16)
        return out.view(*token_ids.shape, k)

    def inject(self, token_ids: torch.Tensor, latent_index: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Rows with latent_index >= 0 take that row of `latents`, the others their token's
        embedding (kernels/reference.py inject_latents_ref on the panels)."""
        is_latent = latent_index >= 0
        out = self(token_ids.clamp(min=0))
        out[is_latent] = latents[latent_index[is_latent].long()].to(out.dtype)
        return out


def pack_linears_for_cpu(model: nn.Module, keep_values: bool = True) -> int:
    """Pack every Linear of a CPU float32 / bfloat16 model for the native kernel; returns
    how many. The packed weights of one dtype share one buffer, in the order the forward
    reads them, asked to lie on huge pages (native.huge_page_empty): a layer's small
    matrices (1-3 MiB) would not fill a huge page of their own."""
    todo = [m for m in model.modules() if isinstance(m, Linear) and not m.packed]
    sizes = {m: m.packed_numel() for m in todo}
    for dtype in {m.weight.dtype for m in todo if sizes[m] is not None}:
        group = [m for m in todo if sizes[m] is not None and m.weight.dtype == dtype]
        arena = native.huge_page_empty(sum(sizes[m] for m in group), dtype)
        start = 0
        for m in group:
            # each weight starts on a 64-byte line: the sizes are multiples of 16 columns
            m.pack_for_cpu(keep_values, storage=arena[start:start + sizes[m]])
            start += sizes[m]
    return sum(m.packed for m in model.modules() if isinstance(m, Linear))


class SiluAndMul(nn.Module):
    """silu(gate) * up for a packed [.., 2*I] gate-up output (one native pass on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_ops().silu_and_mul(x)

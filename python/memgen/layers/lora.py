"""Multi-LoRA on the engine's packed linear layers.

Rows of different adapters share one base matmul; each adapter then adds
`((x @ A.T) @ B.T) * scaling` (PEFT's order of operations) to its own rows,
restricted to the targeted sub-projection of a packed layer. Which rows belong
to which adapter comes from `get_context().adapter_ids` (-1: no adapter, e.g.
the reasoner's rows), so one forward can mix reasoner, weaver and trigger rows.

HF module paths map onto packed engine layers like this:
  model.layers.3.self_attn.q_proj  -> model.layers[3].self_attn.qkv_proj, slice "q"
  model.layers.3.mlp.up_proj       -> model.layers[3].mlp.gate_up_proj,   slice "up"
  model.layers.3.self_attn.o_proj  -> model.layers[3].self_attn.o_proj,   whole output
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from memgen.layers.context import get_context

# HF projection name -> (engine module attribute path under the layer, packed slice name)
_PACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "self_attn.o_proj": ("self_attn.o_proj", ""),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
    "mlp.down_proj": ("mlp.down_proj", ""),
}
_PATH = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)$")


@dataclass
class _Delta:
    adapter_id: int
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out_slice, r]
    scaling: float
    out: slice


@dataclass
class LoraHook:
    """Callable installed as `Linear.lora`: adds every adapter's delta to its rows.

    The adapters are stacked per output slice, zero-padded to one rank and to the
    model's adapter count, and the forward's backend adds them all in one call per
    slice (`add_lora`: Triton's shrink + expand kernels, or the torch version in
    PEFT's order of operations)."""

    deltas: list[_Delta] = field(default_factory=list)
    num_adapters: int = 0           # model-wide: every hook stacks the same adapter ids
    _stacks: list | None = None     # [(out slice, A [n, r, in], B [n, out, r], scaling [n])]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx = get_context()
        if ctx.adapter_ids is None:
            return y
        for out, a, b, scaling in self.stacks():
            ctx.backend.add_lora(y[:, out], x, a, b, scaling, ctx)
        return y

    def stacks(self) -> list:
        """The adapters stacked per output slice (built once, kept across same-shape
        weight pushes: see _restack). Scaling is fp32 (the kernels'), float64 in a
        float64 model (the adapter's exact factor)."""
        if self._stacks is None:
            self._stacks = []
            for out in sorted({(d.out.start, d.out.stop) for d in self.deltas}):
                mine = [d for d in self.deltas if (d.out.start, d.out.stop) == out]
                first, rank = mine[0], max(d.a.shape[0] for d in mine)
                n = self.num_adapters
                a = first.a.new_zeros(n, rank, first.a.shape[1])
                b = first.b.new_zeros(n, out[1] - out[0], rank)
                scaling_dtype = torch.float64 if first.a.dtype == torch.float64 else torch.float32
                scaling = torch.zeros(n, dtype=scaling_dtype, device=first.a.device)
                for d in mine:
                    r = d.a.shape[0]
                    a[d.adapter_id, :r], b[d.adapter_id, :, :r], scaling[d.adapter_id] = d.a, d.b, d.scaling
                self._stacks.append((slice(*out), a, b, scaling))
        return self._stacks


def resolve_target(model: nn.Module, module_path: str) -> tuple[nn.Module, slice]:
    """The engine Linear and output slice for an HF module path (ValueError if unknown)."""
    m = _PATH.match(module_path)
    if m is None or m.group(2) not in _PACKED:
        raise ValueError(f"LoRA target {module_path!r} is not a supported projection "
                         f"(supported: model.layers.N.{{{', '.join(_PACKED)}}})")
    index, name = int(m.group(1)), m.group(2)
    layers = model.model.layers
    if index >= len(layers):
        raise ValueError(f"LoRA target {module_path!r}: the model has only {len(layers)} layers")
    attr, part = _PACKED[name]
    linear = layers[index]
    for piece in attr.split("."):
        linear = getattr(linear, piece)
    return linear, linear.output_slices[part]


def install_lora(model: nn.Module, adapter_id: int, lora, dtype: torch.dtype, device) -> int:
    """Attach one adapter (a `memgen.checkpoint.LoraWeights`) to `model`'s layers
    under `adapter_id`, replacing any adapter of that id. Every shape is checked
    before anything changes. Returns the number of layers touched."""
    targets = []
    for module_path, (a, b) in lora.layers.items():
        linear, out = resolve_target(model, module_path)
        width = out.stop - out.start
        if a.shape[1] != linear.in_features or b.shape[0] != width or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA weights for {module_path!r} have shapes A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}; the base projection is [{width}, {linear.in_features}]")
        targets.append((linear, out, a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)))
    if _update_in_place(model, adapter_id, targets, float(lora.scaling)):
        return len(lora.layers)
    _drop(model, adapter_id)
    for linear, out, a, b in targets:
        if not isinstance(linear.lora, LoraHook):
            linear.lora = LoraHook()
        linear.lora.deltas.append(_Delta(adapter_id, a, b, float(lora.scaling), out))
    _restack(model)
    return len(lora.layers)


def _update_in_place(model: nn.Module, adapter_id: int, targets: list, scaling: float) -> bool:
    """New weights for an installed adapter of the same targets and shapes (a training
    step's weight push): copied into its slot of the built stacks, nothing rebuilt.
    False (nothing changed) when the layout differs."""
    installed = {}
    for module in model.modules():
        hook = getattr(module, "lora", None)
        if isinstance(hook, LoraHook):
            for d in hook.deltas:
                if d.adapter_id == adapter_id:
                    installed[(id(module), d.out.start, d.out.stop)] = (hook, d)
    if len(installed) != len(targets):
        return False
    found = []
    for linear, out, a, b in targets:
        hook, d = installed.get((id(linear), out.start, out.stop), (None, None))
        if d is None or hook._stacks is None or d.a.shape != a.shape or d.b.shape != b.shape:
            return False
        found.append((hook, d, a, b))
    for hook, d, a, b in found:
        d.a, d.b, d.scaling = a, b, scaling
        for out, stack_a, stack_b, stack_scaling in hook._stacks:
            if (out.start, out.stop) == (d.out.start, d.out.stop):
                r = a.shape[0]
                stack_a[adapter_id, :r].copy_(a)
                stack_b[adapter_id, :, :r].copy_(b)
                stack_scaling[adapter_id] = scaling
    return True


def uninstall_lora(model: nn.Module, adapter_id: int) -> None:
    """Take adapter `adapter_id` off `model`'s layers (its rows find zeros from now on)."""
    _drop(model, adapter_id)
    _restack(model)


def _drop(model: nn.Module, adapter_id: int) -> None:
    for module in model.modules():
        hook = getattr(module, "lora", None)
        if isinstance(hook, LoraHook):
            hook.deltas = [d for d in hook.deltas if d.adapter_id != adapter_id]


def _restack(model: nn.Module) -> None:
    """After the adapters changed: every hook stacks the model's adapter count
    (rows of an adapter that a layer lacks must still find an all-zero slot).
    Stacks already built keep their tensors when the shapes are unchanged (a
    weight push during training): new values are copied in, so captured CUDA
    graphs, which hold the tensors by address, stay valid."""
    hooks = [m.lora for m in model.modules() if isinstance(getattr(m, "lora", None), LoraHook)]
    num_adapters = 1 + max((d.adapter_id for h in hooks for d in h.deltas), default=-1)
    for hook in hooks:
        old, hook.num_adapters, hook._stacks = hook._stacks, num_adapters, None
        # built here, never lazily inside a forward: tensors made under inference_mode
        # could not take a later push's in-place copy
        stacks = hook.stacks()
        if old is not None and _same_layout(old, stacks):
            for kept, new in zip(old, stacks):
                for dst, src in zip(kept[1:], new[1:]):
                    dst.copy_(src)
            hook._stacks = old


def _same_layout(old: list, new: list) -> bool:
    """Same output slices and tensor shapes, in the same (sorted) order."""
    def key(stacks):
        return [(s[0].start, s[0].stop, *(tuple(t.shape) for t in s[1:])) for s in stacks]
    return key(old) == key(new)

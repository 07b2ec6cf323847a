"""The linear floor of a decode step: the model's linear layers and LM head alone
at the step's rows, the GEMMs no step can avoid. A step's time against it says
how much the engine spends beside the GEMMs (attention, small ops, host work)."""
from __future__ import annotations

import time

import torch

_CALLS: dict = {}


def linear_floor_s(llm, rows: int, steps: int, mkl: bool = False) -> float:
    """Seconds for `steps` rounds of every linear layer at `rows` rows. Default: the
    engine's own layers (on CPU float32 the native kernel on packed weights);
    mkl=True: torch's F.linear on the same weights in their plain layout, as HF runs
    them. The calls and inputs are built once per (llm, rows), untimed."""
    key = (id(llm), rows, mkl)
    if key not in _CALLS:
        _CALLS[key] = _calls(llm.engine.model_runner.model, rows, mkl)
    calls = _CALLS[key]
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(steps):
            for call in calls:
                call()
        return time.perf_counter() - start


def _calls(model, rows: int, mkl: bool) -> list:
    from memgen.layers.linear import Linear

    mods = [m for m in model.modules() if isinstance(m, Linear)]
    # a tied head kept as an embedding is no Linear (a packed TiedEmbedding is, so it is in mods)
    head_outside = model.lm_head is None and not isinstance(model.model.embed_tokens, Linear)
    device = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    # keyed by width: the LM head's input is the hidden size, as the QKV projection's
    xs = {m.in_features: torch.randn(rows, m.in_features, device=device, dtype=dtype) for m in mods}
    if mkl:
        plain = [(unpacked_weight(m), m.bias) for m in mods]
        if head_outside:
            plain.append((model.model.embed_tokens.weight, None))
        return [lambda w=w, b=b: torch.nn.functional.linear(xs[w.shape[1]], w, b) for w, b in plain]
    calls = [lambda m=m: m.project(xs[m.in_features]) for m in mods]   # base weights: no LoRA hook
    if head_outside:
        calls.append(lambda: model.compute_logits(xs[model.hidden_size]))
    return calls


def unpacked_weight(m) -> torch.Tensor:
    """A Linear's weight as [out, in], undoing the CPU kernel's 16-column panels when packed."""
    if not m.packed:
        return m.weight
    k, n = m.in_features, m.out_features
    w_t = m.weight.detach().view(-1, k, 16).permute(1, 0, 2).reshape(k, -1)[:, :n].contiguous()
    return w_t.t()

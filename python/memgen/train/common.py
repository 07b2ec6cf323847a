"""What SFT and GRPO share: which parameters a role trains, the optimizer and
learning-rate schedule, and checkpoint writing.

Roles, as the reference's `fix_component` / `open_component` set them (spec §3.3-§3.4):
    weaver:  weaver LoRA, query latents, their LayerNorms and scales, both projections
    trigger: trigger LoRA and the 2-way trigger head
The reasoner is always frozen.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

ROLES = ("weaver", "trigger")
SAVE_FORMATS = ("reference", "export", "both")


def trainable_parameters(model, role: str) -> dict[str, nn.Parameter]:
    """Name -> parameter of what `role` trains (module docstring)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    named = dict(model.named_parameters())
    if role == "weaver":
        prefixes = ("prompt_query_latents", "inference_query_latents", "prompt_latent_ln.",
                    "inference_latent_ln.", "prompt_latent_scale", "inference_latent_scale",
                    "reasoner_to_weaver.", "weaver_to_reasoner.")
        keep = {n for n in named if n.startswith(prefixes) or (n.startswith("weaver.") and ".lora_" in n)}
    else:
        keep = {n for n in named if n.startswith("trigger_head.") or (n.startswith("trigger.") and ".lora_" in n)}
    return {n: named[n] for n in sorted(keep)}


def freeze_for(model, role: str) -> dict[str, nn.Parameter]:
    """requires_grad only on `role`'s parameters; returns them."""
    params = trainable_parameters(model, role)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


def no_decay(name: str) -> bool:
    """True for a parameter AdamW should not decay: biases and LayerNorm
    weights, the names transformers' Trainer exempts (get_decay_parameter_names)."""
    return name.endswith("bias") or "_ln." in name or "layernorm" in name or "norm." in name


def make_optimizer(params, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with the HF Trainer's defaults (betas 0.9/0.999, eps 1e-8). Given
    a name -> parameter dict, biases and LayerNorm weights are not decayed, as
    the Trainer does (this matters only when weight_decay > 0)."""
    if isinstance(params, dict):
        groups = [{"params": [p for n, p in params.items() if not no_decay(n)], "weight_decay": weight_decay},
                  {"params": [p for n, p in params.items() if no_decay(n)], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)
    return torch.optim.AdamW(list(params), lr=learning_rate, weight_decay=weight_decay)


def loss_logits(logits: Tensor) -> Tensor:
    """Logits in the dtype a loss is computed in: their own when float32 or
    float64 (a float64 run stays float64 end to end), float32 for lower
    precisions (a bf16 log-softmax over a large vocabulary loses ~3 digits)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def lr_factor(kind: str, step: int, num_steps: int, warmup: int, reference_compat: bool = False) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based).

    transformers' curves, with one change: its warm-up gives step 0 a factor
    of 0, so a run of 1 or 2 steps (or the first step of any run) would change
    nothing. Here warm-up step s gets (s + 1) / (warmup + 1): never 0, rising
    to the full rate. After warm-up, cosine and linear decay as transformers'
    do, and stay > 0 on every step of the run (they reach 0 only after it).
    reference_compat=True gives transformers' warm-up s / warmup (0 at step 0),
    what the reference's Trainer runs."""
    if step < warmup:
        return step / warmup if reference_compat else (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, num_steps - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"lr scheduler must be cosine, linear or constant, got {kind!r}")


def make_scheduler(optimizer, kind: str, num_steps: int, warmup_ratio: float, reference_compat: bool = False):
    """A LambdaLR over `lr_factor`; warmup = ceil(ratio * steps) as the HF Trainer computes it."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr scheduler must be cosine, linear or constant, got {kind!r}")
    warmup = math.ceil(warmup_ratio * num_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(kind, step, num_steps, warmup, reference_compat))


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Clip the global grad norm (if set), step optimizer and schedule; the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def save_checkpoint(model, path: str | Path, save_format: str = "both",
                    reasoner_dir: str | Path | None = None) -> list[Path]:
    """Write the model's MemGen weights: "reference" (the reference's
    save_pretrained layout) to path/reference, "export" (safetensors + recorded
    bases) to path/export, "both" to both. Both load with LLM(memgen=...).
    With reasoner_dir, a weaver or trigger base that is the reasoner is not
    recorded: loaders default to the reasoner anyway, and its path (often in
    the cache) would not exist on another machine."""
    import dataclasses

    from memgen.checkpoint import save_export, save_reference
    from memgen.sources import same_model

    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save format must be one of {SAVE_FORMATS}, got {save_format!r}")
    path = Path(path)
    ckpt = model.to_checkpoint()
    if reasoner_dir is not None:
        ckpt = dataclasses.replace(ckpt, **{f"{role}_base": None for role in ("weaver", "trigger")
                                            if getattr(ckpt, f"{role}_base") is not None
                                            and same_model(Path(getattr(ckpt, f"{role}_base")), Path(reasoner_dir))})
    written = []
    if save_format in ("reference", "both"):
        written.append(save_reference(ckpt, path / "reference"))
    if save_format in ("export", "both"):
        written.append(save_export(ckpt, path / "export"))
    return written

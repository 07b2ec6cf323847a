"""Weaver SFT on `memgen.hf.HFMemGenModel.sft_forward` (spec §3.1).

A plain AdamW loop rather than the transformers Trainer: `sft_forward` takes
one unpadded row at a time (its insertion points and latent blocks differ per
row), so a Trainer would need a custom collator, a compute_loss override and
a no-op batching layer, and GRPO below needs engine rollouts and a weight push
after every step, which the Trainer's loop has no place for. The loop keeps
the Trainer's semantics where they matter: AdamW, cosine schedule with warmup
ceil(0.1 * steps), grad-norm clipping at 1.0, gradient accumulation. One
departure: the first warm-up step's learning rate is not 0 (common.lr_factor),
so a run of 1 or 2 steps changes the weights.

Loss per optimizer step, as the reference computes it for a batch (its
`forward` concatenates the rows and takes one token-mean cross-entropy):
    loss(batch) = sum over rows and supervised tokens of CE / supervised tokens in the batch
averaged over `grad_accum` batches. Rows are run and back-propagated one at a
time, so memory holds one row's graph.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .common import clip_and_step, freeze_for, make_optimizer, make_scheduler
from .data import IGNORE, EncodedExample


@dataclass
class SFTConfig:
    learning_rate: float = 1e-5      # reference YAMLs (spec §1.3)
    epochs: int = 2
    batch_size: int = 4              # rows per batch (one token-mean loss)
    grad_accum: int = 1              # batches per optimizer step
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None     # stop early after this many optimizer steps
    shuffle: bool = True
    seed: int = 42

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def num_sft_steps(num_examples: int, config: SFTConfig) -> int:
    per_step = config.batch_size * config.grad_accum
    steps = config.epochs * math.ceil(num_examples / per_step)
    return min(steps, config.max_steps) if config.max_steps else steps


def row_loss_sum(model, example: EncodedExample) -> tuple[torch.Tensor, int]:
    """(summed shifted cross-entropy over the row's supervised tokens, their count)."""
    ids = torch.tensor(example.input_ids, device=model.device)
    labels = torch.tensor(example.labels, device=model.device)
    out = model.sft_forward(ids, labels)
    n = int((labels[1:] != IGNORE).sum())
    ce = torch.nn.functional.cross_entropy(out.logits[:-1].float(), labels[1:], ignore_index=IGNORE,
                                           reduction="sum")
    return ce, n


def train_sft(model, examples: list[EncodedExample], config: SFTConfig | None = None,
              on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model`'s weaver on `examples`; returns one record per optimizer
    step ({"step", "loss", "lr", "grad_norm", "tokens", "seconds"}). `on_step`
    is called with each record after the step (e.g. to push weights to an
    engine with `llm.update_memgen_weights(model.to_checkpoint())`)."""
    config = config or SFTConfig()
    config.validate()
    examples = [e for e in examples if sum(t != IGNORE for t in e.labels[1:]) > 0]
    if not examples:
        raise ValueError("no example has a supervised token after truncation")
    params = freeze_for(model, "weaver")
    optimizer = make_optimizer(params.values(), config.learning_rate, config.weight_decay)
    total = num_sft_steps(len(examples), config)
    scheduler = make_scheduler(optimizer, config.lr_scheduler, total, config.warmup_ratio)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)   # LoRA dropout

    def batches():
        for _ in range(config.epochs):
            order = list(range(len(examples)))
            if config.shuffle:
                rng.shuffle(order)
            for i in range(0, len(order), config.batch_size):
                yield [examples[j] for j in order[i:i + config.batch_size]]

    history: list[dict] = []
    model.train()
    try:
        stream = batches()
        for step in range(1, total + 1):
            start, losses, tokens = time.perf_counter(), [], 0
            for _ in range(config.grad_accum):
                batch = next(stream, None)
                if batch is None:
                    break
                n_batch = sum(sum(t != IGNORE for t in e.labels[1:]) for e in batch)
                batch_loss = 0.0
                for example in batch:
                    ce, _ = row_loss_sum(model, example)
                    (ce / (n_batch * config.grad_accum)).backward()
                    batch_loss += float(ce.detach())
                losses.append(batch_loss / n_batch)
                tokens += n_batch
            if not losses:
                break
            lr = scheduler.get_last_lr()[0]
            norm = clip_and_step(params.values(), optimizer, scheduler, config.max_grad_norm)
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "grad_norm": norm,
                      "tokens": tokens, "seconds": time.perf_counter() - start}
            history.append(record)
            if on_step is not None:
                on_step(record)
    finally:
        model.eval()
    return history

"""Weaver SFT on `memgen.hf.HFMemGenModel.sft_forward` (spec §3.1, §3.2).

A plain AdamW loop rather than the transformers Trainer: `sft_forward` takes
one unpadded row at a time (its insertion points and latent blocks differ per
row), so a Trainer would need a custom collator, a compute_loss override and
a no-op batching layer, and GRPO needs engine rollouts and a weight push
after every step, which the Trainer's loop has no place for. The loop keeps
what matters of the reference's Trainer: AdamW, cosine schedule with warm-up
ceil(0.1 * steps), grad-norm clipping at 1.0, gradient accumulation.

A batch's loss is the reference's: its rows' forwards (one per row, or one per
chosen assistant turn of a conversation: conversation.py) and one token mean
of the cross-entropy over all their supervised tokens. forward="fast" (the
default, but under reference_compat) runs a batch's forwards together on
memgen.train.fast (the same numbers: tests/test_train_fast.py; a
conversation's turns share one pass over the conversation); forward="step"
runs and back-propagates them one `sft_forward` at a time (the oracle, and
the reference's order of operations; memory holds one forward's graph).

One optimizer step is `grad_accum` batches. Its loss (docs/training.md):
  default:   the token mean over the whole step,
                 sum of CE over the step's supervised tokens / their number,
             so accumulating A batches of B rows trains exactly as one batch
             of A*B rows would (what accumulation is for);
  reference_compat=True: the SUM of the batches' token means. The reference
             runs transformers' Trainer on `MemGenModel.forward(**kwargs)`:
             a forward that takes **kwargs makes the Trainer pass
             num_items_in_batch and not divide each batch's loss by the
             accumulation steps, and the forward ignores it and returns its
             batch's token mean, so the step's gradient is the sum of the
             batches' gradients (A times the mean's at equal batch losses).
With grad_accum = 1 the two are the same. reference_compat also gives the
first warm-up step a learning rate of 0 as transformers does (by default it
is not 0, so a run of 1 or 2 steps trains: common.lr_factor).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .common import clip_and_step, freeze_for, loss_logits, make_optimizer, make_scheduler
from .conversation import Segment, row_segments
from .data import IGNORE, EncodedExample
from .fast import check_forward, use_fast


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
    reference_compat: bool = False   # the reference's step semantics (module docstring)
    forward: str | None = None       # "fast" | "step" | None: fast, step under reference_compat (fast.use_fast)

    def validate(self) -> None:
        check_forward(self.forward)
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def trainable_examples(examples: list[EncodedExample]) -> list[EncodedExample]:
    """The examples with a supervised token to learn (after truncation)."""
    return [e for e in examples if sum(t != IGNORE for t in e.labels[1:]) > 0]


def num_sft_steps(num_examples: int, config: SFTConfig) -> int:
    per_step = config.batch_size * config.grad_accum
    steps = config.epochs * math.ceil(num_examples / per_step)
    return min(steps, config.max_steps) if config.max_steps else steps


def segment_loss_sum(model, segment: Segment) -> torch.Tensor:
    """Summed shifted cross-entropy over one forward's supervised tokens, in
    the logits' dtype (float32 for lower precisions: common.loss_logits)."""
    ids = torch.tensor(segment.input_ids, device=model.device)
    labels = torch.tensor(segment.labels, device=model.device)
    logits = model.sft_forward(ids, labels).logits
    return torch.nn.functional.cross_entropy(loss_logits(logits[:-1]), labels[1:], ignore_index=IGNORE,
                                             reduction="sum")


def row_loss_sum(model, example: EncodedExample) -> tuple[torch.Tensor, int]:
    """(summed shifted cross-entropy over a one-turn row's supervised tokens, their count)."""
    segment = Segment(list(example.input_ids), list(example.labels))
    return segment_loss_sum(model, segment), segment.num_supervised


def plan_batch(model, batch: list[EncodedExample], rng: random.Random) -> list[Segment]:
    """The forwards of one batch, its conversations' turns drawn now, in row
    order (the reference draws them in its forward, in the same order)."""
    max_turns = model.settings.max_prompt_aug_num
    return [seg for example in batch for seg in row_segments(example, max_turns, rng)]


def accumulate_step(model, batches: list[list[Segment]], reference_compat: bool = False,
                    forward: str | None = None) -> tuple[float, int]:
    """Forward and backward of one optimizer step's batches; gradients add
    into .grad. Returns (the step's loss as defined in the module docstring,
    supervised tokens)."""
    counts = [sum(s.num_supervised for s in batch) for batch in batches]
    total = sum(counts)
    loss = 0.0
    for batch, count in zip(batches, counts):
        if count == 0:
            continue
        scale = count if reference_compat else total
        if use_fast(model, forward, reference_compat):
            from .fast import loss_sum

            ce = loss_sum(model, [(s.input_ids, s.labels) for s in batch if s.num_supervised])
            (ce / scale).backward()
            loss += float(ce.detach()) / scale
            continue
        for segment in batch:
            if segment.num_supervised == 0:
                continue
            ce = segment_loss_sum(model, segment)
            (ce / scale).backward()
            loss += float(ce.detach()) / scale
    return loss, total


def train_sft(model, examples: list[EncodedExample], config: SFTConfig | None = None,
              on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model`'s weaver on `examples`; returns one record per optimizer
    step ({"step", "loss", "lr", "grad_norm", "tokens", "seconds"}). `on_step`
    is called with each record after the step (e.g. to push weights to an
    engine with `llm.update_memgen_weights(model.to_checkpoint())`)."""
    config = config or SFTConfig()
    config.validate()
    examples = trainable_examples(examples)
    if not examples:
        raise ValueError("no example has a supervised token after truncation")
    params = freeze_for(model, "weaver")
    optimizer = make_optimizer(params, config.learning_rate, config.weight_decay)
    total = num_sft_steps(len(examples), config)
    scheduler = make_scheduler(optimizer, config.lr_scheduler, total, config.warmup_ratio, config.reference_compat)
    rng = random.Random(config.seed)
    turn_rng = random.Random(config.seed + 1)   # conversations' turns, apart from the shuffle's stream
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
            start = time.perf_counter()
            step_batches = []
            for _ in range(config.grad_accum):
                batch = next(stream, None)
                if batch is None:
                    break
                step_batches.append(plan_batch(model, batch, turn_rng))
            if not step_batches:
                break
            loss, tokens = accumulate_step(model, step_batches, config.reference_compat, config.forward)
            lr = scheduler.get_last_lr()[0]
            norm = clip_and_step(params.values(), optimizer, scheduler, config.max_grad_norm)
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                      "tokens": tokens, "seconds": time.perf_counter() - start}
            history.append(record)
            if on_step is not None:
                on_step(record)
    finally:
        model.eval()
    return history

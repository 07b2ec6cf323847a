"""MemGen as a `memgen.LatentPolicy` (docs/latent-policies.md): when the trigger
is consulted, when the weaver runs, when latents enter the reasoner. It uses
only the public policy API: two extra streams, hooks, actions. The engine builds
it (memgen_setup.py, MemGen's factory) and runs it for every request of an
`LLM(memgen=...)`; its `record` is the augmentation mask.

Each request has two extra streams beside the reasoner R: W the weaver (every
R position; input `reasoner_to_weaver(embedding)`, weaver LoRA) and T the
trigger (token positions without pad tokens, trigger LoRA); nothing is ever
recomputed (when they compute: `follow` below).

Per generated token i the request moves through at most three phases:
  DECIDE  on_token(i-1): T is asked to catch up to token i-1; R computes token
          i-1 in the same forward (speculatively). on_stream(T) queues the
          decision; on_hidden scores every queued one in one fused call: on SKIP
          token i is sampled at once from R's logits.
  WEAVE   on INSERT, W is asked to catch up and run the K query latents
          `LayerNorm(Q)*scale` as scratch rows (never cached) -> WAIT;
          on_stream(W) turns their post-norm states into K latents
          (weaver_to_reasoner).
  REASON  on_hidden returns Insert(latents): R (and W, which follows R) get the
          K positions; R computes them in one chunk and token i is sampled from
          the last one's logits.
Running example, K=2, prompt "a b \\n" with an inactive trigger (always insert):
  on_start: aug=[1]; W asked with scratch [q0 q1]
  step 1:   W rows a b \\n q0 q1, R rows a b \\n (one forward, LoRA per row)
            -> on_stream(W): latents l0 l1; on_hidden -> Insert: R = [a b \\n l0 l1]
  step 2:   R rows l0 l1 -> token 0 sampled from l1's logits
"""
from __future__ import annotations

import copy

import torch

from memgen.latent_policy import SAMPLE, WAIT, Insert, LatentPolicy, StreamSpec
from memgen.memory.delimiters import DelimiterTable
from memgen.memory.parts import INFERENCE, PROMPT, MemGenParts
from memgen.outputs import INSERT, NOT_CONSULTED

# Stream names (ctx.streams keys); the reasoner's is "R".
REASONER, WEAVER, TRIGGER = "R", "W", "T"


class _Scorer:
    """What every request's policy shares (one per engine): MemGen's tensors, the
    backend's fused trigger scoring and the decisions queued in this step."""

    def __init__(self, parts: MemGenParts, backend):
        self.parts = parts
        self.backend = backend
        self.queue: list[tuple[MemGenPolicy, torch.Tensor]] = []   # on_stream(T) -> scored at the next on_hidden

    def flush(self) -> None:
        items = [(p, h) for p, h in self.queue if p._alive()]   # requests aborted meanwhile drop out
        self.queue.clear()
        self.decide(items)

    def decide(self, items: list) -> None:
        """The trigger's decisions for (policy, trigger hidden) pairs, all in one
        call of the backend's fused scoring (Triton: one kernel, one sync)."""
        if not items:
            return
        temperature, uniforms = [], []
        for policy, _ in items:
            t = policy._trigger_temperature()
            temperature.append(t)
            # the request's next uniform, drawn only when it samples
            uniforms.append(float(torch.rand((), generator=policy._trigger_generator())) if t > 0 else 0.0)
        hidden = torch.stack([h for _, h in items])
        device = hidden.device
        decisions = self.backend.trigger_decisions(
            hidden, self.parts.head_weight, self.parts.head_bias,
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(uniforms, dtype=torch.float32, device=device)).tolist()
        for (policy, _), decision in zip(items, decisions):
            policy._apply_decision(decision)


class MemGenPolicy(LatentPolicy):
    """MemGen's inference. Built once per checkpoint version by `MemGenCheckpoints`
    (memgen_setup.py); the engine runs a copy per request (`new_request`). Its
    per-request `record` is the augmentation mask (one entry per output token: 1
    insert, 0 skip, -100 not consulted); `num_trigger_calls` counts the trigger's
    decisions; `checkpoint` is (name, version), reported in the request's metrics."""

    def __init__(self, parts: MemGenParts, delimiters: DelimiterTable, tokenizer, pad_token_id: int | None,
                 backend, follow: bool = False, checkpoint: tuple[str, int] = ("memgen", 0)):
        self._scorer = _Scorer(parts, backend)
        self.checkpoint = checkpoint
        # follow=False (lazy): W and T catch up only when a decision or latents are due, in one
        # chunk. follow=True: while a request may still insert, they take their new row in every
        # step beside R's: the same rows, but decode-shaped steps (CUDA graphs replay them, and on
        # a memory-bound GPU the extra rows ride along with the weight reads).
        self.follow = follow
        self.delimiters = delimiters
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.streams = (
            StreamSpec(WEAVER, input_projection=self._to_weaver, follow="all"),
            StreamSpec(TRIGGER, follow="tokens", skip_token_ids=() if pad_token_id is None else (pad_token_id,)),
        )
        self.record = []

    records_augmentation = True     # the outputs' augmentation is this record

    def metrics(self) -> dict:
        name, version = self.checkpoint
        return {"num_trigger_calls": self.num_trigger_calls, "memgen_checkpoint": name, "memgen_version": version}

    @property
    def parts(self) -> MemGenParts:
        return self._scorer.parts

    @parts.setter
    def parts(self, parts: MemGenParts) -> None:
        self._scorer.parts = parts      # a live weight update reaches every request at once

    def _to_weaver(self, x: torch.Tensor) -> torch.Tensor:
        """W's input: reasoner-space embeddings (tokens, inserted latents) -> weaver space."""
        return self._scorer.parts.to_weaver(x)

    # ---- per request --------------------------------------------------------------
    def new_request(self, prompt_token_ids: list[int]) -> MemGenPolicy:
        policy = copy.copy(self)
        policy.record = []
        policy.kind = PROMPT                # which query latents the next weave uses
        policy.num_inference_insertions = 0     # counted against max_inference_aug_num
        policy.num_trigger_calls = 0
        policy.deciding = False             # T asked: a decision is due when it delivers
        policy.weaving = False              # W asked for the query latents
        policy.latents = None               # woven, inserted at the next on_hidden
        policy._generator = None
        return policy

    def on_start(self, ctx) -> None:
        self._ctx = ctx
        self._weaver, self._trigger = ctx.streams[WEAVER], ctx.streams[TRIGGER]
        self._set_following()
        self._consult(is_prompt=True)

    def on_token(self, ctx, token_id: int) -> None:
        if not ctx.finished:                # no decision after the last token
            self._consult(is_prompt=False)

    def on_stream(self, ctx, name: str, hidden) -> None:
        if name == TRIGGER:
            self._scorer.queue.append((self, hidden))
            return
        latents = self.parts.to_reasoner(hidden)
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                f"the weaver produced non-finite latents for request {ctx.request_index} (at generated token "
                f"{len(ctx.output_token_ids)}): the checkpoint's weights or the dtype's range are broken; "
                "try dtype='float32'")
        self.weaving, self.latents = False, latents

    def on_hidden(self, ctx, hidden):
        if self.deciding:
            self._scorer.flush()            # this request's decision and every other queued one
        if self.latents is not None:
            latents, self.latents = self.latents, None
            return Insert(latents)          # R's next logits come from the last latent
        return WAIT if self.weaving else SAMPLE

    # ---- decisions ----------------------------------------------------------------
    def _set_following(self) -> None:
        """In follow mode, W and T compute in every step while insertions remain."""
        if not self.follow:
            return
        left = self.num_inference_insertions < self.parts.max_inference_aug_num
        self._weaver.follow = left
        self._trigger.follow = left and self.parts.trigger_active

    def _consult(self, is_prompt: bool) -> None:
        """Who is consulted before the next token (spec §2.2 (a)), decided here only (the
        prompt; a delimiter while the budget lasts): nobody, the trigger's head at once (no
        forward needed), or T asked to catch up. The backend only scores (_Scorer.decide)."""
        parts = self.parts
        if not is_prompt:
            if self.num_inference_insertions >= parts.max_inference_aug_num or not self._ends_with_delimiter():
                self.record.append(NOT_CONSULTED)
                return
        self.kind = PROMPT if is_prompt else INFERENCE
        if not parts.trigger_active:
            self._scorer.decide([(self, parts.head_input)])   # the constant head reads nothing
            return
        last = self._trigger.last_hidden
        if last is not None:                # nothing new for T (e.g. a pad token)
            self._scorer.decide([(self, last)])
            return
        self.deciding = True
        self._trigger.compute()

    def _alive(self) -> bool:
        try:
            return not self._ctx.finished
        except RuntimeError:        # its request is gone
            return False

    def _ends_with_delimiter(self) -> bool:
        """The reference decodes prompt + output; the table answers from the last id."""
        ctx = self._ctx
        last = ctx.output_token_ids[-1]
        if not self.delimiters.needs_context[last]:
            return bool(self.delimiters.ends_with_delimiter[last])
        return self.delimiters.is_delimiter_end(ctx.prompt_token_ids + ctx.output_token_ids, self.tokenizer)

    def _trigger_temperature(self) -> float:
        """The trigger's sampling temperature; 0 means argmax (ties -> skip)."""
        params = self._ctx.params
        if not params.trigger_sample:
            return 0.0
        temperature = params.trigger_temperature if params.trigger_temperature is not None else params.temperature
        return max(float(temperature), 0.0)

    def _trigger_generator(self) -> torch.Generator:
        """The trigger samples on the CPU from the request's own seeded stream."""
        if self._generator is None:
            seed = int(self._ctx.generator.initial_seed()) ^ 0x5EED
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator

    def _apply_decision(self, decision: int) -> None:
        self.deciding = False
        ctx = self._ctx
        k = self.parts.num_latents(self.kind) if decision == INSERT else 0
        # Out of room (ctx.room_for, the engine's rule) the request ends ("length") before that
        # token: the decision is not recorded (one mask entry per output token), nor counted.
        if k and not ctx.room_for(k):
            ctx.finish()
            return
        self.record.append(decision)
        self.num_trigger_calls += self.parts.trigger_active
        if decision != INSERT:
            return
        if self.kind == INFERENCE:
            self.num_inference_insertions += 1
            self._set_following()
        if k == 0:  # counted, nothing to insert (see hf/DIFFERENCES.md)
            return
        self._weaver.compute(scratch=self.parts.queries[self.kind])
        self.weaving = True

"""MemGen's control flow inside the engine: when the trigger is consulted, when
the weaver runs, when latents enter the reasoner, and which rows are sampled.

Each MemGen sequence has three streams (engine/sequence.py): R the reasoner
(tokens and inserted latents), W the weaver (R's positions, input
`reasoner_to_weaver(embedding)`, weaver LoRA) and T the trigger (token ids
without pad tokens, its own positions, trigger LoRA). W and T are lazy: they
only compute when a decision or latents are needed, and then catch up on every
position added since their last use in one chunk. Nothing is ever recomputed.

Per generated token i the sequence moves through at most three phases:
  DECIDE  T catches up to token i-1 and its head decides (skip/insert). R
          computes token i-1 in the same forward (speculatively): on SKIP its
          logits give token i at once.
  WEAVE   W catches up and runs the K query latents `LayerNorm(Q)*scale` at
          positions L..L+K-1 as *scratch*: their K/V go to the slots the K
          latents will occupy later, and the stream is cut back to L afterwards
          (they are never cached). Their post-norm states -> weaver_to_reasoner
          -> K latents, appended to R (and to W as ordinary pending positions).
  REASON  R computes its pending positions (token i-1 and/or the latents, one
          K-position prefill: no re-prefill) and token i is sampled from the
          last one's logits.
Running example, K=2, prompt "a b \\n" with an inactive trigger (always insert):
  attach:   aug=[1]; W = [a b \\n q0 q1] (scratch q), R = [a b \\n]  -> WEAVE
  step 1:   W rows a b \\n q0 q1, R rows a b \\n (one forward, LoRA per row)
            -> latents l0 l1; W = [a b \\n | l0 l1 pending], R = [a b \\n l0 l1]
  step 2:   R rows l0 l1 -> token 0 sampled from l1's logits
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from memgen.layers.attention import TorchSDPABackend
from memgen.memory.delimiters import DelimiterTable
from memgen.memory.parts import INFERENCE, PROMPT, MemGenParts

# Stream names (the engine's Sequence keys its streams by them). The controller
# works on the engine's Sequence/Stream objects without importing the engine:
# the engine creates the streams (it knows the pools) and passes them in.
REASONER, WEAVER, TRIGGER = "R", "W", "T"
ADAPTER_IDS = {REASONER: -1, WEAVER: 0, TRIGGER: 1}
NOT_CONSULTED, SKIP, INSERT = -100, 0, 1


class Phase(Enum):
    DECIDE = auto()
    WEAVE = auto()
    REASON = auto()


@dataclass
class MemGenState:
    phase: Phase = Phase.REASON
    kind: str = PROMPT                      # which query latents the next weave uses
    augmentation: list[int] = field(default_factory=list)
    num_inference_insertions: int = 0       # counted against max_inference_aug_num
    num_trigger_calls: int = 0
    num_latent_positions: int = 0
    r_hidden: torch.Tensor | None = None    # R's hidden at its last computed position
    t_hidden: torch.Tensor | None = None    # T's hidden at its last computed position
    query_hidden: dict[int, torch.Tensor] = field(default_factory=dict)   # scratch row -> W hidden
    new_latents: torch.Tensor | None = None # computed this step, inserted by commit()
    out_of_room: bool = False               # an insertion did not fit max_model_len: finish ("length")


class MemGenController:
    """Owns the MemGen state of every sequence; the engine calls it around each
    forward (see LLMEngine.step)."""

    def __init__(self, parts: MemGenParts, delimiters: DelimiterTable, tokenizer, pad_token_id: int | None,
                 reasoner_embed, max_model_len: int, backend=None, follow: bool = False):
        self.parts = parts
        # follow=False (lazy): W and T compute only when a decision or latents are due, each
        # catching up in one multi-row chunk. follow=True: while a sequence may still insert,
        # W and T take their one new row in every step beside R's. The same rows in all
        # (nothing is recomputed), but steps stay decode-shaped: CUDA graphs replay them, and
        # on a memory-bound GPU the extra rows ride along with the weight reads.
        self.follow = follow
        # the kernel backend's fused trigger scoring (torch: exact in the model's dtype)
        self.backend = backend if backend is not None else TorchSDPABackend()
        # the delimiter table on the engine's device, for the fused trigger scoring
        self._is_delim = delimiters.ends_with_delimiter.to(device=parts.head_weight.device, dtype=torch.bool)
        self.delimiters = delimiters
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.reasoner_embed = reasoner_embed      # token ids -> reasoner input embeddings
        self.max_model_len = max_model_len

    # ---- streams ----------------------------------------------------------------
    def stream_contents(self, prompt_token_ids: list[int]) -> dict[str, list[int]]:
        """Initial token ids of the W and T streams: W mirrors R, T drops pad ids."""
        return {WEAVER: list(prompt_token_ids),
                TRIGGER: [t for t in prompt_token_ids if t != self.pad_token_id]}

    def attach(self, seq) -> None:
        """Start a sequence whose W and T streams exist: take the prompt decision."""
        seq.streams[WEAVER].token_input = self.weaver_token_input
        seq.memgen = MemGenState()
        self._consult(seq, is_prompt=True)

    def weaver_token_input(self, token_ids: torch.Tensor) -> torch.Tensor:
        """W's input at token positions: reasoner_to_weaver(reasoner embedding)."""
        return self.parts.to_weaver(self.reasoner_embed(token_ids))

    def _set_phase(self, seq, phase: Phase) -> None:
        seq.memgen.phase = phase
        # R may always catch up (its positions are needed in every phase); W and T
        # when their phase asks for them, or at every step while the sequence may
        # still insert if they follow R (see `follow`)
        due = {REASONER}
        if phase is Phase.DECIDE:
            due.add(TRIGGER)
        elif phase is Phase.WEAVE:
            due.add(WEAVER)
        if self.follow and seq.memgen.num_inference_insertions < self.parts.max_inference_aug_num:
            due.add(WEAVER)
            if self.parts.trigger_active:
                due.add(TRIGGER)
        seq.due_streams = due

    # ---- decisions ----------------------------------------------------------------
    def _consult(self, seq, is_prompt: bool) -> None:
        """Decide what happens before the next token (spec §2.2 (a))."""
        state = seq.memgen
        if not is_prompt:
            budget_left = state.num_inference_insertions < self.parts.max_inference_aug_num
            if not budget_left or not self._ends_with_delimiter(seq):
                state.augmentation.append(NOT_CONSULTED)
                self._set_phase(seq, Phase.REASON)
                return
        state.kind = PROMPT if is_prompt else INFERENCE
        if self.parts.trigger_active:
            self._set_phase(seq, Phase.DECIDE)
            if seq.streams[TRIGGER].num_pending_tokens == 0 and state.t_hidden is not None:
                self._decide(seq, state.t_hidden)   # nothing new for T (e.g. a pad token)
        else:
            # the reference's inactive trigger: constant logits [0, 1]
            self._apply_decision(seq, self._decide_inactive(seq))

    def _ends_with_delimiter(self, seq) -> bool:
        """The reference decodes prompt + output; the table answers from the last id."""
        last = seq.output_token_ids[-1]
        if not self.delimiters.needs_context[last]:
            return bool(self.delimiters.ends_with_delimiter[last])
        return self.delimiters.is_delimiter_end(seq.prompt_token_ids + seq.output_token_ids, self.tokenizer)

    def _trigger_temperature(self, seq) -> float:
        """The trigger's sampling temperature; 0 means argmax (ties -> skip)."""
        params = seq.params
        if not params.trigger_sample:
            return 0.0
        temperature = params.trigger_temperature if params.trigger_temperature is not None else params.temperature
        return max(float(temperature), 0.0)

    def _uniform(self, seq, temperature: float) -> float:
        """The request's next trigger uniform, drawn only when it samples."""
        return float(torch.rand((), generator=_cpu_generator(seq))) if temperature > 0 else 0.0

    def _decide_inactive(self, seq) -> int:
        """The reference's inactive trigger: constant logits [0, 1], under the
        kernel's rule (insert iff u >= P(skip))."""
        temperature = self._trigger_temperature(seq)
        if temperature <= 0:
            return INSERT
        p_skip = 1.0 / (1.0 + math.exp(1.0 / temperature))
        return int(self._uniform(seq, temperature) >= p_skip)

    def _decide(self, seq, t_hidden: torch.Tensor) -> None:
        self._decide_batch([(seq, t_hidden)])

    def _decide_batch(self, items: list) -> None:
        """The trigger's decisions for every (sequence, T hidden) pair of a step in
        one call of the backend's fused scoring (Triton: one kernel, one sync)."""
        seqs = [seq for seq, _ in items]
        last, is_prompt, count, temperature, uniforms = [], [], [], [], []
        for seq in seqs:
            state = seq.memgen
            token = (seq.output_token_ids or seq.prompt_token_ids)[-1]
            last.append(token)
            # the host already settled the delimiter test where it needs the decoded text
            is_prompt.append(state.kind == PROMPT or bool(self.delimiters.needs_context[token]))
            count.append(state.num_inference_insertions)
            temperature.append(self._trigger_temperature(seq))
            uniforms.append(self._uniform(seq, temperature[-1]))
        hidden = torch.stack([h for _, h in items])
        device = hidden.device
        decisions = self.backend.trigger_decisions(
            hidden, self.parts.head_weight, self.parts.head_bias,
            torch.tensor(last, device=device), self._is_delim, torch.tensor(count, device=device),
            self.parts.max_inference_aug_num, torch.tensor(is_prompt, device=device),
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(uniforms, dtype=torch.float32, device=device)).tolist()
        for seq, decision in zip(seqs, decisions):
            if decision == NOT_CONSULTED:   # the host decided to consult: the two tests disagree
                raise RuntimeError(f"trigger scoring skipped request {seq.request_index}, which the host "
                                   "consulted: the delimiter table on the device is out of sync")
            self._apply_decision(seq, decision, scored=True)

    def _apply_decision(self, seq, decision: int, scored: bool = False) -> None:
        """`scored`: the trigger's head made the decision (it counts as a trigger call)."""
        state = seq.memgen
        k = self.parts.num_latents(state.kind) if decision == INSERT else 0
        # The room rule, decided here once: K latents are inserted only if they and the
        # token they precede fit in max_model_len (which counts every position). When
        # they do not, the sequence ends ("length") before that token: the decision is
        # not recorded (the mask has one entry per output token), nor counted anywhere.
        if k and seq.reasoner.num_tokens + k + 1 > self.max_model_len:
            state.out_of_room = True
            self._set_phase(seq, Phase.REASON)
            return
        state.augmentation.append(decision)
        state.num_trigger_calls += scored
        if decision != INSERT:
            self._set_phase(seq, Phase.REASON)
            return
        if state.kind == INFERENCE:
            state.num_inference_insertions += 1
        if k == 0:  # counted, nothing to insert (see hf/DIFFERENCES.md)
            self._set_phase(seq, Phase.REASON)
            return
        weaver = seq.streams[WEAVER]
        weaver.num_scratch = k
        weaver.append_embeds(self.parts.queries[state.kind], hash_keys=False)
        state.query_hidden.clear()
        self._set_phase(seq, Phase.WEAVE)

    # ---- around the forward ----------------------------------------------------------
    def after_forward(self, chunks, hidden_of_chunk) -> list:
        """Consume a step's hidden states (one [rows, H] tensor per chunk); return
        (sequence, R hidden) pairs whose next token is due now. Runs before the
        scheduler marks the chunks computed; commit() runs after it."""
        touched: dict = {}
        deciding = []
        for chunk, hidden in zip(chunks, hidden_of_chunk):
            seq, stream = chunk.seq, chunk.stream
            state = seq.memgen
            touched[seq.seq_id] = seq
            if stream.name == REASONER:
                if chunk.completes:
                    state.r_hidden = hidden[-1]
            elif stream.name == TRIGGER:
                if chunk.completes:
                    state.t_hidden = hidden[-1]
                    if state.phase is Phase.DECIDE:
                        deciding.append((seq, state.t_hidden))
            elif stream.name == WEAVER:
                self._collect_queries(seq, chunk, hidden)
        if deciding:
            self._decide_batch(deciding)
        # r_hidden is set only while R is caught up: a new token or latents clear it
        due = []
        for seq in touched.values():
            state = seq.memgen
            if state.phase is Phase.REASON and state.r_hidden is not None:
                due.append((seq, state.r_hidden))
                state.r_hidden = None
        return due

    def _collect_queries(self, seq, chunk, hidden: torch.Tensor) -> None:
        weaver = seq.streams[WEAVER]
        if weaver.num_scratch == 0:   # W following R: no query latents in this chunk
            return
        first_scratch = weaver.num_tokens - weaver.num_scratch
        for row, pos in enumerate(range(chunk.start, chunk.end)):
            if pos >= first_scratch:
                seq.memgen.query_hidden[pos - first_scratch] = hidden[row]
        if not chunk.completes or len(seq.memgen.query_hidden) < weaver.num_scratch:
            return
        h = torch.stack([seq.memgen.query_hidden[i] for i in range(weaver.num_scratch)])
        latents = self.parts.to_reasoner(h)
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                f"the weaver produced non-finite latents for request {seq.request_index} (at generated token "
                f"{seq.num_output_tokens}): the checkpoint's weights or the dtype's range are broken; "
                "try dtype='float32'")
        seq.memgen.new_latents = latents

    def commit(self, chunks) -> None:
        """After the scheduler marked the step's chunks computed: cut the weaver's
        scratch queries off and insert the new latents into R and W."""
        for chunk in chunks:
            seq = chunk.seq
            state = seq.memgen
            if chunk.stream.name != WEAVER or state.new_latents is None:
                continue
            latents, state.new_latents = state.new_latents, None
            weaver = seq.streams[WEAVER]
            weaver.drop_scratch()
            weaver.append_embeds(self.parts.to_weaver(latents))
            seq.reasoner.append_embeds(latents)
            state.num_latent_positions += latents.shape[0]
            state.query_hidden.clear()
            state.r_hidden = None   # R's next logits come from the last latent
            self._set_phase(seq, Phase.REASON)

    def after_token(self, seq, token_id: int) -> None:
        """A token was sampled and the sequence goes on: mirror it into W and T,
        then take the decision for the next token."""
        seq.streams[WEAVER].token_ids.append(token_id)
        if token_id != self.pad_token_id:
            seq.streams[TRIGGER].token_ids.append(token_id)
        self._consult(seq, is_prompt=False)


def _cpu_generator(seq) -> torch.Generator:
    """The trigger samples on the CPU from the request's own seeded stream."""
    gen = getattr(seq, "_trigger_generator", None)
    if gen is None:
        gen = torch.Generator().manual_seed(int(seq.generator.initial_seed()) ^ 0x5EED)
        seq._trigger_generator = gen
    return gen

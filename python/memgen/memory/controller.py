"""MemGen's control flow inside the engine: when the trigger is consulted, when
the weaver runs, when latents enter the reasoner, and which rows are sampled.
It is the engine's policy for MemGen requests (engine/policy.py has the
protocol; a plain LLM's policy is a few lines).

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
  start:    aug=[1]; W = [a b \\n q0 q1] (scratch q), R = [a b \\n]  -> WEAVE
  step 1:   W rows a b \\n q0 q1, R rows a b \\n (one forward, LoRA per row)
            -> latents l0 l1; W = [a b \\n | l0 l1 pending], R = [a b \\n l0 l1]
  step 2:   R rows l0 l1 -> token 0 sampled from l1's logits

The trigger rule is decided once: the host (`_consult`) decides who is
consulted (the prompt; a delimiter while the budget lasts, decoding the text
where a delimiter's meaning depends on context); the backend's fused scoring
only applies the 2-way head and turns it into a decision. An inactive trigger
is a constant head (weight 0, bias [0, 1]) scored the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from memgen.layers.backend import TorchBackend
from memgen.memory.delimiters import DelimiterTable
from memgen.memory.parts import INFERENCE, PROMPT, MemGenParts
from memgen.outputs import INSERT, NOT_CONSULTED

# Stream names (the engine's Sequence keys its streams by them). The controller
# works on the engine's Sequence/Stream objects without importing the engine:
# the engine creates the streams (it knows the pools) and passes them in.
REASONER, WEAVER, TRIGGER = "R", "W", "T"
ADAPTER_IDS = {REASONER: -1, WEAVER: 0, TRIGGER: 1}


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
    new_latents: torch.Tensor | None = None # computed this step, inserted after the chunk loop
    out_of_room: bool = False               # an insertion did not fit max_model_len: finish ("length")


class MemGenController:
    """Owns the MemGen state of every sequence; the engine calls it as its
    policy: start() once per request, after_forward() after each forward,
    after_tokens() after each sampling (see LLMEngine.step)."""

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
        self.backend = backend if backend is not None else TorchBackend()
        self.delimiters = delimiters
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.reasoner_embed = reasoner_embed      # token ids -> reasoner input embeddings
        self.max_model_len = max_model_len

    # ---- the policy protocol (engine/policy.py) ------------------------------------
    def stream_contents(self, prompt_token_ids: list[int]) -> dict[str, list[int]]:
        """Initial token ids of the W and T streams: W mirrors R, T drops pad ids."""
        return {WEAVER: list(prompt_token_ids),
                TRIGGER: [t for t in prompt_token_ids if t != self.pad_token_id]}

    def start(self, seq) -> None:
        """Start a sequence whose W and T streams exist: take the prompt decision."""
        seq.streams[WEAVER].token_input = self.weaver_token_input
        seq.memgen = MemGenState()
        self._decide_batch(self._consult(seq, is_prompt=True))

    def after_forward(self, chunks, hidden) -> tuple[list, torch.Tensor | None, list]:
        """Consume a step's hidden states (`hidden.chunk(i)`: chunk i's rows), after
        the scheduler marked the chunks computed. Returns (the sequences whose next
        token is due now, their R hidden rows, the sequences that end for room)."""
        touched: dict = {}
        deciding = []
        for i, chunk in enumerate(chunks):
            seq, stream = chunk.seq, chunk.stream
            state = seq.memgen
            touched[seq.seq_id] = seq
            if stream.name == REASONER:
                if chunk.completes:
                    state.r_hidden = hidden.last(i)
            elif stream.name == TRIGGER:
                if chunk.completes:
                    state.t_hidden = hidden.last(i)
                    if state.phase is Phase.DECIDE:
                        deciding.append((seq, state.t_hidden))
            elif stream.name == WEAVER:
                self._collect_queries(seq, chunk, hidden.chunk(i))
        self._decide_batch(deciding)
        for seq in touched.values():
            if seq.memgen.new_latents is not None:
                self._insert(seq)
        # r_hidden is set only while R is caught up: a new token or latents clear it
        due, rows, ended = [], [], []
        for seq in touched.values():
            state = seq.memgen
            if state.out_of_room:
                ended.append(seq)
            elif state.phase is Phase.REASON and state.r_hidden is not None:
                due.append(seq)
                rows.append(state.r_hidden)
                state.r_hidden = None
        return due, torch.stack(rows) if rows else None, ended

    def after_tokens(self, seqs, token_ids) -> list:
        """Tokens were sampled and these sequences go on: mirror each token into W
        and T, then take the decisions for the next tokens (those that need no
        forward in one scoring call). Returns the sequences that end for room."""
        now = []
        for seq, token_id in zip(seqs, token_ids):
            seq.streams[WEAVER].append_token(token_id)
            if token_id != self.pad_token_id:
                seq.streams[TRIGGER].append_token(token_id)
            now += self._consult(seq, is_prompt=False)
        self._decide_batch(now)
        return [seq for seq in seqs if seq.memgen.out_of_room]

    def weaver_token_input(self, token_ids: torch.Tensor) -> torch.Tensor:
        """W's input at token positions: reasoner_to_weaver(reasoner embedding)."""
        return self.parts.to_weaver(self.reasoner_embed(token_ids))

    # ---- decisions ----------------------------------------------------------------
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

    def _consult(self, seq, is_prompt: bool) -> list:
        """Who is consulted before the next token (spec §2.2 (a)), decided here only.
        Returns the (sequence, trigger hidden) pair to score now, if the decision
        needs no forward; otherwise T is scheduled (DECIDE) or nobody is consulted."""
        state = seq.memgen
        if not is_prompt:
            budget_left = state.num_inference_insertions < self.parts.max_inference_aug_num
            if not budget_left or not self._ends_with_delimiter(seq):
                state.augmentation.append(NOT_CONSULTED)
                self._set_phase(seq, Phase.REASON)
                return []
        state.kind = PROMPT if is_prompt else INFERENCE
        if not self.parts.trigger_active:
            return [(seq, self.parts.head_input)]      # the constant head reads nothing
        self._set_phase(seq, Phase.DECIDE)
        if seq.streams[TRIGGER].num_pending_tokens == 0 and state.t_hidden is not None:
            return [(seq, state.t_hidden)]              # nothing new for T (e.g. a pad token)
        return []

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

    def _decide_batch(self, items: list) -> None:
        """The trigger's decisions for (sequence, trigger hidden) pairs, all in one
        call of the backend's fused scoring (Triton: one kernel, one sync)."""
        if not items:
            return
        temperature, uniforms = [], []
        for seq, _ in items:
            t = self._trigger_temperature(seq)
            temperature.append(t)
            # the request's next uniform, drawn only when it samples
            uniforms.append(float(torch.rand((), generator=_cpu_generator(seq))) if t > 0 else 0.0)
        hidden = torch.stack([h for _, h in items])
        device = hidden.device
        decisions = self.backend.trigger_decisions(
            hidden, self.parts.head_weight, self.parts.head_bias,
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(uniforms, dtype=torch.float32, device=device)).tolist()
        for (seq, _), decision in zip(items, decisions):
            self._apply_decision(seq, decision)

    def _apply_decision(self, seq, decision: int) -> None:
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
        state.num_trigger_calls += self.parts.trigger_active
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

    # ---- weaving ----------------------------------------------------------------------
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

    def _insert(self, seq) -> None:
        """Cut the weaver's scratch queries off (the chunks are marked computed by
        now) and insert the new latents into R and W."""
        state = seq.memgen
        latents, state.new_latents = state.new_latents, None
        weaver = seq.streams[WEAVER]
        weaver.drop_scratch()
        weaver.append_embeds(self.parts.to_weaver(latents))
        seq.reasoner.append_embeds(latents)
        state.num_latent_positions += latents.shape[0]
        state.query_hidden.clear()
        state.r_hidden = None   # R's next logits come from the last latent
        self._set_phase(seq, Phase.REASON)


def _cpu_generator(seq) -> torch.Generator:
    """The trigger samples on the CPU from the request's own seeded stream."""
    gen = getattr(seq, "_trigger_generator", None)
    if gen is None:
        gen = torch.Generator().manual_seed(int(seq.generator.initial_seed()) ^ 0x5EED)
        seq._trigger_generator = gen
    return gen

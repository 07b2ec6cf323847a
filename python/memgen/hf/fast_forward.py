"""The teacher-forced MemGen forward of training (spec §3.1), computed with far
fewer FLOPs than sft.py's step-by-step forward and giving the same numbers
(tests/test_train_fast.py holds the two equal in float64).

What sft.py does for one row, at each insertion point j: run the weaver over
the WHOLE accumulated prefix (tokens and the latents inserted so far) plus
point j's query latents. What the weaver reads at point j is what it read at
point j - 1 without that point's queries, followed by the latents it produced
there and the tokens up to point j, at the same positions (the positions come
from the cumsum of the same mask). Attention is causal, so the weaver's keys
and values over that shared part are the same numbers at every later point.
Here they are computed once per row and kept, with their autograd graph, in a
cache; each point runs the weaver over its new slots and its K queries only,
then drops the queries from the cache.

    row:      t0 t1 t2 | t3 t4 , | t5 t6 .  | t7          (points: 3 prompt, 6 and 9 inference)
    reasoner: t0 t1 t2 P P t3 t4 , I I t5 t6 . I I t7
    weaver at point 3:  [t0 t1 t2] qP qP                  -> P P   (cache: t0 t1 t2)
    weaver at point 6:  (cache) [P P t3 t4 ,] qI qI       -> I I   (cache: + P P t3 t4 ,)
    weaver at point 9:  (cache) [I I t5 t6 .] qI qI       -> I I
    step-by-step: 3 + 2, then 10 + 2, then 15 + 2 weaver positions; here 3 + 2, 7 + 2, 5 + 2.

The reasoner runs once, as in sft.py, but in two parts: the tokens before the
first latent block (nothing trainable reaches them) under no_grad, then the
rest with that part as its cache, so the backward pass stops at the first
latent. Only the hidden states whose logits are read are returned (the
caller applies the LM head); the weaver's LM head is never computed.

Rows run together: each decoder call takes every row's new slots packed row
after row (no padding), runs the token-wise parts of the layers (norms,
projections, LoRA, MLP) on all of them at once and the attention row by row
over exactly that row's keys. Rows whose tokens before their first latent
block nest (a GRPO group's prompt; the turns of one conversation, whose
forwards are prefixes of it) share that prefix: its weaver and reasoner
passes run once and each row continues from its part of the same keys and
values (the gradient sums over the rows).

With LoRA dropout active (training mode, lora_dropout > 0) the weaver here
draws one dropout mask per position, shared by the later insertion points,
where sft.py (and the reference) redraws it over the whole prefix at every
point: the two are then different samples, not different numbers for the
same sample. Without dropout (eval mode, or lora_dropout 0) they are equal.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100
# decoders whose layers are x + attn(norm(x)), then x + mlp(norm(x)), with rotary positions and a final
# norm, and whose logits are the LM head's output (_Stream, lm_logits)
FAST_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


# ------------------------------------------------------------ insertion points
def ends_with_delimiter(tokenizer, ids: list[int], end: int, delimiters: tuple[str, ...], window: int = 8) -> bool:
    """Whether tokenizer.decode(ids[:end]) (special tokens kept) ends with one
    of `delimiters`, from a decode of the last few tokens only.

    The last character of a decode comes from the last tokens that decode to
    something; what a decoder does at the START of a text (drop a leading
    space, replace the tail bytes of a split UTF-8 character) never makes or
    removes a delimiter at its end. So the last `window` tokens answer, unless
    they decode to nothing; then the window doubles until they do or it
    reaches the start of the row."""
    start = max(0, end - window)
    while True:
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        if text or start == 0:
            return text.endswith(delimiters)
        start = max(0, start - (end - start))


def insertion_points(tokenizer, delimiters: tuple[str, ...], ids: list[int], supervised: list[bool],
                     limit: int) -> tuple[int, list[int]]:
    """(prompt point, inference points), what sft.insertion_points returns:
    the one i with supervised[i] and not supervised[i-1], and the first `limit`
    i with supervised[i - 1] and supervised[i] whose prefix ids[:i] decodes to
    a text ending with a delimiter. The scan stops at the `limit`-th."""
    prompt = [i for i in range(1, len(ids)) if supervised[i] and not supervised[i - 1]]
    if len(prompt) != 1:
        raise ValueError(f"one row needs exactly one start of supervision (a label after a -100 label), "
                         f"found {len(prompt)} at {prompt}")
    inference: list[int] = []
    for i in range(1, len(ids)):
        if len(inference) >= limit:
            break
        if supervised[i] and supervised[i - 1] and ends_with_delimiter(tokenizer, ids, i, delimiters):
            inference.append(i)
    return prompt[0], inference


# ------------------------------------------------------------------ row plans
@dataclass
class RowPlan:
    """One row of a teacher-forced forward: its tokens, attention mask, the
    points a latent block goes before (with K > 0), and the token indices t
    whose logit row (the prediction of token t + 1) is read."""
    ids: list[int]
    mask: list[int]
    points: list[int]
    kinds: list[str]          # "prompt" | "inference", one per point
    reads: list[int]
    prompt_point: int
    inference_points: list[int]


def plan_row(model, ids: list[int], labels: list[int], mask: list[int] | None = None) -> RowPlan:
    """The plan of one row as sft_forward would run it: insertion points from
    the labels (spec §3.1), reads at every supervised label after the first token."""
    if len(labels) != len(ids):
        raise ValueError(f"labels ({len(labels)}) must match input_ids ({len(ids)})")
    mask = [1] * len(ids) if mask is None else [int(m) for m in mask]
    supervised = [t != IGNORE for t in labels]
    prompt, inference = insertion_points(model.tokenizer, tuple(model.delimiters), ids, supervised,
                                         model.settings.max_inference_aug_num)
    points, kinds = [], []
    for point in sorted([prompt, *inference]):
        kind = "prompt" if point == prompt else "inference"
        if getattr(model, f"{kind}_query_latents").shape[0] > 0:
            points.append(point)
            kinds.append(kind)
    reads = [t for t in range(len(ids) - 1) if supervised[t + 1]]
    return RowPlan(list(ids), mask, points, kinds, reads, prompt, inference)


# ------------------------------------------------------------ decoder streams
def supports_fast_forward(model) -> str | None:
    """None when the fast forward applies to `model`, else why not."""
    for role in ("reasoner", "weaver", "trigger"):
        config = getattr(model, role).config
        if config.model_type not in FAST_MODEL_TYPES:
            return f"the {role} is a {config.model_type!r} model (fast forward: {', '.join(FAST_MODEL_TYPES)})"
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()) \
                or getattr(config, "use_sliding_window", False) \
                or (config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None):
            return f"the {role} has sliding-window layers"
        if getattr(config, "attention_dropout", 0.0):
            return f"the {role} has attention dropout"
    return None


class _Stream:
    """Rows of one decoder (a CausalLM, or a PEFT model around one) fed slot by slot.

    State, per row: every layer's keys and values of the row's slots so far
    [kv heads, T, head dim] (concatenated, never written in place, so
    autograd flows through them; rows that share a prefix hold views of one
    tensor); which of those slots later slots may attend (`valid`: attention
    mask 1); how many such slots there are (`count`, from which positions
    follow as positions_from_mask computes them).

    run() takes the new slots of all rows PACKED, row after row ([N, H], no
    padding), runs the token-wise parts of every layer (norms, projections,
    LoRA, MLP) on them at once and the attention row by row over exactly that
    row's keys. The layer is the one all FAST_MODEL_TYPES share:
        h = h + o_proj(attention(rope(q_proj(n1(h))), rope(k_proj(n1(h))), v_proj(n1(h))))
        h = h + mlp(n2(h));   out = norm(h)
    (Qwen3 normalises q and k per head before the rope)."""

    def __init__(self, causal_lm, batch: int, device):
        base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        body = base.get_decoder()
        self.layers = list(body.layers[: body.config.num_hidden_layers])
        self.norm, self.rotary = body.norm, body.rotary_emb
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.device = device
        self.keys: list[list[Tensor | None]] = [[None] * batch for _ in self.layers]
        self.values: list[list[Tensor | None]] = [[None] * batch for _ in self.layers]
        self.valid = [torch.zeros(0, dtype=torch.bool, device=device) for _ in range(batch)]
        self.count = [0] * batch

    @property
    def rows(self) -> int:
        return len(self.count)

    def positions(self, lengths: list[int], valid: Tensor) -> Tensor:
        """positions_from_mask continued over new packed slots: a valid slot
        takes its row's count of valid slots before it; a masked one 0."""
        out, start = [], 0
        for b, n in enumerate(lengths):
            v = valid[start:start + n]
            out.append(torch.where(v, self.count[b] + v.long().cumsum(0) - 1, 0))
            start += n
        return torch.cat(out) if out else valid.long()

    def _mask(self, b: int, new_valid: Tensor) -> Tensor | None:
        """[n, T + n] bool: what row b's new slots attend (None: plain causal)."""
        past, n = self.valid[b], new_valid.shape[0]
        if past.shape[0] == 0 and bool(new_valid.all()):
            return None
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        # a query attends the earlier slots whose mask is 1 (its own mask does not matter, as in
        # transformers' masks); one with none (a leading masked token) sees itself: no NaN
        mask = torch.cat([past[None, :].expand(n, -1), new_valid[None, :] & causal], dim=1)
        alone = (~mask.any(1)).nonzero().view(-1)
        mask[alone, past.shape[0] + alone] = True
        return mask

    def run(self, x: Tensor, lengths: list[int], valid: Tensor, positions: Tensor,
            keep: Tensor | None = None) -> Tensor:
        """New slots x [N, H], lengths[b] of them for row b in turn; valid [N]
        (attention mask 1), positions [N]. Returns the final hidden states
        [N, H], or with keep [N] those of the kept slots in order (the last
        layer's MLP runs on those only)."""
        n = x.shape[0]
        bounds, start = [], 0
        for m in lengths:
            bounds.append((start, start + m))
            start += m
        masks = [self._mask(b, valid[s:e]) if e > s else None for b, (s, e) in enumerate(bounds)]
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0], sin[0]
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q = attn.q_proj(a).view(n, -1, self.head_dim)
            k = attn.k_proj(a).view(n, -1, self.head_dim)
            v = attn.v_proj(a).view(n, -1, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rope(q, k, cos, sin, unsqueeze_dim=1)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)     # [heads, N, d]
            outs = []
            for b, (s, e) in enumerate(bounds):
                if e == s:
                    continue
                kb, vb = k[:, s:e], v[:, s:e]
                if self.keys[i][b] is not None:
                    kb = torch.cat([self.keys[i][b], kb], dim=1)
                    vb = torch.cat([self.values[i][b], vb], dim=1)
                self.keys[i][b], self.values[i][b] = kb, vb
                mask = masks[b]
                ob = torch.nn.functional.scaled_dot_product_attention(
                    q[None, :, s:e], kb[None], vb[None], attn_mask=None if mask is None else mask[None, None],
                    is_causal=mask is None, scale=self.scaling, enable_gqa=q.shape[0] != kb.shape[0])[0]
                outs.append(ob)
            o = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1)
            if i == last and keep is not None:
                o, h = o[keep], h[keep]
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for b, (s, e) in enumerate(bounds):
            self.valid[b] = torch.cat([self.valid[b], valid[s:e]])
            self.count[b] += int(valid[s:e].sum())
        return self.norm(h)

    def drop_last(self, n: int) -> None:
        """Forget every row's last n slots (a point's query latents)."""
        for i in range(len(self.layers)):
            self.keys[i] = [t[:, :-n] for t in self.keys[i]]
            self.values[i] = [t[:, :-n] for t in self.values[i]]
        self.count = [c - int(v[-n:].sum()) for c, v in zip(self.count, self.valid)]
        self.valid = [v[:-n] for v in self.valid]

    def first_rows(self, n: int) -> None:
        for i in range(len(self.layers)):
            self.keys[i], self.values[i] = self.keys[i][:n], self.values[i][:n]
        self.valid, self.count = self.valid[:n], self.count[:n]

    def share(self, visible: list[int]) -> None:
        """One row -> len(visible) rows continuing from the same slots (views of
        one tensor: the gradient sums over the rows); row i sees the first
        visible[i] of them."""
        for i in range(len(self.layers)):
            k, v = self.keys[i][0], self.values[i][0]
            self.keys[i] = [k[:, :m] for m in visible]
            self.values[i] = [v[:, :m] for m in visible]
        valid = self.valid[0]
        self.valid = [valid[:m] for m in visible]
        self.count = [int(v.sum()) for v in self.valid]


def _pack(chunks: list[Tensor], masks: list[list[int]], device, tail: Tensor | None = None):
    """Rows' new slots packed row after row for _Stream.run: (x [N, H],
    lengths, valid [N]). tail [B, k, H] (optional): k more slots at the end of
    every row."""
    k = 0 if tail is None else tail.shape[1]
    parts, flags, lengths = [], [], []
    for b, (c, m) in enumerate(zip(chunks, masks)):
        parts.append(c)
        flags += m
        if tail is not None:
            parts.append(tail[b])
            flags += [1] * k
        lengths.append(c.shape[0] + k)
    x = torch.cat(parts) if parts else None
    return x, lengths, torch.tensor(flags, dtype=torch.bool, device=device)


def _first(plan: RowPlan) -> int:
    """Index of the row's first latent block (its length when it has none)."""
    return plan.points[0] if plan.points else len(plan.ids)


def nested_prefix(plans: list[RowPlan]) -> bool:
    """Whether the rows' tokens before their first latent blocks are all
    prefixes of one row's (same ids, same mask): a GRPO group's prompt, or the
    turns of one conversation (spec §3.2), whose latents start at their turn."""
    if len(plans) < 2:
        return False
    longest = max(plans, key=_first)
    n = _first(longest)
    return n > 0 and len({pl.kinds[0] for pl in plans if pl.points}) <= 1 and all(
        pl.ids[:_first(pl)] == longest.ids[:_first(pl)] and pl.mask[:_first(pl)] == longest.mask[:_first(pl)]
        for pl in plans)


# ------------------------------------------------------------------ forward
def forward_rows(model, plans: list[RowPlan], share_prefix: bool | None = None) -> list[Tensor]:
    """The reasoner's final hidden states at each plan's read rows, [len(reads), Hr]
    per row: apply the LM head (lm_logits) for the logits sft_forward gives at
    those rows. share_prefix: run the tokens before the rows' first latent
    blocks once (they must nest, nested_prefix); None: when they nest."""
    if not plans:
        return []
    if share_prefix is None:
        share_prefix = nested_prefix(plans)
    elif share_prefix and not nested_prefix(plans):
        raise ValueError("share_prefix: the rows' tokens before their first latent blocks do not nest")
    device = model.device
    dtype = model.reasoner.get_input_embeddings().weight.dtype
    with torch.no_grad():
        embeds = [model.embed(torch.tensor(pl.ids, device=device)) for pl in plans]
    latents = _weave_rows(model, plans, embeds, share_prefix, device, dtype)
    return _reason_rows(model, plans, embeds, latents, share_prefix, device)


def _shared_stream(causal_lm, plans, x: Tensor, order: list[int], device, keep: Tensor | None = None):
    """A stream for nested rows: one pass over the longest shared prefix
    (x [L, H], its embeddings), then one row per plans[order[i]], each seeing
    its own part. Returns (stream, the pass's kept hidden states)."""
    longest = max(plans, key=_first)
    n = _first(longest)
    stream = _Stream(causal_lm, 1, device)
    valid = torch.tensor(longest.mask[:n], dtype=torch.bool, device=device)
    hidden = stream.run(x, [n], valid, stream.positions([n], valid),
                        keep=torch.zeros(n, dtype=torch.bool, device=device) if keep is None else keep)
    stream.share([_first(plans[b]) for b in order])
    return stream, hidden


def _weave_rows(model, plans, embeds, share_prefix, device, dtype) -> list[list[Tensor]]:
    """Each row's latent blocks [K, Hr], in point order (module docstring)."""
    order = sorted(range(len(plans)), key=lambda b: -len(plans[b].points))
    latents: list[list[Tensor]] = [[] for _ in plans]
    steps = len(plans[order[0]].points)
    if steps == 0:
        return latents
    if share_prefix:
        # the weaver reads reasoner_to_weaver of the shared tokens: one pass, then each row's queries
        longest = max(range(len(plans)), key=lambda b: _first(plans[b]))
        x = model.reasoner_to_weaver(embeds[longest][:_first(plans[longest])])
        stream, _ = _shared_stream(model.weaver, plans, x, order, device)
        done = [_first(pl) for pl in plans]
    else:
        stream = _Stream(model.weaver, len(plans), device)
        done = [0] * len(plans)
    for j in range(steps):
        rows = [b for b in order if len(plans[b].points) > j]
        kind = plans[rows[0]].kinds[j]
        if any(plans[b].kinds[j] != kind for b in rows):
            raise ValueError("rows disagree on the kind of their j-th latent block")
        if stream.rows > len(rows):
            stream.first_rows(len(rows))
        chunks, masks = [], []
        for b in rows:
            pl = plans[b]
            start = max(pl.points[j - 1] if j else 0, done[b])
            piece, mask = embeds[b][start:pl.points[j]], pl.mask[start:pl.points[j]]
            if j:
                piece = torch.cat([latents[b][j - 1], piece])
                mask = [1] * latents[b][j - 1].shape[0] + mask
            chunks.append(piece)
            masks.append(mask)
        q = model.query_latents(kind)
        k = q.shape[0]
        # reasoner_to_weaver on the packed tokens; each row's queries follow its tokens
        sizes = [c.shape[0] for c in chunks]
        packed = torch.cat(chunks)
        chunks = list(model.reasoner_to_weaver(packed).split(sizes)) if packed.shape[0] \
            else [packed.new_zeros(0, q.shape[1]) for _ in chunks]
        x, lengths, valid = _pack(chunks, masks, device, tail=q.unsqueeze(0).expand(len(rows), -1, -1))
        positions = stream.positions(lengths, valid)
        # the queries follow the largest position so far (weave(): positions.max() + 1), not the count
        is_query = torch.cat([torch.arange(m, device=device) >= m - k for m in lengths])
        for i, (start, m) in enumerate(zip(torch.tensor([0] + lengths).cumsum(0).tolist(), lengths)):
            counted = stream.count[i] + sum(masks[i])
            positions[start + m - k:start + m] = max(counted - 1, 0) + 1 + torch.arange(k, device=device)
        hidden = stream.run(x, lengths, valid, positions, keep=is_query)
        out = model.weaver_to_reasoner(hidden).to(dtype).view(len(rows), k, -1)
        stream.drop_last(k)
        for i, b in enumerate(rows):
            latents[b].append(out[i])
    return latents


def _reason_rows(model, plans, embeds, latents, share_prefix, device) -> list[Tensor]:
    """One reasoner pass over tokens and latents: the tokens before the first
    block without autograd, the rest with them as cache."""
    n = len(plans)
    firsts = [_first(pl) for pl in plans]
    # reads before the first block: token t's own hidden state, computed in part 1
    head_reads = [[t for t in pl.reads if t < firsts[b] and t + 1 not in pl.points] for b, pl in enumerate(plans)]
    # --- part 1: tokens before the first latent block, no autograd
    with torch.no_grad():
        if share_prefix:
            longest = max(range(n), key=lambda b: firsts[b])
            keep = torch.zeros(firsts[longest], dtype=torch.bool, device=device)
            for reads in head_reads:
                keep[reads] = True
            stream, head = _shared_stream(model.reasoner, plans, embeds[longest][:firsts[longest]],
                                          list(range(n)), device, keep)
            at = torch.cumsum(keep.long(), 0) - 1            # column -> index among the kept
            head_rows = [head[at[reads]] for reads in head_reads]
        else:
            stream = _Stream(model.reasoner, n, device)
            x, lengths, valid = _pack([embeds[b][:firsts[b]] for b in range(n)],
                                      [plans[b].mask[:firsts[b]] for b in range(n)], device)
            keep = torch.cat([torch.isin(torch.arange(firsts[b], device=device),
                                         torch.tensor(reads, dtype=torch.long, device=device))
                              for b, reads in enumerate(head_reads)])
            head = stream.run(x, lengths, valid, stream.positions(lengths, valid), keep=keep)
            head_rows = list(head.split([len(reads) for reads in head_reads]))
    # --- part 2: everything from the first latent block on
    pieces, masks, slot_of = [], [], []
    for b, pl in enumerate(plans):
        parts, mask, slots = [], [], {}
        start, pos = firsts[b], 0
        for j, point in enumerate(pl.points):
            if j:
                parts.append(embeds[b][start:point])
                mask += pl.mask[start:point]
                for t in range(start, point):
                    slots[t] = pos + t - start
                pos += point - start
            block = latents[b][j]
            parts.append(block)
            mask += [1] * block.shape[0]
            pos += block.shape[0]
            slots[point - 1] = pos - 1           # the row before a block reads its last latent
            start = point
        if pl.points:
            parts.append(embeds[b][start:])
            mask += pl.mask[start:]
            for t in range(start, len(pl.ids)):
                slots[t] = pos + t - start
        pieces.append(torch.cat(parts) if parts else embeds[b][:0])
        masks.append(mask)
        slot_of.append(slots)
    tail_reads = [[slot_of[b][t] for t in pl.reads if t in slot_of[b]] for b, pl in enumerate(plans)]
    tail_rows = [None] * n
    if any(p.shape[0] for p in pieces):
        x, lengths, valid = _pack(pieces, masks, device)
        keep = torch.cat([torch.isin(torch.arange(p.shape[0], device=device),
                                     torch.tensor(cols, dtype=torch.long, device=device))
                          for p, cols in zip(pieces, tail_reads)])
        tail = stream.run(x, lengths, valid, stream.positions(lengths, valid), keep=keep)
        # kept slots come back in packed order: row by row, by column
        tail_rows = list(tail.split([len(cols) for cols in tail_reads]))
    out = []
    for b, pl in enumerate(plans):
        # reads in token order: part 1's come first (they precede the first block)
        parts = [p for p in (head_rows[b], tail_rows[b]) if p is not None and p.shape[0]]
        out.append(torch.cat(parts) if parts else embeds[b].new_zeros(0, embeds[b].shape[1]))
    return out


def decoder_rows(causal_lm, ids: list[list[int]], masks: list[list[int]], reads: list[list[int]],
                 shared: int = 0) -> list[Tensor]:
    """Final hidden states of one plain pass of `causal_lm` over each row (its
    ids, attention mask; positions from the mask) at its reads (ascending),
    [len(reads), H] per row: what the model's own forward gives there, without
    its LM head. The first `shared` tokens (and mask) are the same in every
    row: they run once, with autograd (a GRPO group's prompt)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    embed = base.get_input_embeddings()
    device = embed.weight.device
    n = len(ids)
    if n < 2:
        shared = 0
    head_rows: list[Tensor | None] = [None] * n
    if shared:
        stream = _Stream(causal_lm, 1, device)
        valid = torch.tensor(masks[0][:shared], dtype=torch.bool, device=device)
        early = sorted({t for r in reads for t in r if t < shared})
        keep = torch.zeros(shared, dtype=torch.bool, device=device)
        keep[early] = True
        head = stream.run(embed(torch.tensor(ids[0][:shared], device=device)), [shared], valid,
                          stream.positions([shared], valid), keep=keep)
        at = {t: i for i, t in enumerate(early)}
        head_rows = [head[[at[t] for t in r if t < shared]] for r in reads]
        stream.share([shared] * n)
    else:
        stream = _Stream(causal_lm, n, device)
    pieces = [torch.tensor(row[shared:], dtype=torch.long, device=device) for row in ids]
    lengths = [p.shape[0] for p in pieces]
    out = [h for h in head_rows]
    if sum(lengths):
        x = embed(torch.cat(pieces))
        valid = torch.tensor([m for mask in masks for m in mask[shared:]], dtype=torch.bool, device=device)
        keep = torch.cat([torch.isin(torch.arange(shared, shared + m, device=device),
                                     torch.tensor(r, dtype=torch.long, device=device)) for m, r in zip(lengths, reads)])
        tail = stream.run(x, lengths, valid, stream.positions(lengths, valid), keep=keep)
        tails = tail.split([sum(1 for t in r if t >= shared) for r in reads])
        out = [t if h is None else torch.cat([h, t]) for h, t in zip(head_rows, tails)]
    return out


def lm_logits(causal_lm, hidden: Tensor) -> Tensor:
    """The LM head of a CausalLM (FAST_MODEL_TYPES apply no scaling after it)."""
    return causal_lm.get_output_embeddings()(hidden)

"""Continuous thought (Coconut) as a plain HF transformers loop with a KV cache:
the oracle of memgen.policies.ContinuousThought (tests/test_latent_policy.py)
and the baseline of bench/bench_continuous_thought.py. Greedy only.

Each step adds one position per row: a continuous thought (the last position's
post-norm hidden state, fed back as the next input embedding), the end marker's
embedding, or the embedding of the token just taken (argmax). A round of
`num_thoughts` thoughts and the end marker follows every start marker, at the
end of the prompt or sampled. Rows are prompts of equal length (no padding);
a finished row keeps taking positions that nobody reads, as in any batched
HF loop.
"""
from __future__ import annotations

import inspect

import torch


@torch.inference_mode()
def continuous_thought_generate(model, prompts: list[list[int]], start_token_id: int, end_token_id: int,
                                num_thoughts: int, max_new_tokens: int,
                                stop_token_ids: frozenset[int] | set[int] = frozenset()) -> list[list[int]]:
    """Greedy generation with continuous thought for a batch of equal-length
    prompts; returns each row's generated token ids (a stop id is included)."""
    from transformers import DynamicCache

    if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise ValueError("continuous_thought_generate: give one or more non-empty prompts of equal length")
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    decoder = model.get_decoder()
    end_embed = embed(torch.tensor([end_token_id], device=device))[0]
    rows = len(prompts)
    thoughts_left = [num_thoughts if p[-1] == start_token_id else 0 for p in prompts]
    end_due = [p[-1] == start_token_id for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * rows
    cache = DynamicCache()
    # transformers renamed the decoder's past_key_values to cache (the old name is deprecated)
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    inputs = embed(torch.tensor(prompts, device=device))
    while True:
        hidden = decoder(inputs_embeds=inputs, use_cache=True, **{cache_arg: cache}).last_hidden_state[:, -1]
        next_tokens = model.lm_head(hidden).argmax(dim=-1).tolist()
        step = []
        for r in range(rows):
            if done[r]:
                step.append(end_embed)            # a position nobody reads
            elif thoughts_left[r]:
                thoughts_left[r] -= 1
                step.append(hidden[r])
            elif end_due[r]:
                end_due[r] = False
                step.append(end_embed)
            else:
                token = next_tokens[r]
                outputs[r].append(token)
                if token in stop_token_ids or len(outputs[r]) >= max_new_tokens:
                    done[r] = True
                elif token == start_token_id:
                    thoughts_left[r], end_due[r] = num_thoughts, True
                step.append(embed(torch.tensor([token], device=device))[0])
        if all(done):
            return outputs
        inputs = torch.stack(step).unsqueeze(1)

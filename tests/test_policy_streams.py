"""Extra streams of a memgen.LatentPolicy (StreamSpec, ctx.streams, on_stream,
WAIT; docs/latent-policies.md): a weaver-like policy written against the public
API only (its own LoRA adapter and input projection on the reasoner's base,
scratch query rows, latents inserted into the reasoner) against a plain HF loop
with two KV caches in float64: batched and on a warm prefix cache, one at a
time and chunked, following the reasoner, under preemption. Then the API's refusals,
and MemGen itself running as a LatentPolicy."""
import copy

import pytest
import torch
from memgen import LLM, SAMPLE, Insert, LatentPolicy, SamplingParams
from memgen.checkpoint import LoraWeights
from memgen.latent_policy import WAIT, StreamSpec

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["Hello world, this is a small test.", "The quick brown fox", "1 2 3",
         "Question: what is 12 plus 30? Answer:"]
MAX_TOKENS = 12
K = 3                # scratch query rows per weave
MAX_WEAVES = 3       # weaves after the prompt's


class Weaving(LatentPolicy):
    """Before the first token, and before a token whose greedy choice is a multiple of
    3 (at most MAX_WEAVES times), the stream "aux" catches up and reads K query rows;
    their states, times `readout`, are inserted into the reasoner as K latents.
    `record`: per token, 1 if latents came right before it."""

    def __init__(self, lora, project, queries, readout, follow=False):
        self.streams = (StreamSpec("aux", adapter=lora, input_projection=project),)
        self.queries, self.readout, self.follow = queries, readout, follow

    def on_start(self, ctx):
        self.aux = ctx.streams["aux"]
        self.aux.follow = self.follow
        self.weaves_left, self.latents, self.waiting, self.just_inserted = MAX_WEAVES, None, True, False
        self.aux.compute(scratch=self.queries)      # rides along with the prompt

    def on_stream(self, ctx, name, hidden):
        assert name == "aux" and hidden.shape == (K, ctx.hidden_size)
        self.latents, self.waiting = hidden @ self.readout, False

    def on_hidden(self, ctx, hidden):
        if self.latents is not None:
            latents, self.latents, self.just_inserted = self.latents, None, True
            return Insert(latents)
        if self.waiting:
            return WAIT
        if not self.just_inserted and self.weaves_left and int(ctx.logits(hidden).argmax()) % 3 == 0:
            self.weaves_left -= 1
            self.aux.compute(scratch=self.queries)
            self.waiting = True
            return WAIT
        return SAMPLE

    def on_token(self, ctx, token_id):
        self.record.append(int(self.just_inserted))
        self.just_inserted = False


# ---- the oracle: two HF decoders with KV caches, LoRA added as PEFT does ------------------
def _with_lora(model, lora: LoraWeights):
    """A copy of `model` whose target Linears add ((x @ A.T) @ B.T) * scaling (PEFT's order)."""
    model = copy.deepcopy(model)
    for path, (a, b) in lora.layers.items():
        module = model.get_submodule(path)
        module.register_forward_hook(lambda m, inp, out, a=a, b=b: out + (inp[0] @ a.T) @ b.T * lora.scaling)
    return model


def _weave_hf(base, aux_model, prompt, project, queries, readout, latents_log=None):
    """The weave as an HF loop: (tokens, record); `latents_log`, a list, gets every
    inserted [K, H] block (for checks finer than the tokens)."""
    import inspect

    from transformers import DynamicCache

    embed = base.get_input_embeddings()
    r_dec, a_dec = base.get_decoder(), aux_model.get_decoder()
    arg = "cache" if "cache" in inspect.signature(r_dec.forward).parameters else "past_key_values"
    r_cache, a_cache = DynamicCache(), DynamicCache()

    def run(decoder, cache, x):
        return decoder(inputs_embeds=x[None], use_cache=True, **{arg: cache}).last_hidden_state[0]

    with torch.inference_mode():
        pending = project(embed(torch.tensor(prompt)))      # aux inputs not computed yet
        h = run(r_dec, r_cache, embed(torch.tensor(prompt)))[-1]

        def weave():
            nonlocal pending
            states = run(a_dec, a_cache, torch.cat([pending, queries]))[-K:]
            a_cache.crop(-K)                                 # the queries' K/V are never kept
            latents = states @ readout
            if latents_log is not None:
                latents_log.append(latents.clone())
            pending = project(latents)
            return run(r_dec, r_cache, latents)[-1]

        h, inserted, weaves_left, tokens, record = weave(), True, MAX_WEAVES, [], []
        while len(tokens) < MAX_TOKENS:
            logits = base.lm_head(h)
            if not inserted and weaves_left and int(logits.argmax()) % 3 == 0:
                weaves_left -= 1
                h, inserted = weave(), True
                continue
            token = int(logits.argmax())
            tokens.append(token)
            record.append(int(inserted))
            inserted = False
            x = embed(torch.tensor([token]))
            pending = torch.cat([pending, project(x)])
            h = run(r_dec, r_cache, x)[-1]
    return tokens, record


@pytest.fixture(scope="module")
def case(llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    cfg = base.config
    h, g = cfg.hidden_size, torch.Generator().manual_seed(7)
    layers = {}
    for i in range(cfg.num_hidden_layers):
        for name, (n_in, n_out) in {"self_attn.q_proj": (h, h), "self_attn.v_proj":
                                    (h, cfg.num_key_value_heads * (h // cfg.num_attention_heads)),
                                    "mlp.down_proj": (cfg.intermediate_size, h)}.items():
            layers[f"model.layers.{i}.{name}"] = (torch.randn(4, n_in, generator=g, dtype=torch.float64) * 0.3,
                                                  torch.randn(n_out, 4, generator=g, dtype=torch.float64) * 0.3)
    lora = LoraWeights(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"], layers=layers)
    weight = torch.eye(h, dtype=torch.float64) + 0.2 * torch.randn(h, h, generator=g, dtype=torch.float64)
    project = lambda x: x @ weight
    queries = torch.randn(K, h, generator=g, dtype=torch.float64)
    readout = torch.randn(h, h, generator=g, dtype=torch.float64) * 0.5
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    aux = _with_lora(base, lora)
    expected = [_weave_hf(base, aux, p, project, queries, readout) for p in prompts]
    return prompts, (lora, project, queries, readout), expected


def _run(llm, prompts, parts, follow=False):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            latent_policy=Weaving(*parts, follow=follow))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.policy_record) for o in outs], outs


def check_weaving_run(llm, prompts, expected, got, outs, rerun) -> None:
    """A weaving run equals the HF loop's, is not trivial (weaves after the prompt's
    happened and changed the tokens), counts its latent positions, and `rerun()` on the
    warm prefix cache gives the same (the stream's blocks are keyed apart from R's)."""
    assert got == expected
    assert sum(sum(r) for _, r in expected) > len(prompts)
    plain = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                        ignore_eos=True), use_tqdm=False)]
    assert [t for t, _ in got] != plain
    for out, (_, record) in zip(outs, expected):
        assert out.metrics["num_latent_positions"] == K * sum(record)
    again, outs = rerun()
    assert again == expected
    assert sum(o.metrics["num_cached_prompt_tokens"] for o in outs) > 0


def test_a_weaving_policy_matches_the_hf_loop_batched(llama_dir, case):
    prompts, parts, expected = case
    llm = LLM(llama_dir, dtype="float64")
    got, outs = _run(llm, prompts, parts)
    check_weaving_run(llm, prompts, expected, got, outs, lambda: _run(llm, prompts, parts))
    assert not llm.engine.runtime.latent_requests
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_a_weaving_policy_one_at_a_time_chunked_and_following(llama_dir, case):
    prompts, parts, expected = case
    llm = LLM(llama_dir, dtype="float64", max_num_batched_tokens=5)     # chunks of at most 5 rows
    for prompt, want in zip(prompts, expected):
        assert _run(llm, [prompt], parts)[0] == [want]
    # the stream computing its new positions in every step: the same tokens
    assert _run(LLM(llama_dir, dtype="float64"), prompts, parts, follow=True)[0] == expected


def test_a_weaving_policy_under_preemption_with_prefix_caching(llama_dir, case):
    prompts, parts, expected = case
    longest = max(len(p) + len(t) + K * sum(r) for p, (t, r) in zip(prompts, expected))
    per_stream = -(-(longest + K) // 4)
    # room for one sequence's two streams, far less than the batch needs
    blocks = 2 * per_stream + 1
    llm = LLM(llama_dir, dtype="float64", block_size=4, max_model_len=4 * per_stream, num_kv_blocks=blocks)
    got, outs = _run(llm, prompts, parts)
    assert got == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.metrics["num_preemptions"] and o.metrics["num_latent_positions"] for o in outs)
    assert _run(llm, prompts, parts)[0] == expected
    manager = llm.engine.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm.engine.runtime.latent_requests


# ---- what the API refuses -------------------------------------------------------------
class Misuse(LatentPolicy):
    streams = (StreamSpec("side"),)

    def __init__(self, how):
        self.how = how

    def on_hidden(self, ctx, hidden):
        side = ctx.streams["side"]
        if self.how == "wait":
            return WAIT
        if self.how == "twice":
            side.compute()
            side.compute()
        if self.how == "bad rows":
            side.compute(scratch=hidden)
        if self.how == "nothing pending":
            side.compute()
            return WAIT     # computes the prompt; the next on_hidden asks again with nothing new
        return SAMPLE


@pytest.mark.parametrize("how, error, match", [
    ("wait", ValueError, "returned WAIT but no stream"),
    ("twice", RuntimeError, "already asked"),
    ("bad rows", ValueError, "scratch rows must be a tensor of shape"),
    ("nothing pending", ValueError, "nothing to compute"),
])
def test_misuse_raises_and_the_engine_serves_on(llama_dir, how, error, match):
    llm = LLM(llama_dir, dtype="float64")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, latent_policy=Misuse(how))
    with pytest.raises(error, match=match):
        llm.generate([[5, 6, 7], [8, 9]], [SamplingParams(temperature=0.0, max_tokens=4), params], use_tqdm=False)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.engine.has_unfinished()
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)[0].token_ids


def test_stream_specs_are_checked():
    with pytest.raises(ValueError, match="other than 'R'"):
        StreamSpec("R")
    with pytest.raises(ValueError, match="follow"):
        StreamSpec("x", follow="latents")


# ---- MemGen is a LatentPolicy ---------------------------------------------------------
def test_memgen_runs_as_a_latent_policy(memgen_reasoner_dir, memgen_active_ckpt_dir):
    llm = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float64")
    assert isinstance(llm.memgen.get().policy, LatentPolicy)
    assert [s.name for s in llm.memgen.get().policy.streams] == ["W", "T"]
    outs = llm.generate(["What is 12 plus 30?", "Hello. Then, go"], SamplingParams(temperature=0.0, max_tokens=12),
                        use_tqdm=False)
    for out in outs:
        assert out.policy_record == out.augmentation      # its record is the augmentation mask
    assert any(out.metrics["num_latent_positions"] for out in outs)

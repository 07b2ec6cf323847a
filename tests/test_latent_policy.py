"""memgen.LatentPolicy (docs/latent-policies.md): the hooks, the actions, the
room rule and the outputs; continuous thought (memgen.policies) against a
plain HF loop with a KV cache in float64, batched, one at a time, under
preemption and with prefix caching; the guide's soft-thinking example against
its own HF loop."""
from pathlib import Path

import pytest
import torch
from memgen import LLM, SAMPLE, Feed, Insert, LatentPolicy, SamplingParams
from memgen.hf.continuous_thought import continuous_thought_generate
from memgen.policies import ContinuousThought

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = [
    "Hello world, this is a small test.",
    "The quick brown fox",
    "Solve the math problem with proper reasoning, and put the answer in a box. We add the numbers,",
    "1 2 3",
    "Question: what is 12 plus 30? Answer:",
]
MAX_TOKENS = 14
NUM_THOUGHTS = 3
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "latent-policies.md"


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float64", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def thought_case(llm, hf_model):
    """Prompts, markers and the HF loop's tokens (one prompt at a time). The start
    marker is the token plain greedy decoding of prompt 0 samples third, so that
    prompt starts thinking mid-generation; two prompts end with the marker."""
    ids = [llm.tokenizer(t)["input_ids"] for t in TEXTS]
    plain = [o.token_ids for o in llm.generate(ids, greedy(), use_tqdm=False)]
    start = plain[0][2]
    assert start not in plain[0][:2]
    end = 7 if start != 7 else 8
    prompts = ids + [ids[1] + [start], ids[3] + [start]]
    policy = ContinuousThought(start, end, NUM_THOUGHTS)
    expected = [continuous_thought_generate(hf_model, [p], start, end, NUM_THOUGHTS, MAX_TOKENS)[0]
                for p in prompts]
    return prompts, policy, expected, plain


def _tokens(llm, prompts, policy):
    outs = llm.generate(prompts, greedy(latent_policy=policy), use_tqdm=False)
    return [o.token_ids for o in outs], outs


def test_continuous_thought_matches_the_hf_loop_batched(llm, thought_case):
    prompts, policy, expected, plain = thought_case
    got, outs = _tokens(llm, prompts, policy)
    assert got == expected
    # the case is not trivial: thoughts changed prompt 0 after its start marker, and
    # the prompts that end with the marker think before their first token
    assert got[0][:3] == plain[0][:3] and got[0] != plain[0]
    assert outs[0].policy_record[3] == NUM_THOUGHTS and outs[0].policy_record[:3] == [0, 0, 0]
    for out in outs[-2:]:
        assert out.policy_record[0] == NUM_THOUGHTS
    for out in outs:
        record = out.policy_record
        assert len(record) == len(out.token_ids)
        rounds = sum(1 for r in record if r)
        assert out.metrics["num_latent_positions"] == NUM_THOUGHTS * rounds
        assert out.metrics["num_fed_tokens"] == rounds


def test_the_hf_loop_batched_equals_one_at_a_time(llm, hf_model, thought_case):
    """The benchmark's baseline runs the HF loop at batch 8 (equal-length prompts)."""
    prompts, policy, _, _ = thought_case
    n = min(len(p) for p in prompts)
    batch = [p[:n] for p in prompts[:4]] + [prompts[0][:n - 1] + [policy.start_token_id]]
    args = (policy.start_token_id, policy.end_token_id, NUM_THOUGHTS, MAX_TOKENS)
    alone = [continuous_thought_generate(hf_model, [p], *args)[0] for p in batch]
    assert continuous_thought_generate(hf_model, batch, *args) == alone
    assert _tokens(llm, batch, policy)[0] == alone


def test_continuous_thought_matches_the_hf_loop_one_at_a_time(llama_dir, thought_case):
    prompts, policy, expected, _ = thought_case
    llm = LLM(llama_dir, dtype="float64", enable_prefix_caching=False, max_num_batched_tokens=5)  # chunked too
    for prompt, want in zip(prompts, expected):
        assert _tokens(llm, [prompt], policy)[0] == [want]


def test_continuous_thought_under_preemption_with_prefix_caching(llama_dir, thought_case):
    prompts, policy, expected, _ = thought_case
    start = policy.start_token_id
    rounds = [(p[-1] == start) + out[:-1].count(start) for p, out in zip(prompts, expected)]
    longest = max(len(p) + len(out) + (NUM_THOUGHTS + 1) * r for p, out, r in zip(prompts, expected, rounds))
    # blocks of 4 positions: room for the longest sequence, far less than the batch needs
    blocks = -(-longest // 4)
    llm = LLM(llama_dir, dtype="float64", block_size=4, max_model_len=4 * blocks, num_kv_blocks=blocks)
    got, outs = _tokens(llm, prompts, policy)
    assert got == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics["num_preemptions"] for o in outs) == llm.engine.scheduler.num_preemptions
    # a request with continuous thoughts was preempted: its recompute re-ran them as embedding rows
    assert any(o.metrics["num_preemptions"] and o.metrics["num_latent_positions"] for o in outs)
    # again on the warm cache: prompt blocks are hits, the tokens the same
    again, outs = _tokens(llm, prompts, policy)
    assert again == expected
    assert sum(o.metrics["num_cached_prompt_tokens"] for o in outs) > 0
    manager = llm.engine.block_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm.engine.runtime.latent_requests


# ---- the actions, the room rule, the outputs ---------------------------------------
class FeedAt(LatentPolicy):
    """Feeds (or inserts the embeddings of) `ids` once, before output token `at`."""

    def __init__(self, ids, at=0, insert=False):
        self.ids, self.at, self.insert = ids, at, insert

    def on_start(self, ctx):
        self.done = False

    def on_hidden(self, ctx, hidden):
        if not self.done and len(ctx.output_token_ids) == self.at:
            self.done = True
            return Insert(ctx.embed(self.ids)) if self.insert else Feed(self.ids)
        return SAMPLE


def test_feed_and_inserted_token_embeddings_equal_a_longer_prompt(llm):
    prompt = llm.tokenizer(TEXTS[4])["input_ids"]
    extra = [40, 41, 42]
    longer = llm.generate([prompt + extra], greedy(), use_tqdm=False)[0].token_ids
    for insert in (False, True):
        out = llm.generate([prompt], greedy(latent_policy=FeedAt(extra, insert=insert)), use_tqdm=False)[0]
        assert out.token_ids == longer
        assert out.metrics["num_fed_tokens" if not insert else "num_latent_positions"] == 3
        assert out.policy_record == []
    # in the middle of decoding: the rest is the plain continuation of prompt + 4 tokens + extra
    first = llm.generate([prompt], greedy(), use_tqdm=False)[0].token_ids
    out = llm.generate([prompt], greedy(latent_policy=FeedAt(extra, at=4)), use_tqdm=False)[0].token_ids
    rest = llm.generate([prompt + first[:4] + extra], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS - 4,
                                                                      ignore_eos=True), use_tqdm=False)[0]
    assert out[:4] == first[:4] and out[4:] == rest.token_ids


def test_a_policy_that_only_samples_changes_nothing(llm):
    prompts = [llm.tokenizer(t)["input_ids"] for t in TEXTS]
    params = SamplingParams(temperature=0.9, top_k=20, max_tokens=MAX_TOKENS, seed=3, ignore_eos=True)
    plain = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with_policy = SamplingParams(temperature=0.9, top_k=20, max_tokens=MAX_TOKENS, seed=3, ignore_eos=True,
                                 latent_policy=LatentPolicy())
    outs = llm.generate(prompts, with_policy, use_tqdm=False)
    assert [o.token_ids for o in outs] == plain
    assert all(o.policy_record == [] for o in outs)


class InsertBeforeEachToken(LatentPolicy):
    def __init__(self, k):
        self.k = k

    def on_start(self, ctx):
        self.inserted = False

    def on_hidden(self, ctx, hidden):
        assert ctx.num_positions <= ctx.max_model_len
        if self.inserted:
            self.inserted = False
            return SAMPLE
        self.inserted = True
        return Insert(hidden.expand(self.k, -1))

    def on_token(self, ctx, token_id):
        self.record.append(ctx.num_positions)


@pytest.mark.parametrize("k", [1, 3])
def test_the_room_rule(llama_dir, k):
    """k rows go in only if they and the token they precede fit; otherwise the request
    ends there with "length", and nothing of the refused insertion is counted."""
    max_len = 32
    llm = LLM(llama_dir, dtype="float64", block_size=4, max_model_len=max_len)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True,
                                                latent_policy=InsertBeforeEachToken(k)), use_tqdm=False)[0]
    tokens = (max_len - len(prompt)) // (k + 1)
    assert out.finish_reason == "length" and len(out.token_ids) == tokens
    assert out.metrics["num_latent_positions"] == k * tokens
    assert out.policy_record == [len(prompt) + (k + 1) * (i + 1) for i in range(tokens)]
    assert max(out.policy_record) <= max_len
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_records_are_per_request_and_plain_requests_have_none(llm, thought_case):
    prompts, policy, expected, plain = thought_case
    template_record = list(policy.record)
    params = [greedy(latent_policy=policy), greedy(), greedy(latent_policy=policy, n=2)]
    outs = llm.generate([prompts[0], prompts[0], prompts[-1]], params, use_tqdm=False)
    assert outs[0].token_ids == expected[0] and outs[1].token_ids == plain[0]
    assert outs[1].policy_record is None and outs[1].outputs[0].policy_record is None
    assert outs[0].policy_record == outs[0].outputs[0].policy_record
    a, b = outs[2].outputs
    assert a.token_ids == b.token_ids == expected[-1]
    assert a.policy_record == b.policy_record and a.policy_record is not b.policy_record
    assert policy.record == template_record   # the template itself is never run
    assert not llm.engine.runtime.latent_requests


class Returns(LatentPolicy):
    def __init__(self, action):
        self.action = action

    def on_hidden(self, ctx, hidden):
        return self.action(ctx, hidden)


@pytest.mark.parametrize("action, error, match", [
    (lambda ctx, h: None, TypeError, "must return SAMPLE, Insert"),
    (lambda ctx, h: Insert(h[:-1]), ValueError, "shape"),
    (lambda ctx, h: Insert(h.tolist()), TypeError, "torch.Tensor"),
    (lambda ctx, h: Insert(h.new_full(h.shape, float("nan"))), ValueError, "non-finite"),
    (lambda ctx, h: Feed([ctx.vocab_size]), ValueError, "vocabulary"),
    (lambda ctx, h: Feed([]), ValueError, "at least one"),
])
def test_bad_actions_raise_and_the_engine_serves_on(llm, action, error, match):
    prompt = [5, 6, 7]
    with pytest.raises(error, match=match):
        llm.generate([prompt, prompt], [greedy(), greedy(latent_policy=Returns(action))], use_tqdm=False)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.engine.has_unfinished()
    assert not llm.engine.runtime.latent_requests
    assert llm.generate([prompt], greedy(), use_tqdm=False)[0].token_ids == \
        llm.generate([prompt], greedy(latent_policy=LatentPolicy()), use_tqdm=False)[0].token_ids


class Raises(LatentPolicy):
    def __init__(self, where):
        self.where = where

    def new_request(self, prompt_token_ids):
        if self.where == "new_request":
            raise RuntimeError("boom in new_request")
        return super().new_request(prompt_token_ids)

    def on_start(self, ctx):
        if self.where == "on_start":
            raise RuntimeError("boom in on_start")

    def on_token(self, ctx, token_id):
        if self.where == "on_token" and len(ctx.output_token_ids) == 2:
            raise RuntimeError("boom in on_token")


@pytest.mark.parametrize("where", ["new_request", "on_start", "on_token"])
def test_a_hook_that_raises_ends_the_call_and_nothing_stays(llm, where):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = [greedy(), greedy(latent_policy=Raises(where)), greedy()]
    with pytest.raises(RuntimeError, match=f"boom in {where}"):
        llm.generate(prompts, params, use_tqdm=False)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.engine.has_unfinished()
    assert not llm.engine.runtime.latent_requests
    assert [o.token_ids for o in llm.generate(prompts, greedy(), use_tqdm=False)] == \
        [o.token_ids for o in llm.generate(prompts, greedy(latent_policy=Raises("nowhere")), use_tqdm=False)]


def test_bad_policies_are_refused_before_anything_runs(memgen_reasoner_dir, memgen_ckpt_dir):
    with pytest.raises(TypeError, match="latent_policy must be a memgen.LatentPolicy"):
        SamplingParams(latent_policy=object())
    for bad in [(-1, 2, 1), (1, 2, 1.5), (True, 2, 1)]:
        with pytest.raises(ValueError, match="ContinuousThought"):
            ContinuousThought(*bad)
    llm = LLM(memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float64", max_model_len=64)
    with pytest.raises(ValueError, match="cannot be combined with a MemGen checkpoint"):
        llm.generate([[5, 6, 7]], greedy(latent_policy=LatentPolicy()), use_tqdm=False)
    assert not llm.engine.has_unfinished()


# ---- the guide's example, run as written ---------------------------------------------
def _guide_example(name: str) -> str:
    """The python block that follows `<!-- example: NAME` in docs/latent-policies.md."""
    text = GUIDE.read_text()
    marker = text.index(f"<!-- example: {name}")
    start = text.index("```python\n", marker) + len("```python\n")
    return text[start:text.index("```", start)]


def _soft_thinking_hf(model, prompt, num_steps, top_k, max_new_tokens):
    """Soft thinking as a plain HF loop with a KV cache (greedy)."""
    import inspect

    from transformers import DynamicCache

    embed, decoder = model.get_input_embeddings(), model.get_decoder()
    cache = DynamicCache()
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    inputs, tokens = embed(torch.tensor([prompt])), []
    with torch.inference_mode():
        while True:
            hidden = decoder(inputs_embeds=inputs, use_cache=True, **{cache_arg: cache}).last_hidden_state[0, -1]
            logits = model.lm_head(hidden)
            if num_steps:
                num_steps -= 1
                weights, ids = torch.softmax(logits, dim=-1).topk(top_k)
                nxt = (weights / weights.sum()) @ embed(ids)
            else:
                tokens.append(int(logits.argmax()))
                if len(tokens) == max_new_tokens:
                    return tokens
                nxt = embed(torch.tensor(tokens[-1]))
            inputs = nxt.view(1, 1, -1)


def test_the_guides_soft_thinking_example(llm, hf_model):
    code = _guide_example("soft-thinking")
    # written against the public API only
    imports = [line for line in code.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import torch", "from memgen import SAMPLE, Insert, LatentPolicy"]
    namespace = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 (the guide's own code)
    policy = namespace["SoftThinking"](num_steps=3, top_k=5)
    prompts = [llm.tokenizer(t)["input_ids"] for t in TEXTS]
    outs = llm.generate(prompts, greedy(latent_policy=policy), use_tqdm=False)
    plain = [o.token_ids for o in llm.generate(prompts, greedy(), use_tqdm=False)]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _soft_thinking_hf(hf_model, prompt, 3, 5, MAX_TOKENS)
        assert len(out.policy_record) == 3 and out.metrics["num_latent_positions"] == 3
    assert [o.token_ids for o in outs] != plain   # the soft tokens changed something

"""memgen.LatentPolicy: the hooks, the actions, the room rule and the outputs."""

import pytest
from memgen import LLM, SAMPLE, Feed, Insert, LatentPolicy, SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = [
    "Hello world, this is a small test.",
    "The quick brown fox",
    "Solve the math problem with proper reasoning, and put the answer in a box. We add the numbers,",
    "1 2 3",
    "Question: what is 12 plus 30? Answer:",
]
MAX_TOKENS = 14


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float64", enable_prefix_caching=False)


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
    assert not llm.engine.policy.latent_requests
    assert llm.generate([prompt], greedy(), use_tqdm=False)[0].token_ids == \
        llm.generate([prompt], greedy(latent_policy=LatentPolicy()), use_tqdm=False)[0].token_ids


def test_bad_policies_are_refused_before_anything_runs(memgen_reasoner_dir, memgen_ckpt_dir):
    with pytest.raises(TypeError, match="latent_policy must be a memgen.LatentPolicy"):
        SamplingParams(latent_policy=object())
    llm = LLM(memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float64", max_model_len=64)
    with pytest.raises(ValueError, match="cannot be combined with a MemGen checkpoint"):
        llm.generate([[5, 6, 7]], greedy(latent_policy=LatentPolicy()), use_tqdm=False)
    assert not llm.engine.has_unfinished()

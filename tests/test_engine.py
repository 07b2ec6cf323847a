"""The engine's scheduling must never change a greedy result: batch
composition, chunked prefill, prefix-cache hits and preemption all give the
tokens of a lone, cold, unconstrained run."""
import pytest

from memgen import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = [
    "Hello world, this is a small test.",
    "The quick brown fox",
    "Solve the math problem with proper reasoning, and put the answer in a box. We add the numbers,",
    "1 2 3",
    "Question: what is 12 plus 30? Answer:",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llama_dir):
    """Each prompt run on its own, on a fresh engine."""
    llm = LLM(llama_dir, dtype="float64")
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in PROMPTS]


def _tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_batch_invariance(llama_dir, alone):
    llm = LLM(llama_dir, dtype="float64", enable_prefix_caching=False)
    assert _tokens(llm) == alone
    # other company, other order
    assert _tokens(llm, PROMPTS[::-1]) == alone[::-1]
    assert _tokens(llm, [PROMPTS[2], PROMPTS[2], PROMPTS[0]]) == [alone[2], alone[2], alone[0]]


def test_chunked_prefill(llama_dir, alone):
    llm = LLM(llama_dir, dtype="float64", max_num_batched_tokens=5, enable_prefix_caching=False)
    assert _tokens(llm) == alone


def test_small_batches_and_block_size(llama_dir, alone):
    llm = LLM(llama_dir, dtype="float64", max_num_seqs=2, block_size=4)
    assert _tokens(llm) == alone


def test_prefix_cache_hits_give_cold_results(llama_dir, alone):
    llm = LLM(llama_dir, dtype="float64", block_size=4)
    manager = llm.engine.block_manager
    first = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]
    assert first.metrics["num_cached_prompt_tokens"] == 0
    again = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]
    assert again.metrics["num_cached_prompt_tokens"] > 0
    assert again.token_ids == first.token_ids == alone[2]
    # a longer prompt sharing the first one's prefix hits too
    hits_before = manager.num_prefix_hit_tokens
    longer = PROMPTS[2] + " then we check the result."
    out = llm.generate(longer, GREEDY, use_tqdm=False)[0]
    assert manager.num_prefix_hit_tokens > hits_before
    cold = LLM(llama_dir, dtype="float64", enable_prefix_caching=False)
    assert out.token_ids == cold.generate(longer, GREEDY, use_tqdm=False)[0].token_ids


def test_preemption_under_a_tiny_kv_budget(llama_dir, alone):
    # 16 blocks of 4 tokens: room for one max-length sequence, far less than the batch needs
    llm = LLM(llama_dir, dtype="float64", block_size=4, max_model_len=64, num_kv_blocks=16)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics["num_preemptions"] for o in outs) == llm.engine.scheduler.num_preemptions
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(manager.ref_count(b) == 0 for b in range(manager.num_blocks))
    manager.check_invariants()
    assert not llm.engine.has_unfinished()


def test_max_model_len_caps_generation(llama_dir):
    llm = LLM(llama_dir, dtype="float64", max_model_len=12)
    prompt = list(range(3, 13))                      # 10 tokens
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"
    full = llm.generate(list(range(3, 15)), SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    assert len(full.token_ids) == 1                  # a prompt of exactly max_model_len still gets one token


def test_kv_cache_too_small_for_one_sequence(llama_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(llama_dir, max_model_len=64, block_size=16, num_kv_blocks=3)


def test_mixed_lengths_and_params_in_one_batch(llama_dir, alone):
    llm = LLM(llama_dir, dtype="float64")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 16, 1, 9, 16)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out, ref, p in zip(outs, alone, params):
        assert out.token_ids == ref[:p.max_tokens]

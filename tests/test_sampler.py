"""Sampling: per-request seeds independent of the batch, top-k / top-p
truncation, greedy equivalences, and log-probabilities."""
import math

import pytest
import torch

from memgen import LLM, SamplingParams
from memgen.layers.sampler import Sampler, SamplingBatch, _to_float32, _truncate

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["Hello world, this is", "The quick brown fox jumps", "Question: what is 12 plus 30?"]


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, dtype="float64")


def _tokens(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seed_reproduces_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.5, max_tokens=16, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    alone = _tokens(llm, PROMPTS[0], seeded)[0]
    assert _tokens(llm, PROMPTS[0], seeded)[0] == alone
    in_batch = _tokens(llm, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, seeded, other])
    assert in_batch[1] == alone
    reseeded = SamplingParams(temperature=1.5, max_tokens=16, seed=99, ignore_eos=True)
    assert _tokens(llm, PROMPTS[0], reseeded)[0] != alone


def test_unseeded_runs_follow_the_engine_seed(qwen2_dir):
    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True)
    a = _tokens(LLM(qwen2_dir, dtype="float64", seed=7), PROMPTS, params)
    b = _tokens(LLM(qwen2_dir, dtype="float64", seed=7), PROMPTS, params)
    c = _tokens(LLM(qwen2_dir, dtype="float64", seed=8), PROMPTS, params)
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = _tokens(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    top_k = _tokens(llm, PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True))
    top_p = _tokens(llm, PROMPTS, SamplingParams(temperature=1.0, top_p=1e-9, max_tokens=12, ignore_eos=True))
    assert top_k == greedy and top_p == greedy


def test_greedy_and_sampled_rows_share_a_batch(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    hot = SamplingParams(temperature=2.0, max_tokens=12, ignore_eos=True, seed=3)
    alone = _tokens(llm, PROMPTS[0], greedy)[0]
    mixed = _tokens(llm, PROMPTS, [greedy, hot, hot])
    assert mixed[0] == alone


def test_truncate_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    kept = torch.isfinite(_truncate(logits, [2, 0], [1.0, 1.0]))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    kept = torch.isfinite(_truncate(logits, [0, 0], [0.75, 0.65]))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(_truncate(logits, [3, 1], [0.5, 0.99]))
    assert kept.tolist() == [[True, False, False, False], [False, False, False, True]]


def test_bfloat16_logits_convert_exactly():
    """The sampler's float32 copy of bfloat16 logits (natively on the CPU) is torch's
    .float(), bit for bit: infinities, NaN, subnormals and an odd row width included."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 1001, generator=g) * 50).bfloat16()
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-40]).bfloat16()
    got = _to_float32(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got.view(torch.int32), x.float().view(torch.int32))
    assert torch.equal(_to_float32(x[:, ::2]).view(torch.int32), x[:, ::2].float().view(torch.int32))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    n = 3000
    logits = probs.log().expand(n, 3).clone()
    gen = torch.Generator().manual_seed(0)
    batch = SamplingBatch([1.0] * n, [0] * n, [1.0] * n, [gen] * n, [-1] * n)
    counts = torch.bincount(torch.tensor(Sampler()(logits, batch).token_ids), minlength=3).double() / n
    assert torch.allclose(counts, probs, atol=0.03)


def test_logprobs(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0), use_tqdm=False)[0]
    assert [list(lp) for lp in out.logprobs] == [[t] for t in out.token_ids]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=4, logprobs=3, seed=0),
                       use_tqdm=False)[0]
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and 3 <= len(lp) <= 4
        assert all(v <= 0.0 and math.isfinite(v) for v in lp.values())
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False)[0].logprobs is None

"""vLLM's SamplingParams fields with vLLM's semantics: n completions, stop
strings, min_tokens, and the repetition / presence / frequency penalties
(latent positions are not tokens and never count)."""
import pytest
import torch

from memgen import LLM, SamplingParams
from memgen.layers.sampler import Sampler, SamplingBatch

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT = "Hello world, this is"


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, dtype="float64")


def test_n_completions(llm):
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate([PROMPT, "The quick"], sampled, use_tqdm=False)
    assert [len(o.outputs) for o in out] == [3, 3]
    first = out[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert first.token_ids == first.outputs[0].token_ids and first.text == first.outputs[0].text
    # completion 0 keeps the seed: it is the n=1 run; the others differ from it
    single = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
    assert first.outputs[0].token_ids == single.token_ids
    assert len({tuple(c.token_ids) for c in first.outputs}) == 3
    # and the whole call is reproducible
    again = llm.generate([PROMPT, "The quick"], sampled, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in out]
    greedy = llm.generate(PROMPT, SamplingParams(n=2, temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_stop_strings_cut_the_text(llm):
    params = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    # a stop string that first appears after a few tokens
    k = 6
    prefix_text = llm.tokenizer.decode(full.token_ids[:k], skip_special_tokens=True)
    stop = full.text[len(prefix_text):len(prefix_text) + 3]
    assert stop and full.text.find(stop) >= len(prefix_text) - 3
    cut = llm.generate(PROMPT, SamplingParams(stop=[stop, "never-there"], **params), use_tqdm=False)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    # min_tokens: the stop string is ignored until then
    late = llm.generate(PROMPT, SamplingParams(stop=stop, min_tokens=len(cut.token_ids) + 3, **params),
                        use_tqdm=False)[0]
    assert len(late.token_ids) >= len(cut.token_ids) + 3


def test_min_tokens_bans_stop_ids(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0]
    first = greedy.token_ids[0]
    # the greedy first token as a stop id: without min_tokens the request stops at once
    stopped = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first]),
                           use_tqdm=False)[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first], min_tokens=4,
                                               ignore_eos=True), use_tqdm=False)[0]
    assert len(held.token_ids) >= 4 and first not in held.token_ids[:4]


def _batch(n, **kw):
    return SamplingBatch(temperatures=[0.0] * n, top_ks=[0] * n, top_ps=[1.0] * n,
                         generators=[torch.Generator() for _ in range(n)], num_logprobs=[0] * n, **kw)


def test_penalties_follow_vllm():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    sampler = Sampler()
    # repetition 2: positive logits of seen tokens (prompt 0, output 2) halve, negative ones double
    batch = _batch(1, penalties=[(2.0, 0.0, 0.0)], prompt_ids=[[0]], output_ids=[[2]])
    from memgen.layers.sampler import _penalize
    got = _penalize(logits, batch)
    assert torch.equal(got, torch.tensor([[1.0, 1.0, -2.0, 0.5, 0.0]], dtype=torch.float64))
    # frequency 0.5 per occurrence in the output, presence 0.25 once; the prompt does not count
    batch = _batch(1, penalties=[(1.0, 0.25, 0.5)], prompt_ids=[[1]], output_ids=[[0, 0, 3]])
    got = _penalize(logits, batch)
    assert torch.allclose(got, torch.tensor([[2.0 - 1.0 - 0.25, 1.0, -1.0, 0.5 - 0.5 - 0.25, 0.0]],
                                            dtype=torch.float64))
    # greedy picks from the penalized logits; logprobs stay the raw model's
    out = sampler(logits, _batch(1, penalties=[(1.0, 0.0, 2.0)], prompt_ids=[[]], output_ids=[[0]]))
    assert out.token_ids == [1]
    assert out.logprobs[0][1] == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())
    # rows without penalties are untouched, in the same batch
    two = torch.cat([logits, logits])
    out = sampler(two, _batch(2, penalties=[None, (1.0, 0.0, 2.0)], prompt_ids=[None, []],
                              output_ids=[None, [0]]))
    assert out.token_ids == [0, 1]


def test_frequency_penalty_breaks_greedy_repeats(llm):
    plain = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
    penalized = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                    frequency_penalty=2.0), use_tqdm=False)[0]
    def most_repeated(ids):
        return max(ids.count(t) for t in set(ids))
    assert most_repeated(penalized.token_ids) <= most_repeated(plain.token_ids)
    assert penalized.token_ids != plain.token_ids


def test_penalties_count_tokens_not_latents(memgen_reasoner_dir, memgen_ckpt_dir):
    """MemGen: the penalties' history is the output's token ids; latent positions never enter it."""
    llm = LLM(memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float64")
    histories = []
    real = llm.engine.sampler

    def recording(logits, batch):
        histories.extend(list(h) for h in batch.output_ids)
        return real(logits, batch)

    llm.engine.sampler = recording
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=2.0)
    out = llm.generate(["What is 12 plus 30?"], params, use_tqdm=False)[0]
    assert out.metrics["num_latent_positions"] > 0
    assert histories == [out.token_ids[:i] for i in range(12)]


@pytest.mark.parametrize("bad, error", [
    (dict(n=0), ValueError), (dict(stop=[""]), ValueError), (dict(stop=[3]), TypeError),
    (dict(min_tokens=-1), ValueError), (dict(max_tokens=4, min_tokens=5), ValueError),
    (dict(repetition_penalty=0.0), ValueError), (dict(frequency_penalty=2.5), ValueError),
    (dict(presence_penalty="x"), TypeError)])
def test_bad_values_are_clear_errors(bad, error):
    with pytest.raises(error):
        SamplingParams(**bad)

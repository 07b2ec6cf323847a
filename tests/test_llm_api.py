"""The public API as API.md states it: outputs, chat, and every bad-input case
raising the named error before anything enters the engine."""
import math

import pytest
import torch

from memgen import LLM, RequestOutput, SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, dtype="float64", max_model_len=64)


def test_output_fields(llm):
    tokenizer = llm.tokenizer
    outs = llm.generate(["Hello world", [5, 6, 7]], GREEDY, use_tqdm=False)
    assert len(outs) == 2 and all(isinstance(o, RequestOutput) for o in outs)
    first = outs[0]
    assert first.prompt_token_ids == tokenizer("Hello world")["input_ids"]
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert len(first.token_ids) == 6 and first.finish_reason == "length"
    assert first.augmentation == [-100] * 6
    assert first.logprobs is None
    assert first.text == tokenizer.decode(first.token_ids, skip_special_tokens=True)
    m = first.metrics
    assert m["num_insertions"] == m["num_trigger_calls"] == m["num_latent_positions"] == 0
    assert 0 <= m["time_to_first_token_s"] <= m["total_s"]
    # one prompt given as a string or as ids, with one SamplingParams per prompt
    per_prompt = llm.generate(["Hello world", [5, 6, 7]], [GREEDY, GREEDY], use_tqdm=False)
    assert [o.token_ids for o in per_prompt] == [o.token_ids for o in outs]
    assert llm.generate(torch.tensor([5, 6, 7]), GREEDY, use_tqdm=False)[0].token_ids == outs[1].token_ids


def test_default_sampling_params_and_progress_bar(llm, capsys):
    out = llm.generate("Hello", SamplingParams(max_tokens=3, seed=1), use_tqdm=True)[0]
    assert 1 <= len(out.token_ids) <= 3
    assert "tok/s" in capsys.readouterr().err


def test_chat_applies_the_template(llm):
    tokenizer = llm.tokenizer
    conv = [{"role": "user", "content": "What is 12 plus 30?"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids == ids
    assert out.token_ids == llm.generate(ids, GREEDY, use_tqdm=False)[0].token_ids
    both = llm.chat([conv, conv + [{"role": "assistant", "content": "42."}, {"role": "user", "content": "Why?"}]],
                    GREEDY, use_tqdm=False)
    assert len(both) == 2 and both[0].token_ids == out.token_ids


@pytest.mark.parametrize("prompts, error, match", [
    ("", ValueError, "empty"),
    ([[]], ValueError, "empty"),
    ([], ValueError, "empty"),
    ([5, -1], ValueError, "outside the vocabulary"),
    ([[5, 10**6]], ValueError, "outside the vocabulary"),
    ([list(range(3, 70))], ValueError, "max_model_len"),
    (["ok", None], TypeError, "prompt 1"),
    (5, TypeError, "prompts must be"),
    ([[5, 6.0]], TypeError, "must be ints"),
    ([[5, True]], TypeError, "must be ints"),
    ([5, "x"], TypeError, "mixes"),
    ({"a": 1}, TypeError, "prompts must be"),
])
def test_bad_prompts(llm, prompts, error, match):
    before = llm.engine._num_requests
    with pytest.raises(error, match=match):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine._num_requests == before and not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=2.5), TypeError, "max_tokens"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(stop_token_ids=[-3]), ValueError, "stop_token_ids"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids"),
    (dict(logprobs=-1), ValueError, "logprobs"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos"),
])
def test_bad_sampling_params(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_bad_params_at_submission(llm):
    mutated = SamplingParams(max_tokens=4)
    mutated.max_tokens = 0                  # changed after construction: checked again at submission
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("hi", mutated, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate("a", {"temperature": 0}, use_tqdm=False)
    with pytest.raises(TypeError, match=r"sampling_params\[1\]"):
        llm.generate(["a", "b"], [GREEDY, None], use_tqdm=False)
    # a whole batch is checked before any of it runs; the engine then serves the next call
    with pytest.raises(ValueError):
        llm.generate(["fine", [5, -1]], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert len(llm.generate("fine", GREEDY, use_tqdm=False)[0].token_ids) == 6


@pytest.mark.parametrize("messages, error", [
    ([], ValueError),
    ("hello", TypeError),
    ([[]], ValueError),
    ([{"role": "user"}], ValueError),
    ([["not a dict"]], TypeError),
])
def test_bad_chat_messages(llm, messages, error):
    with pytest.raises(error):
        llm.chat(messages, GREEDY, use_tqdm=False)


def test_bad_constructor_arguments(qwen2_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(qwen2_dir, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        LLM(qwen2_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            LLM(qwen2_dir, device="cuda")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LLM(tmp_path / "nowhere")
    # a MemGen checkpoint that is not there (NotImplementedError while the engine has no MemGen path)
    with pytest.raises((FileNotFoundError, NotImplementedError)):
        LLM(qwen2_dir, memgen=tmp_path / "no-checkpoint")
    with pytest.raises(ValueError, match="weaver_model"):
        LLM(qwen2_dir, weaver_model=qwen2_dir)
    with pytest.raises(TypeError, match="unknown LLM option"):
        LLM(qwen2_dir, max_num_seq=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(qwen2_dir, max_num_seqs=0)
    with pytest.raises(TypeError, match="block_size"):
        LLM(qwen2_dir, block_size="16")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(qwen2_dir, max_model_len=10**6)
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        LLM(qwen2_dir, kv_cache_memory_gb=-1.0)


def test_dtypes_on_cpu(qwen2_dir):
    assert LLM(qwen2_dir).dtype == torch.float32        # auto on CPU
    out32 = LLM(qwen2_dir, dtype="float32").generate([5, 6, 7], GREEDY, use_tqdm=False)[0]
    out64 = LLM(qwen2_dir, dtype=torch.float64).generate([5, 6, 7], GREEDY, use_tqdm=False)[0]
    assert out32.token_ids == out64.token_ids


@pytest.mark.slow
def test_smollm2_matches_hf_by_vllms_rule():
    """The packaged SmolLM2 in float32 against HF: equal greedy tokens until the
    first difference, where each side's token is in the other's top-5."""
    from transformers import AutoModelForCausalLM

    from memgen.sources import resolve_model_dir

    try:
        model_dir = resolve_model_dir(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    llm = LLM(model_dir, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    convs = [[{"role": "user", "content": c}] for c in
             ("What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.")]
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
    for out in llm.chat(convs, params, use_tqdm=False):
        ids = out.prompt_token_ids
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
        ref = gen.sequences[0, len(ids):].tolist()
        for i, (ours, theirs) in enumerate(zip(out.token_ids, ref)):
            if ours != theirs:
                hf_top5 = gen.logits[i][0].topk(5).indices.tolist()
                assert ours in hf_top5 and theirs in out.logprobs[i], (i, ours, theirs)
                break

"""The engine with the Triton attention backend (interpreted on CPU) gives the
torch backend's greedy outputs, plain and MemGen."""
import pytest

from memgen import LLM, SamplingParams

pytestmark = pytest.mark.kernels

PARAMS = SamplingParams(max_tokens=8, temperature=0.0)


def _outputs(llm, prompts):
    return [(o.token_ids, o.augmentation) for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def test_plain_llm_triton_equals_torch(qwen2_dir):
    prompts = ["Hello world, this", "The quick brown fox jumps over"]
    want = _outputs(LLM(qwen2_dir, dtype="float32", attention_backend="torch"), prompts)
    got = _outputs(LLM(qwen2_dir, dtype="float32", attention_backend="triton"), prompts)
    assert got == want


def test_memgen_triton_equals_torch(memgen_reasoner_dir, memgen_active_ckpt_dir):
    prompts = ["What is 12 plus 30?", "Hello"]
    kwargs = dict(model=memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float32")
    want = _outputs(LLM(**kwargs, attention_backend="torch"), prompts)
    got = _outputs(LLM(**kwargs, attention_backend="triton"), prompts)
    assert got == want
    assert any(1 in aug for _, aug in want)


def test_unknown_backend_is_a_value_error(qwen2_dir):
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(qwen2_dir, attention_backend="flash")

"""The engine with the Triton attention backend (interpreted on CPU) gives the
torch backend's greedy outputs, plain and MemGen."""
import pytest

from memgen import LLM, SamplingParams

pytestmark = pytest.mark.kernels

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)


def _outputs(llm, prompts):
    return [(o.token_ids, o.augmentation, o.logprobs) for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def assert_same_outputs(got, want):
    """Equal tokens and masks. On a GPU the two sides round differently (kernels vs
    cuBLAS/SDPA, graph vs eager split choices), so there the rows need only agree up to
    their first near-tie: where the tokens first differ, each side's token must be in
    the other's top-5 (vLLM's rule); nothing after it is compared."""
    import torch

    strict = not torch.cuda.is_available()
    for (g_tok, g_aug, g_lp), (w_tok, w_aug, w_lp) in zip(got, want):
        if strict or g_tok == w_tok:
            assert (g_tok, g_aug) == (w_tok, w_aug)
            continue
        i = next(i for i, (a, b) in enumerate(zip(g_tok, w_tok)) if a != b)
        assert g_tok[i] in w_lp[i] and w_tok[i] in g_lp[i], f"token {i}: {g_tok[i]} vs {w_tok[i]} is no near-tie"
        assert g_tok[:i] == w_tok[:i] and g_aug[:i + 1] == w_aug[:i + 1]


def test_plain_llm_triton_equals_torch(qwen2_dir):
    prompts = ["Hello world, this", "The quick brown fox jumps over"]
    want = _outputs(LLM(qwen2_dir, dtype="float32", attention_backend="torch"), prompts)
    got = _outputs(LLM(qwen2_dir, dtype="float32", attention_backend="triton"), prompts)
    assert_same_outputs(got, want)


def test_memgen_triton_equals_torch(memgen_reasoner_dir, memgen_active_ckpt_dir):
    prompts = ["What is 12 plus 30?", "Hello"]
    kwargs = dict(model=memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float32")
    want = _outputs(LLM(**kwargs, attention_backend="torch"), prompts)
    got = _outputs(LLM(**kwargs, attention_backend="triton"), prompts)
    assert_same_outputs(got, want)
    assert any(1 in aug for _, aug, _ in want)


def test_unknown_backend_is_a_value_error(qwen2_dir):
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(qwen2_dir, attention_backend="flash")


def test_memgen_on_triton_runs_every_kernel(memgen_reasoner_dir, memgen_active_ckpt_dir, monkeypatch):
    """Latent injection, multi-LoRA and trigger scoring go through their kernels."""
    from memgen.kernels import latent_injection, lora, trigger_scoring

    calls = {}
    for module, name in ((latent_injection, "inject_latents"), (lora, "add_lora"),
                         (trigger_scoring, "trigger_decisions")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    llm = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float32", attention_backend="triton")
    llm.generate(["What is 12 plus 30?"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert set(calls) == {"inject_latents", "add_lora", "trigger_decisions"}, calls


def test_one_trigger_rule_on_both_backends():
    """Both backends score with the same function family: the torch backend's is the
    kernel module's torch version, and the host alone decides who is consulted."""
    from memgen.kernels.trigger_scoring import trigger_decisions_ref
    from memgen.layers.backend import TorchBackend, TritonBackend

    assert TorchBackend.trigger_decisions is trigger_decisions_ref
    import inspect

    params = list(inspect.signature(TritonBackend().trigger_decisions).parameters)
    assert params[:5] == ["hidden", "weight", "bias", "temperature", "uniforms"]


def test_triton_backend_refuses_float64(qwen2_dir):
    with pytest.raises(ValueError, match="attention_backend='torch'"):
        LLM(qwen2_dir, dtype="float64", attention_backend="triton")


@pytest.mark.parametrize("lazy", [True, False])
def test_memgen_in_bfloat16_on_both_backends(memgen_reasoner_dir, memgen_active_ckpt_dir, lazy):
    """bfloat16 is the GPU default: MemGen runs in it on both backends and both stream
    policies, and inserts latents (tokens may differ by bf16 rounding, so not compared)."""
    prompts = ["What is 12 plus 30?", "Hello. Then, go"]
    for backend in ("torch", "triton"):
        llm = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="bfloat16", attention_backend=backend,
                  lazy_memgen_streams=lazy)
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
        assert all(o.token_ids and o.augmentation[0] in (0, 1) for o in outs)
        assert any(o.metrics["num_insertions"] > 0 for o in outs)


def test_near_tie_rule_used_on_gpus(monkeypatch):
    """The GPU comparison accepts a first difference only where it is a near-tie."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    want = [([5, 6, 7], [1, 0, -100], [{5: -0.1}, {6: -0.7, 9: -0.8}, {7: -0.1}])]
    near = [([5, 9, 3], [1, 0, 1], [{5: -0.1}, {9: -0.7, 6: -0.75}, {3: -0.2}])]
    assert_same_outputs(near, want)
    far = [([5, 4, 3], [1, 0, 1], [{5: -0.1}, {4: -0.1}, {3: -0.2}])]
    with pytest.raises(AssertionError, match="no near-tie"):
        assert_same_outputs(far, want)
    with pytest.raises(AssertionError):
        assert_same_outputs([([5, 9, 3], [0, 0, 1], near[0][2])], want)   # masks differ before the tie

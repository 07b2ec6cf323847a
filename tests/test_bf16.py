"""bfloat16 weights on the CPU (`LLM(dtype="bfloat16")`): the linears run the native
kernel on bfloat16 panels (engine/cpu_gemm.cpp; avx512_bf16 where the CPU has it, else a
body that converts while it reads), float32 sums. Against the same model in float32
and against HF in bfloat16, by vLLM's rule: equal greedy tokens up to the first
difference, where each side's token is in the other's top-5; nothing after it compared.
Every instruction-set body is forced through MEMGEN_CPU_ISA in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures
from memgen import LLM, SamplingParams
from memgen.layers import native

pytestmark = pytest.mark.skipif(native.packed_linear_bf16 is None, reason="a build without the bfloat16 linear")

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, ignore_eos=True)
PROMPTS = ["Hello world, this", "The quick brown fox jumps over", [5, 6, 7, 8, 9, 10]]


def assert_vllm_rule(got, want, what=""):
    """got/want: per prompt (token ids, top-5 logprob dicts per token). Equal up to the
    first difference, a near-tie there; returns how many tokens were equal."""
    equal = 0
    for (g_tok, g_lp), (w_tok, w_lp) in zip(got, want):
        i = next((i for i, (a, b) in enumerate(zip(g_tok, w_tok)) if a != b), None)
        if i is None:
            equal += len(g_tok)
            continue
        assert g_tok[i] in w_lp[i] and w_tok[i] in g_lp[i], f"{what} token {i}: {g_tok[i]} vs {w_tok[i]} is no near-tie"
        equal += i
    return equal


def _ours(model_dir, dtype):
    llm = LLM(str(model_dir), dtype=dtype)
    return [(o.token_ids, o.logprobs) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory, tokenizer):
    """A tiny llama with its LM head tied to the embedding (the SmolLM2 case)."""
    return fixtures.build_tiny_model(tmp_path_factory.mktemp("tied_llama"), tokenizer, arch="llama",
                                     delimiter_factor=None)


def test_bf16_model_is_packed_and_runs_native(qwen2_dir):
    from memgen.layers.linear import Linear

    llm = LLM(qwen2_dir, dtype="bfloat16")
    model = llm.engine.model_runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed and m.weight.dtype == torch.bfloat16 for m in linears)
    assert llm.generate([5, 6, 7], PARAMS, use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "tied_llama"])
def test_bf16_against_float32(arch, qwen2_dir, tokenizer, tmp_path_factory, tied_llama_dir):
    model_dir = {"qwen2": qwen2_dir, "tied_llama": tied_llama_dir}.get(arch)
    if model_dir is None:
        model_dir = fixtures.build_tiny_model(tmp_path_factory.mktemp(arch), tokenizer, arch=arch)
    want = _ours(model_dir, "float32")
    got = _ours(model_dir, "bfloat16")
    equal = assert_vllm_rule(got, want, arch)
    assert equal >= len(PROMPTS) * PARAMS.max_tokens // 3, f"only {equal} tokens agree before the first near-tie"


def _hf_bf16(model_dir, prompts_ids, max_tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    out = []
    for ids in prompts_ids:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0)
        toks = gen.sequences[0, len(ids):].tolist()
        top5 = [dict.fromkeys(gen.logits[i][0].topk(5).indices.tolist()) for i in range(len(toks))]
        out.append((toks, top5))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "tied_llama"])
def test_bf16_against_hf_bf16(arch, qwen2_dir, tied_llama_dir):
    model_dir = {"qwen2": qwen2_dir, "tied_llama": tied_llama_dir}[arch]
    llm = LLM(str(model_dir), dtype="bfloat16")
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    got = [(o.token_ids, o.logprobs) for o in outs]
    want = _hf_bf16(model_dir, [o.prompt_token_ids for o in outs], PARAMS.max_tokens)
    equal = assert_vllm_rule(got, want, arch)
    assert equal >= len(PROMPTS) * PARAMS.max_tokens // 3, f"only {equal} tokens agree before the first near-tie"


_ISA_CODE = """
import sys
sys.path.insert(0, {tests!r})
import torch
from memgen.layers import native
from test_bf16 import PROMPTS, PARAMS, assert_vllm_rule
from memgen import LLM
d = {model_dir!r}
want = [(o.token_ids, o.logprobs) for o in LLM(d, dtype="float32").generate(PROMPTS, PARAMS, use_tqdm=False)]
got = [(o.token_ids, o.logprobs) for o in LLM(d, dtype="bfloat16").generate(PROMPTS, PARAMS, use_tqdm=False)]
equal = assert_vllm_rule(got, want)
assert equal >= len(PROMPTS) * PARAMS.max_tokens // 3, equal
print(native.linear_isa_bf16())
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_bf16_model_on_each_body(isa, tied_llama_dir):
    """A CI machine may lack avx512_bf16 (Zen 3) or have it (Zen 4): the model in
    bfloat16 against float32 on the convert-while-reading bodies, forced here."""
    env = {**os.environ, "MEMGEN_CPU_ISA": isa}
    code = _ISA_CODE.format(tests=str(Path(__file__).parent), model_dir=str(tied_llama_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] in {"avx512": ("avx512", "avx2", "baseline"), "avx2": ("avx2", "baseline"),
                                      "baseline": ("baseline",)}[isa]


@pytest.mark.slow
def test_smollm2_bf16_against_float32_and_hf_bf16():
    """The packaged SmolLM2 in bfloat16: against its float32 run and HF's bfloat16, by vLLM's rule."""
    from memgen.sources import resolve_model_dir

    try:
        model_dir = resolve_model_dir(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    convs = [[{"role": "user", "content": c}] for c in
             ("What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.")]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5, ignore_eos=True)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        outs = LLM(model_dir, dtype=dtype).chat(convs, params, use_tqdm=False)
        runs[dtype] = [(o.token_ids, o.logprobs) for o in outs]
        prompt_ids = [o.prompt_token_ids for o in outs]
    assert_vllm_rule(runs["bfloat16"], runs["float32"], "vs float32")
    assert_vllm_rule(runs["bfloat16"], _hf_bf16(model_dir, prompt_ids, params.max_tokens), "vs HF bfloat16")

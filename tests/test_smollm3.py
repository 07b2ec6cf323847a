"""SmolLM3 in the engine: greedy float64 tokens and log-probabilities equal HF
SmolLM3ForCausalLM on tiny random models (NoPE layers from no_rope_layers or
no_rope_layer_interval, tied embeddings), and the NoPE layers matter."""
import json
import shutil

import pytest
import torch

import smollm3_fixtures
from memgen import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog.\nA new line", "12"]
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=["interval", "explicit"])
def smollm3_dir(request, tmp_path_factory, tokenizer):
    """NoPE layers from no_rope_layer_interval=2 (layers 1, 3), or an explicit
    no_rope_layers list (layers 0, 3 NoPE) with attention and MLP biases."""
    extra = {} if request.param == "interval" else dict(no_rope_layers=[0, 1, 1, 0], attention_bias=True,
                                                        mlp_bias=True)
    return smollm3_fixtures.build_tiny_smollm3(tmp_path_factory.mktemp(f"smollm3_{request.param}"), tokenizer,
                                               seed=4, **extra)


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64,
                                                attn_implementation="sdpa").eval()


def _hf_greedy(hf, ids):
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return gen


def test_greedy_parity_with_hf(smollm3_dir):
    hf = _hf(smollm3_dir)
    assert hf.config.model_type == "smollm3" and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "the fixture must be tied"
    assert 0 in hf.config.no_rope_layers, "the fixture must have NoPE layers"
    llm = LLM(smollm3_dir, dtype="float64")
    assert llm.engine.model_runner.model.lm_head is None   # tied: the head reads the embeddings
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert len({t for o in outs for t in o.token_ids}) >= 6, "a degenerate output would prove little"
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer(prompt)["input_ids"]
        gen = _hf_greedy(hf, ids)
        assert out.token_ids == gen[0, len(ids):].tolist()
        with torch.no_grad():
            logp = hf(gen).logits[0, len(ids) - 1:-1].log_softmax(-1)
        for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert max(lp, key=lp.get) == token
            for t, v in lp.items():
                assert abs(v - logp[i, t].item()) < 1e-9


def test_nope_layers_matter(tmp_path, smollm3_dir):
    """The same weights with RoPE on every layer generate other tokens: the parity
    above depends on reading no_rope_layers / no_rope_layer_interval."""
    all_rope = tmp_path / "all_rope"
    shutil.copytree(smollm3_dir, all_rope)
    cfg = json.loads((all_rope / "config.json").read_text())
    cfg["no_rope_layers"] = [1] * cfg["num_hidden_layers"]
    (all_rope / "config.json").write_text(json.dumps(cfg))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    nope = LLM(smollm3_dir, dtype="float64").generate(PROMPTS, params, use_tqdm=False)
    rope = LLM(all_rope, dtype="float64").generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in nope] != [o.token_ids for o in rope]


def test_sliding_window_is_refused(tmp_path, smollm3_dir):
    other = tmp_path / "sliding"
    shutil.copytree(smollm3_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=8, layer_types=None)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding"):
        LLM(other, dtype="float64")

"""Engine-native decoders vs HF transformers: greedy tokens identical and
log-probabilities within 1e-9 in float64, for Qwen2, Qwen3 and Llama; the
embedding-input path; weight-loading errors."""
import pytest
import torch

from memgen import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = [
    "Hello world, this is",
    "The quick brown fox jumps over the lazy dog.\nA new line",
    "12",
]
MAX_TOKENS = 24


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64,
                                                attn_implementation="sdpa").eval()


def test_greedy_parity_with_hf(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float64")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    hf = _hf_model(tiny_model_dir)
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out.token_ids == gen[0, len(ids):].tolist()
        # HF generate rounds its logits to float32: take float64 log-probs from one teacher-forced forward
        with torch.no_grad():
            logp = hf(gen).logits[0, len(ids) - 1:-1].log_softmax(-1)
        for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert len(lp) == 5
            assert max(lp, key=lp.get) == token
            for t, v in lp.items():
                assert abs(v - logp[i, t].item()) < 1e-9
        assert out.finish_reason == "length"


def test_stops_at_eos_like_hf(qwen2_dir):
    """Without ignore_eos a row stops at the tokenizer's eos, which it includes."""
    llm = LLM(qwen2_dir, dtype="float64")
    eos = llm.tokenizer.eos_token_id
    # make eos the argmax after the prompt by asking the model what it would say, then stopping on it
    probe = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                         use_tqdm=False)[0]
    stop_on = probe.token_ids[1]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_on]),
                       use_tqdm=False)[0]
    assert out.token_ids == probe.token_ids[:2] and out.finish_reason == "stop"
    assert eos in llm.engine.eos_token_ids


def test_embedding_inputs_equal_token_inputs(qwen2_dir):
    """Rows given as embedding vectors (MemGen's latent path) compute exactly
    what the same rows given as token ids compute."""
    from memgen._native import StepCore
    from memgen.engine.sequence import Stream

    llm = LLM(qwen2_dir, dtype="float64", enable_prefix_caching=False)
    runner, manager = llm.engine.model_runner, llm.engine.block_manager
    ids = [5, 17, 42, 9, 33, 12, 7]
    embed = runner.model.model.embed_tokens.weight

    def run(stream):
        step = StepCore([manager])
        step.begin(stream.num_tokens)
        assert step.admit(stream, (stream,))        # blocks and one chunk of every position
        inp = runner.prepare(step)
        hidden = runner.forward(inp)
        manager.free(stream)
        return hidden

    by_token = run(Stream("R", list(ids)))
    mixed = Stream("R", ids[:3])
    mixed.append_embeds(embed[ids[3:5]])        # two latent-style positions mid-sequence
    mixed.append_tokens(ids[5:])
    by_embed = run(mixed)
    assert torch.equal(by_token, by_embed)


def test_garbled_weights_name_the_file(tmp_path, qwen2_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(qwen2_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(bad, dtype="float64")


def test_missing_weights_and_unsupported_arch(tmp_path, qwen2_dir):
    import json
    import shutil

    empty = tmp_path / "empty"
    shutil.copytree(qwen2_dir, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(empty)
    other = tmp_path / "other"
    shutil.copytree(qwen2_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError):
        LLM(other)


@pytest.mark.parametrize("arch,overrides", [("qwen2", {}), ("qwen3", {}), ("llama", {}),
                                            ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_weight_bytes_counts_what_the_decoder_holds(arch, overrides):
    """models.footprint counts parameters from the config (the inactive trigger's log
    line); it must equal the decoder's own parameters, bias, q/k norm and tied head included."""
    import fixtures

    from memgen.models.decoder import DecoderForCausalLM
    from memgen.models.footprint import weight_bytes

    config = fixtures.tiny_config(arch, 320, hidden_size=64, num_layers=3, **overrides)
    model = DecoderForCausalLM(config, 16, torch.float32)
    want = sum(p.numel() for p in model.parameters()) * 4
    assert weight_bytes(config, torch.float32) == want
    assert weight_bytes(config, torch.bfloat16) == want // 2

"""A user's extra stream on another model: `LLM(stream_models={name: path})` and
`StreamSpec(..., model=name)` (docs/latent-policies.md, "A stream on another
model"). The weaving policy of test_policy_streams.py, its stream now on a
qwen2 of hidden size 96 beside a llama reasoner of 64 (its own adapter, a
64 -> 96 input projection, 96-wide queries, a 96 -> 64 readout), against the
same HF loop with two KV caches in float64: batched and on a warm prefix cache,
one at a time and chunked, following the reasoner, under preemption. Then a
stream without a projection (the other model's own embeddings), a directory
holding the reasoner's weights (one pool, one forward), and the refusals."""
import fixtures
import pytest
import test_policy_streams
import torch
from memgen import LLM, SAMPLE, Insert, LatentPolicy, SamplingParams
from memgen.checkpoint import LoraWeights
from memgen.latent_policy import StreamSpec
from test_policy_streams import MAX_TOKENS, K, Weaving, _weave_hf, _with_lora

case = test_policy_streams.case     # the fixture: the same weave on the reasoner's base

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["Hello world, this is a small test.", "The quick brown fox", "1 2 3",
         "Question: what is 12 plus 30? Answer:"]


class WeavingOnSide(Weaving):
    """test_policy_streams.Weaving with its stream "aux" on the model named `model`:
    the states come back at that model's width and `readout` maps them to the reasoner's."""

    def __init__(self, lora, project, queries, readout, follow=False, model="side", latents_log=None):
        super().__init__(lora, project, queries, readout, follow)
        self.streams = (StreamSpec("aux", adapter=lora, input_projection=project, model=model),)
        self.latents_log = latents_log     # prompt -> inserted blocks, shared by the per-request copies

    def on_stream(self, ctx, name, hidden):
        assert name == "aux" and hidden.shape == (K, self.queries.shape[1])
        self.latents, self.waiting = hidden @ self.readout, False
        if self.latents_log is not None:
            self.latents_log.setdefault(tuple(ctx.prompt_token_ids), []).append(self.latents.clone())


def _lora_for(config, generator) -> LoraWeights:
    h, heads = config.hidden_size, config.num_attention_heads
    layers = {}
    for i in range(config.num_hidden_layers):
        for name, (n_in, n_out) in {"self_attn.q_proj": (h, h),
                                    "self_attn.v_proj": (h, config.num_key_value_heads * (h // heads)),
                                    "mlp.down_proj": (config.intermediate_size, h)}.items():
            layers[f"model.layers.{i}.{name}"] = (
                torch.randn(4, n_in, generator=generator, dtype=torch.float64) * 0.3,
                torch.randn(n_out, 4, generator=generator, dtype=torch.float64) * 0.3)
    return LoraWeights(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"], layers=layers)


@pytest.fixture(scope="module")
def side_case(llama_dir, wide_weaver_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    side = AutoModelForCausalLM.from_pretrained(wide_weaver_dir, dtype=torch.float64).eval()
    h, hs = base.config.hidden_size, side.config.hidden_size
    assert (h, hs, side.config.model_type) == (64, 96, "qwen2")      # another width, another architecture
    g = torch.Generator().manual_seed(11)
    lora = _lora_for(side.config, g)
    weight = torch.randn(h, hs, generator=g, dtype=torch.float64) * 0.3
    project = lambda x: x @ weight           # the reasoner's embeddings -> the side model's width
    queries = torch.randn(K, hs, generator=g, dtype=torch.float64)
    readout = torch.randn(hs, h, generator=g, dtype=torch.float64) * 0.5   # and back
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    aux = _with_lora(side, lora)
    logs = [[] for _ in prompts]
    expected = [_weave_hf(base, aux, p, project, queries, readout, log) for p, log in zip(prompts, logs)]
    return prompts, (lora, project, queries, readout), expected, logs


def _run(llm, prompts, parts, follow=False, model="side", latents_log=None):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            latent_policy=WeavingOnSide(*parts, follow=follow, model=model, latents_log=latents_log))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.policy_record) for o in outs], outs


def _same_latents(prompts, got: dict, want: list) -> None:
    """Every inserted block as the HF loop's, in float64 (the tokens alone would hide a
    small error in the side model's inputs)."""
    for prompt, blocks in zip(prompts, want):
        torch.testing.assert_close(torch.stack(got[tuple(prompt)]), torch.stack(blocks), rtol=1e-9, atol=1e-9)


def _all_blocks_free(llm):
    for manager in (p.block_manager for p in llm.engine.pools):
        manager.check_invariants()
        assert manager.num_free_blocks == manager.num_blocks
    assert not llm.engine.runtime.latent_requests


def test_a_stream_on_another_model_matches_the_hf_loop_batched(llama_dir, wide_weaver_dir, side_case):
    prompts, parts, expected, latents = side_case
    llm = LLM(llama_dir, dtype="float64", stream_models={"side": wide_weaver_dir})
    assert [p.name for p in llm.engine.pools] == ["base", "side"]
    log = {}
    got, outs = _run(llm, prompts, parts, latents_log=log)
    assert got == expected
    _same_latents(prompts, log, latents)
    test_policy_streams.check_weaving_run(llm, prompts, expected, got, outs, lambda: _run(llm, prompts, parts))
    _all_blocks_free(llm)


def test_a_stream_on_another_model_one_at_a_time_chunked_and_following(llama_dir, wide_weaver_dir, side_case):
    prompts, parts, expected, latents = side_case
    llm = LLM(llama_dir, dtype="float64", max_num_batched_tokens=5, stream_models={"side": wide_weaver_dir})
    for prompt, want in zip(prompts, expected):
        assert _run(llm, [prompt], parts)[0] == [want]
    following = LLM(llama_dir, dtype="float64", stream_models={"side": wide_weaver_dir})
    log = {}
    assert _run(following, prompts, parts, follow=True, latents_log=log)[0] == expected
    _same_latents(prompts, log, latents)
    _all_blocks_free(following)


def test_a_stream_on_another_model_under_preemption(llama_dir, wide_weaver_dir, side_case):
    prompts, parts, expected, latents = side_case
    longest = max(len(p) + len(t) + K * sum(r) for p, (t, r) in zip(prompts, expected))
    per_stream = -(-(longest + K) // 4)
    # each pool (the reasoner's, the side model's) holds one stream of one sequence, far less than the batch needs
    llm = LLM(llama_dir, dtype="float64", block_size=4, max_model_len=4 * per_stream, num_kv_blocks=per_stream + 1,
              stream_models={"side": wide_weaver_dir})
    log = {}
    got, outs = _run(llm, prompts, parts, latents_log=log)
    assert got == expected
    _same_latents(prompts, log, latents)
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.metrics["num_preemptions"] and o.metrics["num_latent_positions"] for o in outs)
    assert _run(llm, prompts, parts)[0] == expected
    _all_blocks_free(llm)


def test_a_directory_with_the_reasoners_weights_shares_its_pool(llama_dir, wide_weaver_dir, tmp_path, case):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(llama_dir, copy_dir)
    prompts, parts, expected = case     # the weave on the reasoner's base (test_policy_streams)
    llm = LLM(llama_dir, dtype="float64", stream_models={"copy": copy_dir, "again": copy_dir})
    assert [p.name for p in llm.engine.pools] == ["base"]     # one model loaded, one forward
    assert _run(llm, prompts, parts, model="copy")[0] == expected
    _all_blocks_free(llm)
    twice = LLM(llama_dir, dtype="float64", stream_models={"a": wide_weaver_dir, "b": wide_weaver_dir})
    assert [p.name for p in twice.engine.pools] == ["base", "a"]


# ---- a stream without a projection reads tokens with its model's own embeddings ----------
class Judge(LatentPolicy):
    """After the prompt and after every token but the last, the stream "judge" (another
    model of the reasoner's width, tokens only) catches up; `record` holds its states."""
    streams = (StreamSpec("judge", follow="tokens", model="other"),)

    def on_start(self, ctx):
        ctx.streams["judge"].compute()

    def on_stream(self, ctx, name, hidden):
        self.record.append(hidden.tolist())

    def on_hidden(self, ctx, hidden):
        return SAMPLE

    def on_token(self, ctx, token_id):
        if not ctx.finished:
            ctx.streams["judge"].compute()


def test_a_stream_without_projection_uses_its_models_embeddings(llama_dir, qwen2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float64).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    llm = LLM(llama_dir, dtype="float64", block_size=4, stream_models={"other": qwen2_dir})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    plain = llm.generate(prompts, params, use_tqdm=False)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                latent_policy=Judge()), use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, plain):
        assert out.token_ids == ref.token_ids          # the judge only watches
        with torch.inference_mode():
            ids = torch.tensor([prompt + out.token_ids[:-1]])
            want = other.get_decoder()(input_ids=ids).last_hidden_state[0, len(prompt) - 1:]
        got = torch.tensor(out.policy_record, dtype=torch.float64)
        assert got.shape == (MAX_TOKENS, 64)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    _all_blocks_free(llm)


# ---- what is refused ------------------------------------------------------------------
class OneStream(LatentPolicy):
    def __init__(self, spec, insert=None):
        self.streams, self.insert = (spec,), insert

    def on_hidden(self, ctx, hidden):
        if self.insert == "stream width":      # the stream's width, not projected back
            return Insert(torch.zeros(2, 96, dtype=ctx.dtype))
        if self.insert == "compute":
            self.insert = None
            ctx.streams[self.streams[0].name].compute()
            return SAMPLE
        return SAMPLE


@pytest.fixture(scope="module")
def side_llm(llama_dir, wide_weaver_dir):
    return LLM(llama_dir, dtype="float64", stream_models={"side": wide_weaver_dir})


@pytest.mark.parametrize("policy, match", [
    (lambda: OneStream(StreamSpec("aux", model="elsewhere")), "was not built with"),
    (lambda: OneStream(StreamSpec("aux", model="side")), "give it an input_projection"),
    (lambda: OneStream(StreamSpec("aux", model="side", input_projection=lambda x: x), "compute"),
     "input_projection must map"),
    (lambda: OneStream(StreamSpec("aux", model="side", follow="tokens"), "stream width"),
     "the reasoner's hidden size is 64"),
])
def test_refusals_and_the_engine_serves_on(side_llm, policy, match):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, latent_policy=policy())
    with pytest.raises(ValueError, match=match):
        side_llm.generate([[5, 6, 7], [8, 9]], [SamplingParams(temperature=0.0, max_tokens=4), params],
                          use_tqdm=False)
    assert not side_llm.engine.has_unfinished()
    _all_blocks_free(side_llm)
    assert side_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)[0].token_ids


def test_undeclared_model_is_refused_before_any_request_enters(llama_dir):
    llm = LLM(llama_dir, dtype="float64")
    params = SamplingParams(max_tokens=2, latent_policy=OneStream(StreamSpec("aux", model="side")))
    with pytest.raises(ValueError, match=r"declared: none.*stream_models=\{'side': path\}"):
        llm.generate([[5, 6], [7, 8]], [SamplingParams(max_tokens=2), params], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_stream_models_are_checked(llama_dir, wide_weaver_dir, tmp_path, tokenizer):
    with pytest.raises(TypeError, match="model must be None"):
        StreamSpec("aux", model=3)
    with pytest.raises(ValueError, match="other than 'base'"):
        LLM(llama_dir, stream_models={"base": wide_weaver_dir})
    with pytest.raises(TypeError, match="must be a dict"):
        LLM(llama_dir, stream_models=[wide_weaver_dir])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(llama_dir, stream_models={"side": tmp_path / "missing"})
    with pytest.raises(ValueError, match="stream_models are for the streams of your own"):
        LLM(llama_dir, memgen=tmp_path, stream_models={"side": wide_weaver_dir})
    short = fixtures.build_tiny_model(tmp_path / "short", tokenizer, delimiter_factor=None,
                                            max_position_embeddings=64)
    with pytest.raises(ValueError, match="holds at most 64 positions"):
        LLM(llama_dir, stream_models={"short": short})
    assert LLM(llama_dir, max_model_len=64, stream_models={"short": short}).engine.pools[1].name == "short"
    small_vocab = fixtures.build_tiny_model(tmp_path / "small_vocab", tokenizer, delimiter_factor=None,
                                                  vocab_size=200)
    llm = LLM(llama_dir, stream_models={"small": small_vocab})
    params = SamplingParams(max_tokens=2, latent_policy=OneStream(StreamSpec("aux", model="small")))
    with pytest.raises(ValueError, match="embedding table of 200 rows"):
        llm.generate([[5, 6]], params, use_tqdm=False)

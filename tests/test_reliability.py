"""Reliability under KV pressure, prefix caching and preemption (issue 18): no
request is ever lost, a failed generate() leaves the engine as a fresh one, the
mask and the metrics say exactly what happened.

The randomized stress test runs a few seeded examples per pool layout by
default; `pytest -m stress` runs hundreds (STRESS_EXAMPLES per case).
"""
import os
import random

import pytest

import memgen_fixtures
from memgen import LLM, SamplingParams

MAX_MODEL_LEN = 48
BLOCK_SIZE = 4
PROMPT_LATENTS = 3          # K of the fixtures' checkpoints (prompt), 2 at inference
STRESS_EXAMPLES = int(os.environ.get("MEMGEN_STRESS_EXAMPLES", "150"))


# ---- pool layouts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def separate_trigger_dir(tmp_path_factory, tokenizer, memgen_reasoner_dir, wide_weaver_dir):
    """Active trigger on another checkpoint (its own pool), weaver on the reasoner's base."""
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("rel_sep_trigger"), tokenizer,
                                                   memgen_reasoner_dir, trigger_dir=wide_weaver_dir,
                                                   trigger_active=True, seed=3)


# layout -> (checkpoint fixture, weaver model fixture, trigger model fixture, streams in the base pool)
LAYOUTS = {
    "plain": (None, None, None, 1),
    "shared_inactive": ("memgen_ckpt_dir", None, None, 3),
    "shared_active": ("memgen_active_ckpt_dir", None, None, 3),
    "weaver_own_base": ("memgen_wide_ckpt_dir", "wide_weaver_dir", None, 2),
    "trigger_own_base": ("separate_trigger_dir", None, "wide_weaver_dir", 2),
}


def _engine_kwargs(request, layout: str) -> dict:
    ckpt, weaver, trigger, _ = LAYOUTS[layout]
    kw = {"model": request.getfixturevalue("memgen_reasoner_dir"), "dtype": "float64", "device": "cpu",
          "max_model_len": MAX_MODEL_LEN, "block_size": BLOCK_SIZE}
    if ckpt is not None:
        kw["memgen"] = request.getfixturevalue(ckpt)
        kw["weaver_model"] = request.getfixturevalue(weaver) if weaver else None
        kw["trigger_model"] = request.getfixturevalue(trigger) if trigger else None
    return kw


def _tight_blocks(layout: str) -> int:
    """Just above what one max-length sequence needs in the fullest pool."""
    streams = LAYOUTS[layout][3]
    one_seq = streams * (-(-MAX_MODEL_LEN // BLOCK_SIZE) + (streams > 1))
    return one_seq + 2


def _assert_all_free(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.scheduler.waiting and not engine.scheduler.running
    for pool, manager in ((p.name, p.block_manager) for p in engine.pools):
        manager.check_invariants()
        assert manager.num_free_blocks == manager.num_blocks, f"pool {pool!r} leaks blocks"
        assert all(manager.ref_count(i) == 0 for i in range(manager.num_blocks)), f"pool {pool!r}: ref counts"


def _assert_consistent(llm: LLM, out, prompt_len: int) -> None:
    """The mask and the metrics describe what happened, and it fits max_model_len."""
    assert out.finish_reason in ("stop", "length")
    assert len(out.augmentation) == len(out.token_ids)
    if llm.memgen is None:
        return
    s = llm.memgen.get().source.ckpt.settings
    inserted = out.augmentation[:1].count(1) * s.prompt_latents_len + \
        out.augmentation[1:].count(1) * s.inference_latents_len
    assert out.metrics["num_insertions"] == out.augmentation.count(1)
    assert out.metrics["num_latent_positions"] == inserted
    if s.trigger_active:
        assert out.metrics["num_trigger_calls"] == sum(d != -100 for d in out.augmentation)
    assert prompt_len + inserted + len(out.token_ids) <= llm.max_model_len


# ---- the repro -------------------------------------------------------------------
def test_shared_pool_prefix_cache_admission(memgen_reasoner_dir, memgen_ckpt_dir):
    """R's new blocks used to evict a cached block that T's prefix hit had counted on."""
    llm = LLM(model=memgen_reasoner_dir, memgen=memgen_ckpt_dir, dtype="float32", device="cpu",
              max_model_len=64, num_kv_blocks=16)
    rng = random.Random(0)
    ps = [[rng.randrange(3, 320) for _ in range(rng.randint(17, 40))] for _ in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = {}
    for i, p in enumerate(ps + ps[:1]):
        out = llm.generate([p], params, use_tqdm=False)[0]
        assert len(out.token_ids) == 8
        first.setdefault(tuple(p), out.token_ids)
        assert out.token_ids == first[tuple(p)]
        _assert_all_free(llm)


# ---- a generate() that raises ---------------------------------------------------------------
class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("layout", ["plain", "shared_active"])
def test_failed_generate_leaves_engine_clean(request, monkeypatch, layout, error):
    kw = _engine_kwargs(request, layout)
    prompts = [[5 + i, 40, 41, 42, 43, 44, 45, 46, 47] + [100 + i] * (3 + 2 * i) for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fresh = [o.token_ids for o in LLM(**kw, num_kv_blocks=_tight_blocks(layout)).generate(
        prompts, params, use_tqdm=False)]

    llm = LLM(**kw, num_kv_blocks=_tight_blocks(layout))
    runner = llm.engine.model_runner
    real_forward, calls = runner.forward, []

    def failing_forward(inp):
        calls.append(1)
        if len(calls) == 5:
            raise error("injected")
        return real_forward(inp)

    monkeypatch.setattr(runner, "forward", failing_forward)
    with pytest.raises(error):
        llm.generate(prompts, params, use_tqdm=False)
    _assert_all_free(llm)
    monkeypatch.setattr(runner, "forward", real_forward)
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in again] == fresh
    _assert_all_free(llm)


# ---- the room rule ----------------------------------------------------------------------------
def test_prompt_without_room_for_its_latents_is_refused(request):
    llm = LLM(**_engine_kwargs(request, "shared_inactive"))
    too_long = list(range(10, 10 + MAX_MODEL_LEN - PROMPT_LATENTS))          # L + K = max_model_len
    with pytest.raises(ValueError, match="prompt latents"):
        llm.generate([too_long], SamplingParams(max_tokens=4), use_tqdm=False)
    _assert_all_free(llm)


def test_latents_and_their_token_fill_max_model_len_exactly(request):
    llm = LLM(**_engine_kwargs(request, "shared_inactive"))
    prompt = list(range(10, 10 + MAX_MODEL_LEN - PROMPT_LATENTS - 1))       # L + K + 1 = max_model_len
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert out.augmentation == [1] and out.token_ids and len(out.token_ids) == 1
    assert out.metrics["num_latent_positions"] == PROMPT_LATENTS
    assert out.finish_reason == "length"


def test_inference_insertion_at_the_room_boundary(request, tokenizer):
    """An inference insertion whose latents and token need exactly max_model_len
    positions happens; one position less and the request ends before that token,
    with the refused decision neither in the mask nor in the metrics."""
    kw = _engine_kwargs(request, "shared_inactive")
    k = 2   # the fixtures' inference latents
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ids, mask = memgen_fixtures.encode_prompts(tokenizer)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    outs = LLM(**{**kw, "max_model_len": 128}).generate(prompts, params, use_tqdm=False)
    # a prompt whose run has an inference insertion, at token j
    prompt, roomy = next((p, o) for p, o in zip(prompts, outs) if 1 in o.augmentation[1:])
    j = roomy.augmentation.index(1, 1)
    # reasoner positions before that insertion: prompt, prompt latents, tokens 0..j-1
    before = len(prompt) + PROMPT_LATENTS * (roomy.augmentation[0] == 1) + \
        k * roomy.augmentation[1:j].count(1) + j
    fits_llm, short_llm = LLM(**{**kw, "max_model_len": before + k + 1}), LLM(**{**kw, "max_model_len": before + k})
    fits = fits_llm.generate([prompt], params, use_tqdm=False)[0]
    assert fits.token_ids == roomy.token_ids[:j + 1] and fits.augmentation == roomy.augmentation[:j + 1]
    short = short_llm.generate([prompt], params, use_tqdm=False)[0]
    assert short.token_ids == roomy.token_ids[:j] and short.augmentation == roomy.augmentation[:j]
    assert short.finish_reason == fits.finish_reason == "length"
    _assert_consistent(fits_llm, fits, len(prompt))
    _assert_consistent(short_llm, short, len(prompt))


# ---- randomized stress -----------------------------------------------------------------------
def _random_workload(rng: random.Random) -> list[list[tuple[list[int], SamplingParams]]]:
    """1-3 generate() calls of 1-6 requests; prompts share prefixes and repeat."""
    prefixes = [[rng.randrange(3, 300) for _ in range(rng.randint(0, 14))] for _ in range(2)]
    pool = []
    for _ in range(5):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 300) for _ in range(rng.randint(1, 12))]
        pool.append(prompt[:MAX_MODEL_LEN - PROMPT_LATENTS - 1])
    calls = []
    for _ in range(rng.randint(1, 3)):
        batch = []
        for _ in range(rng.randint(1, 6)):
            seeded = rng.random() < 0.3
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.9 if seeded else 0.0,
                                    seed=rng.randrange(1000) if seeded else None, ignore_eos=rng.random() < 0.5)
            batch.append((rng.choice(pool), params))
        calls.append(batch)
    return calls


_ALONE: dict = {}


def _alone(request, layout: str, prompt: list[int], params: SamplingParams):
    """The request run by itself on a roomy engine (cached per layout)."""
    key = (layout, tuple(prompt), params.max_tokens, params.temperature, params.seed, params.ignore_eos)
    if key not in _ALONE:
        engine_key = ("engine", layout)
        if engine_key not in _ALONE:
            _ALONE[engine_key] = LLM(**_engine_kwargs(request, layout), enable_prefix_caching=False)
        out = _ALONE[engine_key].generate([prompt], params, use_tqdm=False)[0]
        _ALONE[key] = (out.token_ids, out.augmentation)
    return _ALONE[key]


def _stress(request, layout: str, prefix_caching: bool, seeds) -> None:
    llm = LLM(**_engine_kwargs(request, layout), num_kv_blocks=_tight_blocks(layout), max_num_batched_tokens=16,
              enable_prefix_caching=prefix_caching)
    preemptions = 0
    for seed in seeds:
        rng = random.Random(seed)
        for batch in _random_workload(rng):
            prompts = [p for p, _ in batch]
            outs = llm.generate(prompts, [sp for _, sp in batch], use_tqdm=False)
            assert len(outs) == len(batch)
            for (prompt, params), out in zip(batch, outs):
                assert out.prompt_token_ids == prompt, "outputs out of order"
                _assert_consistent(llm, out, len(prompt))
                assert (out.token_ids, out.augmentation) == _alone(request, layout, prompt, params), \
                    f"seed {seed}: a request's output depends on its batch"
                preemptions += out.metrics["num_preemptions"]
            _assert_all_free(llm)
    return preemptions


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stress_quick(request, layout, prefix_caching):
    _stress(request, layout, prefix_caching, seeds=range(2))


@pytest.mark.stress
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stress_many(request, layout, prefix_caching):
    preemptions = _stress(request, layout, prefix_caching, seeds=range(100, 100 + STRESS_EXAMPLES))
    assert preemptions > 0, "the KV cache must be tight enough to preempt"

"""MemGen in the engine equals the HF oracle (memgen.hf, the reference's
semantics) token for token and decision for decision, in float64 on CPU.

Each case runs the oracle once on a batch (a row's oracle result does not
depend on its batch: tests/test_hf_memgen.py) and compares every row, up to
its first EOS, with the engine under several batchings and cache pressures.
"""
import dataclasses

import pytest
import torch

import fixtures
import memgen_fixtures
from memgen import LLM, SamplingParams
from memgen.checkpoint import load_checkpoint
from memgen.hf import HFMemGenModel

MAX_TOKENS = 20
PROMPTS = memgen_fixtures.PROMPTS + [
    "We add the numbers, then we check the result.",
    "Numbers 1 2 3 4 5.",
    "The quick brown fox jumps over the lazy dog. A new line, and more text.",
    "Finally, we write it down.",
    "Question: what is 12 plus 30? Answer:",
]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids, mask = memgen_fixtures.encode_prompts(tokenizer, PROMPTS)
    return ids, mask, [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]


@pytest.fixture(scope="module")
def separate_trigger_ckpt_dir(tmp_path_factory, tokenizer, memgen_reasoner_dir, wide_weaver_dir):
    """Active trigger on another checkpoint (hidden 96), weaver on the reasoner's base."""
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("memgen_sep_trigger"), tokenizer,
                                                   memgen_reasoner_dir, trigger_dir=wide_weaver_dir,
                                                   trigger_active=True, seed=3)


def _case(request, name):
    """(checkpoint, weaver dir, trigger dir) of a named case."""
    reasoner = request.getfixturevalue("memgen_reasoner_dir")
    wide = request.getfixturevalue("wide_weaver_dir")
    if name == "inactive":
        return load_checkpoint(request.getfixturevalue("memgen_ckpt_dir")), None, None
    if name == "active":
        return load_checkpoint(request.getfixturevalue("memgen_active_ckpt_dir")), None, None
    if name == "wide_weaver":
        return load_checkpoint(request.getfixturevalue("memgen_wide_ckpt_dir")), wide, None
    if name == "separate_trigger":
        return load_checkpoint(request.getfixturevalue("separate_trigger_ckpt_dir")), None, wide
    raise KeyError(name)


def _oracle(ckpt, reasoner, weaver, trigger, prompt_ids, eos):
    ids, mask, _ = prompt_ids
    model = HFMemGenModel.from_checkpoint(ckpt, reasoner, weaver, trigger, dtype=torch.float64)
    return memgen_fixtures.oracle_rows(model, ids, mask, MAX_TOKENS, eos)


def _engine(ckpt, reasoner, weaver, trigger, **options):
    return LLM(model=reasoner, memgen=ckpt, weaver_model=weaver, trigger_model=trigger, dtype="float64",
               **options)


def _check(outputs, expected, indices):
    for out, i in zip(outputs, indices):
        tokens, decisions = expected[i]
        assert out.token_ids == tokens, f"prompt {i}: tokens differ"
        assert out.augmentation == decisions, f"prompt {i}: augmentation masks differ"
        assert out.metrics["num_insertions"] == decisions.count(1)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.mark.parametrize("name,budget", [("inactive", 5), ("inactive", 0), ("active", 5), ("active", 0),
                                         ("wide_weaver", 5), ("separate_trigger", 2)])
def test_engine_equals_oracle(request, prompt_ids, tokenizer, memgen_reasoner_dir, name, budget):
    ckpt, weaver, trigger = _case(request, name)
    ckpt = dataclasses.replace(ckpt, settings=dataclasses.replace(ckpt.settings, max_inference_aug_num=budget))
    expected = _oracle(ckpt, memgen_reasoner_dir, weaver, trigger, prompt_ids, tokenizer.eos_token_id)
    all_decisions = [d for _, decisions in expected for d in decisions]
    assert 1 in all_decisions, "the case must insert somewhere"
    if ckpt.settings.trigger_active:
        assert 0 in all_decisions, "an active trigger must also skip somewhere"
    if budget == 0:
        assert all(d == -100 for _, decisions in expected for d in decisions[1:])

    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger)
    everything = list(range(len(prompts)))
    _check(llm.generate(prompts, GREEDY, use_tqdm=False), expected, everything)   # batch 8
    _check(llm.generate([prompts[2]], GREEDY, use_tqdm=False), expected, [2])      # batch 1, warm prefix cache
    order = everything[::-1]
    _check(llm.generate([prompts[i] for i in order], GREEDY, use_tqdm=False), expected, order)


@pytest.mark.parametrize("lazy", [True, False])
def test_engine_equals_oracle_under_pressure(request, prompt_ids, tokenizer, memgen_reasoner_dir, lazy):
    """Chunked prefill, preemption by recompute and a cold prefix cache change nothing,
    with lazy W/T streams and with W/T following R."""
    ckpt, weaver, trigger = _case(request, "active")
    expected = _oracle(ckpt, memgen_reasoner_dir, weaver, trigger, prompt_ids, tokenizer.eos_token_id)
    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger, max_model_len=96, block_size=4,
                  num_kv_blocks=90 if lazy else 78, max_num_batched_tokens=7, enable_prefix_caching=False,
                  lazy_memgen_streams=lazy)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(outs, expected, range(len(prompts)))
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0, "the KV budget must force preemption"
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_prefix_cache_hits_keep_outputs(request, prompt_ids, memgen_reasoner_dir):
    ckpt, weaver, trigger = _case(request, "active")
    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger, block_size=4)
    cold = llm.generate(prompts, GREEDY, use_tqdm=False)
    warm = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    assert [o.augmentation for o in warm] == [o.augmentation for o in cold]
    assert sum(o.metrics["num_cached_prompt_tokens"] for o in warm) > 0


def test_metrics_and_mask_contract(request, prompt_ids, memgen_reasoner_dir):
    ckpt, weaver, trigger = _case(request, "active")
    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger)
    table = llm.memgen.get().policy.delimiters
    for out in llm.generate(prompts, GREEDY, use_tqdm=False):
        assert len(out.augmentation) == len(out.token_ids)
        assert out.augmentation[0] in (0, 1)
        for i, d in enumerate(out.augmentation[1:], start=1):
            if d != -100:
                assert table.ends_with_delimiter[out.token_ids[i - 1]], "decisions only after delimiters"
        assert out.augmentation[1:].count(1) <= ckpt.settings.max_inference_aug_num
        k = {"prompt": ckpt.settings.prompt_latents_len, "inference": ckpt.settings.inference_latents_len}
        assert out.metrics["num_latent_positions"] == (
            k["prompt"] * (out.augmentation[0] == 1) + k["inference"] * out.augmentation[1:].count(1))
        assert out.metrics["num_trigger_calls"] == sum(d != -100 for d in out.augmentation)


def test_sampling_is_seeded_and_batch_independent(request, prompt_ids, memgen_reasoner_dir):
    ckpt, weaver, trigger = _case(request, "active")
    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=100 + i, trigger_sample=True)
              for i in range(len(prompts))]
    batch = llm.generate(prompts, params, use_tqdm=False)
    alone = llm.generate([prompts[3]], [params[3]], use_tqdm=False)[0]
    assert (alone.token_ids, alone.augmentation) == (batch[3].token_ids, batch[3].augmentation)
    decisions = [d for o in batch for d in o.augmentation if d != -100]
    assert 0 in decisions and 1 in decisions


def test_memgen_chat_uses_memgen_template(request, memgen_reasoner_dir, tokenizer):
    ckpt, weaver, trigger = _case(request, "inactive")
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger)
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    ids, _ = memgen_fixtures.encode_prompts(tokenizer, ["Hello"])
    assert out.prompt_token_ids == ids[0].tolist()
    assert out.augmentation[0] == 1   # inactive trigger: the prompt always inserts


def test_reference_compat_drops_lora(request, prompt_ids, memgen_reasoner_dir, tokenizer):
    """reference_compat reproduces the reference loader (LoRA off) exactly, and differs from the default."""
    ckpt_dir = request.getfixturevalue("memgen_ckpt_dir")
    _, _, prompts = prompt_ids
    compat = LLM(model=memgen_reasoner_dir, memgen=ckpt_dir, dtype="float64", reference_compat=True)
    plain = LLM(model=memgen_reasoner_dir, memgen=ckpt_dir, dtype="float64")
    a = compat.generate(prompts, GREEDY, use_tqdm=False)
    b = plain.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in a] != [o.token_ids for o in b]
    expected = _oracle(load_checkpoint(ckpt_dir, reference_compat=True), memgen_reasoner_dir, None, None,
                       prompt_ids, tokenizer.eos_token_id)
    _check(a, expected, range(len(prompts)))


# ---- bad input -------------------------------------------------------------------
def test_checkpoint_that_does_not_fit_its_base(memgen_wide_ckpt_dir, memgen_reasoner_dir):
    # the wide checkpoint's weaver parts are 96 wide: on the 64-wide reasoner base they do not fit
    with pytest.raises(ValueError, match="96|64"):
        LLM(model=memgen_reasoner_dir, memgen=memgen_wide_ckpt_dir, dtype="float64")


def test_missing_checkpoint_names_the_path(memgen_reasoner_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LLM(model=memgen_reasoner_dir, memgen=tmp_path / "nowhere")


def test_active_trigger_with_another_vocabulary(tmp_path, tokenizer, memgen_reasoner_dir, memgen_active_ckpt_dir):
    other = fixtures.build_tiny_model(tmp_path / "other_vocab", tokenizer, vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(model=memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, trigger_model=other, dtype="float64")


def test_non_finite_latents_are_reported(memgen_ckpt_dir, memgen_reasoner_dir):
    ckpt = load_checkpoint(memgen_ckpt_dir)
    ckpt.weaver_to_reasoner["bias"] = torch.full_like(ckpt.weaver_to_reasoner["bias"], float("nan"))
    llm = LLM(model=memgen_reasoner_dir, memgen=ckpt, dtype="float64")
    with pytest.raises(FloatingPointError, match="non-finite latents"):
        llm.generate("Hello", GREEDY, use_tqdm=False)


def test_memgen_type_error(memgen_reasoner_dir):
    with pytest.raises(TypeError, match="memgen"):
        LLM(model=memgen_reasoner_dir, memgen=42)


def test_live_weight_update(request, prompt_ids, tokenizer, memgen_reasoner_dir):
    """After update_memgen_weights the engine equals the oracle with the new
    weights, and nothing cached with the old weights is reused."""
    ckpt, weaver, trigger = _case(request, "active")
    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger)
    before = llm.generate(prompts, GREEDY, use_tqdm=False)
    g = torch.Generator().manual_seed(7)
    new = dataclasses.replace(ckpt, weaver_lora=dataclasses.replace(ckpt.weaver_lora, layers={
        m: (a, b + 0.2 * torch.randn(b.shape, generator=g, dtype=b.dtype))
        for m, (a, b) in ckpt.weaver_lora.layers.items()}))
    new.reasoner_to_weaver = {k: v * 1.5 for k, v in ckpt.reasoner_to_weaver.items()}
    llm.update_memgen_weights(new)
    after = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    expected = _oracle(new, memgen_reasoner_dir, weaver, trigger, prompt_ids, tokenizer.eos_token_id)
    _check(after, expected, range(len(prompts)))
    with pytest.raises(TypeError):
        llm.update_memgen_weights({"not": "a checkpoint"})


@pytest.mark.parametrize("name,budget", [("active", 5), ("separate_trigger", 2), ("wide_weaver", 5)])
def test_streams_following_the_reasoner_equal_the_oracle(request, prompt_ids, tokenizer, memgen_reasoner_dir,
                                                         name, budget):
    """lazy_memgen_streams=False (the CUDA default): W and T take one row per step beside R
    while insertions remain, instead of catching up in one chunk. Same tokens and masks;
    after the prompt, T never runs a multi-row chunk."""
    from memgen.memory import controller as ctl

    ckpt, weaver, trigger = _case(request, name)
    ckpt = dataclasses.replace(ckpt, settings=dataclasses.replace(ckpt.settings, max_inference_aug_num=budget))
    expected = _oracle(ckpt, memgen_reasoner_dir, weaver, trigger, prompt_ids, tokenizer.eos_token_id)
    t_chunks = {}

    _, _, prompts = prompt_ids
    llm = _engine(ckpt, memgen_reasoner_dir, weaver, trigger, lazy_memgen_streams=False)
    assert llm.memgen.get().policy.follow
    after_forward = llm.engine.runtime.after_forward

    def recording(chunks, hidden):
        """Records T's chunk sizes, then the latent runtime's own after_forward (engine/policy.py)."""
        for chunk in chunks:
            if chunk.stream.name == ctl.TRIGGER:
                t_chunks.setdefault(chunk.seq.seq_id, []).append(chunk.end - chunk.start)
        return after_forward(chunks, hidden)

    llm.engine.runtime.after_forward = recording
    _check(llm.generate(prompts, GREEDY, use_tqdm=False), expected, range(len(prompts)))
    if ckpt.settings.trigger_active:
        later = [n for sizes in t_chunks.values() for n in sizes[1:]]
        assert later and max(later) == 1

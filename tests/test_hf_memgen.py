"""memgen.hf, the HF+PEFT MemGen oracle: batch invariance of generate, the
augmentation-mask contract, teacher-forced sft_forward == greedy generation,
LoRA loading vs reference_compat, save/load round trip. float64 + sdpa."""
from contextlib import contextmanager

import pytest
import torch

from memgen.checkpoint import load_checkpoint
from memgen.hf import HFMemGenModel
from memgen_fixtures import PROMPTS, encode_prompts

MAX_NEW = 28


@pytest.fixture(scope="module")
def inactive_model(memgen_ckpt_dir, memgen_reasoner_dir):
    return HFMemGenModel.from_checkpoint(memgen_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def active_model(memgen_active_ckpt_dir, memgen_reasoner_dir):
    return HFMemGenModel.from_checkpoint(memgen_active_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def wide_model(memgen_wide_ckpt_dir, memgen_reasoner_dir, wide_weaver_dir):
    return HFMemGenModel.from_checkpoint(memgen_wide_ckpt_dir, memgen_reasoner_dir, weaver_dir=wide_weaver_dir,
                                         dtype=torch.float64)


@contextmanager
def budget(model, n):
    old = model.settings.max_inference_aug_num
    model.settings.max_inference_aug_num = n
    try:
        yield
    finally:
        model.settings.max_inference_aug_num = old


def until_eos(tokens: list[int], eos: int) -> int:
    """Length of the prefix up to and including the first EOS."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def check_augmentation_mask(model, out, aug, prompt_len):
    """The -100/0/1 contract, row by row: entry 0 (the prompt decision) is 0/1;
    entry i >= 1 is 0/1 exactly when the generated prefix ends with a delimiter
    and fewer than `budget` insertions happened before; -100 otherwise."""
    tok, budget_n = model.tokenizer, model.settings.max_inference_aug_num
    assert aug.shape == (out.shape[0], out.shape[1] - prompt_len)
    for b in range(out.shape[0]):
        row = aug[b].tolist()
        assert row[0] in (0, 1)
        inserted = 0
        for i in range(1, len(row)):
            at_delim = tok.decode(out[b, prompt_len:prompt_len + i], skip_special_tokens=False).endswith(
                (",", ".", "\n"))
            if at_delim and inserted < budget_n:
                assert row[i] in (0, 1), (b, i, row)
            else:
                assert row[i] == -100, (b, i, row)
            inserted += row[i] == 1
        assert inserted <= budget_n


def rows_alone(model, ids, mask, max_new=MAX_NEW):
    """Each row generated alone, without its padding columns."""
    results = []
    for b in range(ids.shape[0]):
        start = int(mask[b].argmax())
        out, aug = model.generate(ids[b:b + 1, start:], mask[b:b + 1, start:], max_new)
        results.append((out[0, ids.shape[1] - start:].tolist(), aug[0].tolist()))
    return results


CASES = [("inactive", 5), ("inactive", 0), ("active", 5), ("active", 0), ("wide", 2)]


@pytest.mark.parametrize("kind,budget_n", CASES, ids=[f"{k}-budget{n}" for k, n in CASES])
def test_batch_equals_rows_alone(request, kind, budget_n, monkeypatch):
    model = request.getfixturevalue(f"{kind}_model")
    tails = []
    real_generate = model.reasoner.generate
    monkeypatch.setattr(model.reasoner, "generate", lambda **kw: tails.append(1) or real_generate(**kw))
    ids, mask = encode_prompts(model.tokenizer)
    assert len(set(mask.sum(1).tolist())) == 3  # three different prompt lengths
    eos, prompt_len = model.tokenizer.eos_token_id, ids.shape[1]
    with budget(model, budget_n):
        out, aug = model.generate(ids, mask, MAX_NEW)
        check_augmentation_mask(model, out, aug, prompt_len)
        alone = rows_alone(model, ids, mask)
    compared = []  # decisions before each row's first EOS, i.e. the ones compared
    for b, (tokens, row_aug) in enumerate(alone):
        n = until_eos(tokens, eos)
        assert n == len(tokens) and len(row_aug) == n  # a row alone stops at its EOS
        assert out[b, prompt_len:prompt_len + n].tolist() == tokens, f"row {b} tokens"
        assert aug[b, :n].tolist() == row_aug, f"row {b} augmentation mask"
        compared += row_aug[1:]
    if kind != "inactive":  # (the fixtures' active-trigger runs include rows that stop early)
        assert any(until_eos(t, eos) < MAX_NEW for t, _ in alone), "no row stopped at EOS"
    if kind == "inactive":
        assert aug[:, 0].tolist() == [1, 1, 1]  # an inactive trigger always inserts at the prompt
    if budget_n > 0:
        assert 1 in compared, "no inference insertion happened"
        if kind != "inactive":
            assert 0 in compared, "the active trigger must both skip and insert"
    else:
        assert set(aug[:, 1:].flatten().tolist()) <= {-100}
        assert tails, "budget 0 must switch to the HF tail right after the prompt decision"


def test_sft_forward_reproduces_greedy_generation(inactive_model):
    model = inactive_model
    ids, mask = encode_prompts(model.tokenizer)
    eos = model.tokenizer.eos_token_id
    num_inference = 0
    for budget_n in (5, 1):
        with budget(model, budget_n):
            for b in range(ids.shape[0]):
                start = int(mask[b].argmax())
                prompt = ids[b, start:]
                out, aug = model.generate(prompt[None], torch.ones_like(prompt)[None], MAX_NEW)
                gen = out[0, prompt.shape[0]:]
                labels = torch.cat([torch.full_like(prompt, -100), gen])
                res = model.sft_forward(out[0], labels)
                p = prompt.shape[0]
                assert res.logits.shape == (out.shape[1], len(model.tokenizer))
                assert res.logits[p - 1:-1].argmax(-1).tolist() == gen.tolist()
                assert res.prompt_point == p
                want = [p + j for j, a in enumerate(aug[0].tolist()) if j >= 1 and a == 1]
                assert res.inference_points == want
                num_inference += len(want)
                assert torch.isfinite(res.loss) and res.loss > 0
                if eos in gen.tolist():
                    assert gen[-1] == eos
    assert num_inference > 0


def test_sft_forward_needs_one_supervision_start(inactive_model):
    ids = torch.arange(3, 13)
    labels = ids.clone()
    with pytest.raises(ValueError, match="exactly one start of supervision"):
        inactive_model.sft_forward(ids, labels)
    labels[:3] = -100
    labels[6] = -100
    with pytest.raises(ValueError, match="found 2"):
        inactive_model.sft_forward(ids, labels)


def test_lora_matters(memgen_active_ckpt_dir, memgen_reasoner_dir, active_model):
    compat = HFMemGenModel.from_checkpoint(memgen_active_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64,
                                           reference_compat=True)
    for peft_model, name in ((compat.weaver, "weaver"), (compat.trigger, "trigger")):
        bs = [p for n, p in peft_model.named_parameters() if f"lora_B.{name}" in n]
        assert len(bs) == 4 and all(torch.count_nonzero(p) == 0 for p in bs)
    ids, mask = encode_prompts(active_model.tokenizer)
    # the weaver's latents and the trigger's logits change with the LoRA
    emb = active_model.embed(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    with torch.no_grad():
        lat_full = active_model.weave(emb, mask, pos, "prompt")
        lat_compat = compat.weave(emb, mask, pos, "prompt")
        assert (lat_full - lat_compat).abs().max() > 1e-3
        assert (active_model.trigger_logits(ids) - compat.trigger_logits(ids)).abs().max() > 1e-3
    out_full, aug_full = active_model.generate(ids, mask, MAX_NEW)
    out_compat, aug_compat = compat.generate(ids, mask, MAX_NEW)
    assert not (torch.equal(out_full, out_compat) and torch.equal(aug_full, aug_compat))


def test_save_pretrained_round_trip(tmp_path, active_model, memgen_active_ckpt_dir, memgen_reasoner_dir):
    original = load_checkpoint(memgen_active_ckpt_dir)
    ckpt = active_model.to_checkpoint()
    for group in ("reasoner_to_weaver", "weaver_to_reasoner", "weaver", "trigger_head"):
        for k, v in getattr(original, group).items():
            assert torch.equal(getattr(ckpt, group)[k].float(), v), (group, k)
    for role in ("weaver_lora", "trigger_lora"):
        for module, (a, b) in getattr(original, role).layers.items():
            a2, b2 = getattr(ckpt, role).layers[module]
            assert torch.equal(a2.float(), a) and torch.equal(b2.float(), b)
    saved = active_model.save_pretrained(tmp_path / "saved")
    again = HFMemGenModel.from_checkpoint(saved, memgen_reasoner_dir, dtype=torch.float64)
    ids, mask = encode_prompts(active_model.tokenizer)
    out1, aug1 = active_model.generate(ids, mask, MAX_NEW)
    out2, aug2 = again.generate(ids, mask, MAX_NEW)
    assert torch.equal(out1, out2) and torch.equal(aug1, aug2)


def test_query_latents_fold_like_the_checkpoint(memgen_wide_ckpt_dir, wide_model):
    ckpt = load_checkpoint(memgen_wide_ckpt_dir)
    for kind in ("prompt", "inference"):
        with torch.no_grad():
            q = wide_model.query_latents(kind)
        assert q.shape == (getattr(ckpt.settings, f"{kind}_latents_len"), 96)
        assert torch.allclose(q, ckpt.folded_query_latents(kind).double(), atol=1e-6)


def test_from_random_runs(memgen_reasoner_dir, wide_weaver_dir):
    settings = {"prompt_latents_len": 2, "inference_latents_len": 1, "max_inference_aug_num": 1}
    model = HFMemGenModel.from_random(settings, memgen_reasoner_dir, weaver_dir=wide_weaver_dir, seed=0)
    assert model.to_checkpoint().weaver_base == str(wide_weaver_dir)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS[:2])
    out, aug = model.generate(ids, mask, 6)
    assert out.shape[1] - ids.shape[1] == aug.shape[1] <= 6
    assert aug[:, 0].tolist() == [1, 1]


def test_sampling_is_seeded_and_well_formed(active_model):
    ids, mask = encode_prompts(active_model.tokenizer)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(active_model.generate(ids, mask, 12, temperature=1.0, trigger_do_sample=True,
                                          weaver_do_sample=True))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert set(runs[0][1].flatten().tolist()) <= {-100, 0, 1}


def test_bad_inputs(inactive_model):
    ids, mask = encode_prompts(inactive_model.tokenizer)
    with pytest.raises(ValueError, match="left-padded"):
        inactive_model.generate(ids, mask.flip(1), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        inactive_model.generate(ids, mask, 0)
    with pytest.raises(ValueError, match="temperature"):
        inactive_model.generate(ids, mask, 4, temperature=-1.0)


def test_chat_template_matches_chatml(inactive_model, tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "obs"}]
    ours = inactive_model.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nobs<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ours.startswith(tokenizer.apply_chat_template(msgs[:2], tokenize=False))


def test_float64_checkpoint_loads_without_rounding(memgen_ckpt_dir, memgen_reasoner_dir):
    """A float64 checkpoint whose values are not float32 numbers comes back
    bit for bit from to_checkpoint(), and every parameter is float64: the
    projections, trigger head and LayerNorms are built in the checkpoint's
    dtype (a float32 module would round the copied weights)."""
    import dataclasses

    from memgen.checkpoint import cast_checkpoint

    ckpt = cast_checkpoint(load_checkpoint(memgen_ckpt_dir), torch.float64)
    g = torch.Generator().manual_seed(0)

    def nudge(d):
        return {k: v * (1 + 1e-9 * torch.randn(v.shape, generator=g, dtype=torch.float64)) for k, v in d.items()}

    ckpt = dataclasses.replace(ckpt, weaver=nudge(ckpt.weaver), trigger_head=nudge(ckpt.trigger_head),
                               reasoner_to_weaver=nudge(ckpt.reasoner_to_weaver),
                               weaver_to_reasoner=nudge(ckpt.weaver_to_reasoner))
    assert not torch.equal(ckpt.trigger_head["weight"].float().double(), ckpt.trigger_head["weight"])
    model = HFMemGenModel.from_checkpoint(ckpt, memgen_reasoner_dir, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    back = model.to_checkpoint()
    for group in ("weaver", "trigger_head", "reasoner_to_weaver", "weaver_to_reasoner"):
        for k, v in getattr(ckpt, group).items():
            assert torch.equal(getattr(back, group)[k], v), (group, k)
    for role in ("weaver_lora", "trigger_lora"):
        for module, (a, b) in getattr(ckpt, role).layers.items():
            assert torch.equal(getattr(back, role).layers[module][0], a)
            assert torch.equal(getattr(back, role).layers[module][1], b)
    ids, mask = encode_prompts(model.tokenizer, PROMPTS[:1])
    assert model.trigger_logits(ids).dtype == torch.float64

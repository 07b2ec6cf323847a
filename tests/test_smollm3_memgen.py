"""MemGen on SmolLM3 in the engine equals the HF oracle (memgen.hf) in float64,
token for token and decision for decision, batched and one at a time:

- SmolLM3 reasoner, weaver and trigger on one base, trigger inactive and active;
- the reference's smollm_*.sh pairings: a trigger (and for smollm_triviaqa.sh
  also the weaver) on a Qwen2 base of another width and another vocabulary,
  trigger inactive. The engine then never reads the trigger's weights and says
  so when it loads; an active trigger there is an error naming both vocabularies.
"""
import dataclasses
import logging
import shutil

import pytest
import torch

import fixtures
import memgen_fixtures
import smollm3_fixtures
from memgen import LLM, SamplingParams
from memgen.checkpoint import load_checkpoint, save_reference
from memgen.engine.extra_streams import BASE_POOL
from memgen.hf import HFMemGenModel
from memgen.memory.controller import TRIGGER

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MAX_TOKENS = 20
PROMPTS = memgen_fixtures.PROMPTS + [
    "We add the numbers, then we check the result.",
    "The quick brown fox jumps over the lazy dog. A new line, and more text.",
]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
OTHER_VOCAB = 400   # the Qwen2 trigger's vocabulary: not the reasoner's


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, tokenizer):
    """A SmolLM3 reasoner (tied, NoPE layers) that emits delimiters and EOS now and then."""
    return smollm3_fixtures.build_tiny_smollm3(tmp_path_factory.mktemp("smol_reasoner"), tokenizer, seed=5,
                                               delimiter_factor=2.0, eos_factor=1.5)


@pytest.fixture(scope="module")
def qwen_other_vocab_dir(tmp_path_factory, tokenizer):
    """A Qwen2 base of another width (48) and vocabulary (400): the reference's Qwen2.5 trigger."""
    return fixtures.build_tiny_model(tmp_path_factory.mktemp("qwen_other_vocab"), tokenizer, hidden_size=48,
                                     seed=7, vocab_size=OTHER_VOCAB)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids, mask = memgen_fixtures.encode_prompts(tokenizer, PROMPTS)
    return ids, mask, [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]


def _checkpoint(tmp_path_factory, tokenizer, smol_dir, name, **kw):
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp(name), tokenizer, smol_dir, **kw)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tokenizer, smol_dir, qwen_other_vocab_dir):
    """name -> (checkpoint dir, weaver dir, trigger dir, budget)."""
    other = qwen_other_vocab_dir
    return {
        "inactive": (_checkpoint(tmp_path_factory, tokenizer, smol_dir, "smol_inactive"), None, None, 5),
        "active": (_checkpoint(tmp_path_factory, tokenizer, smol_dir, "smol_active", trigger_active=True, seed=1),
                   None, None, 5),
        # smollm_kodcode.sh: SmolLM3 reasoner + weaver, Qwen2.5 trigger (inactive)
        "qwen_trigger": (_checkpoint(tmp_path_factory, tokenizer, smol_dir, "smol_qwen_trigger", trigger_dir=other,
                                     seed=2), None, other, 5),
        # smollm_triviaqa.sh: SmolLM3 reasoner, Qwen2.5 weaver and trigger (inactive), no inference insertions
        "qwen_weaver_trigger": (_checkpoint(tmp_path_factory, tokenizer, smol_dir, "smol_qwen_wt", weaver_dir=other,
                                            trigger_dir=other, seed=3), other, other, 0),
    }


def _oracle(ckpt, reasoner, weaver, trigger, prompt_ids, eos):
    ids, mask, _ = prompt_ids
    model = HFMemGenModel.from_checkpoint(ckpt, reasoner, weaver, trigger, dtype=torch.float64)
    assert model.reasoner.config.model_type == "smollm3"
    return memgen_fixtures.oracle_rows(model, ids, mask, MAX_TOKENS, eos)


def _check(outputs, expected, indices):
    for out, i in zip(outputs, indices):
        tokens, decisions = expected[i]
        assert out.token_ids == tokens, f"prompt {i}: tokens differ"
        assert out.augmentation == decisions, f"prompt {i}: augmentation masks differ"


@pytest.mark.parametrize("name", ["inactive", "active", "qwen_trigger", "qwen_weaver_trigger"])
def test_smollm3_memgen_equals_oracle(cases, name, prompt_ids, tokenizer, smol_dir):
    ckpt_dir, weaver, trigger, budget = cases[name]
    ckpt = load_checkpoint(ckpt_dir)
    ckpt = dataclasses.replace(ckpt, settings=dataclasses.replace(ckpt.settings, max_inference_aug_num=budget))
    expected = _oracle(ckpt, smol_dir, weaver, trigger, prompt_ids, tokenizer.eos_token_id)
    decisions = [d for _, ds in expected for d in ds]
    assert 1 in decisions, "the case must insert somewhere"
    if ckpt.settings.trigger_active:
        assert 0 in decisions, "an active trigger must also skip somewhere"
    elif budget:
        assert decisions.count(1) > len(PROMPTS), "inference insertions must happen, not only the prompt's"
    assert any(len(t) < MAX_TOKENS for t, _ in expected) or name == "qwen_weaver_trigger"

    _, _, prompts = prompt_ids
    llm = LLM(model=smol_dir, memgen=ckpt, weaver_model=weaver, trigger_model=trigger, dtype="float64")
    everything = list(range(len(prompts)))
    _check(llm.generate(prompts, GREEDY, use_tqdm=False), expected, everything)            # batched
    for i in everything:                                                                  # one at a time
        _check(llm.generate([prompts[i]], GREEDY, use_tqdm=False), expected, [i])


# ---- a trigger on another base with another vocabulary ----------------------------
def test_inactive_trigger_weights_are_never_read(cases, tmp_path, prompt_ids, tokenizer, smol_dir, caplog):
    """The Qwen2 trigger's weights file can be garbage: the engine never opens it,
    runs the trigger stream on no model, and logs the memory it did not spend."""
    ckpt_dir, _, trigger, _ = cases["qwen_trigger"]
    broken = tmp_path / "trigger_without_weights"
    shutil.copytree(trigger, broken)
    (broken / "model.safetensors").write_bytes(b"never read")
    with caplog.at_level(logging.INFO, logger="memgen"):
        llm = LLM(model=smol_dir, memgen=ckpt_dir, trigger_model=broken, dtype="float64")
    lines = [r.getMessage() for r in caplog.records if "trigger" in r.getMessage() and "layout" not in r.getMessage()]
    assert len(lines) == 1, lines
    assert "inactive" in lines[0] and "not loaded" in lines[0] and "MiB" in lines[0]
    # the Qwen2 trigger's parameters in float64: the figure the line reports
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trigger))
                       .parameters())
    assert f"{n_params * 8 / 2**20:.1f} MiB" in lines[0]
    version = llm.memgen.get()
    assert version.pools[TRIGGER] == 0 and [p.name for p in llm.engine.pools] == [BASE_POOL]
    expected = _oracle(load_checkpoint(ckpt_dir), smol_dir, None, trigger, prompt_ids, tokenizer.eos_token_id)
    _, _, prompts = prompt_ids
    _check(llm.generate(prompts, GREEDY, use_tqdm=False), expected, range(len(prompts)))


def test_inactive_trigger_base_not_given(cases, tmp_path, prompt_ids, tokenizer, smol_dir, caplog):
    """A reference-layout checkpoint does not record its trigger base: with the
    trigger inactive it loads and runs without one, though the trigger head's
    width (48) is not the reasoner's (64)."""
    ckpt_dir, _, trigger, _ = cases["qwen_trigger"]
    assert load_checkpoint(ckpt_dir).trigger_base is None
    with caplog.at_level(logging.INFO, logger="memgen"):
        llm = LLM(model=smol_dir, memgen=ckpt_dir, dtype="float64")
    assert any("inactive" in r.getMessage() and "not loaded" in r.getMessage() for r in caplog.records)
    expected = _oracle(load_checkpoint(ckpt_dir), smol_dir, None, trigger, prompt_ids, tokenizer.eos_token_id)
    _, _, prompts = prompt_ids
    _check(llm.generate(prompts, GREEDY, use_tqdm=False), expected, range(len(prompts)))
    # a weight push (training) keeps that layout: the unnamed trigger base stays unchecked
    version = llm.memgen_version
    llm.update_memgen_weights(load_checkpoint(ckpt_dir))
    assert llm.memgen_version == version + 1
    _check(llm.generate(prompts, GREEDY, use_tqdm=False), expected, range(len(prompts)))


def test_active_trigger_with_another_vocabulary_is_an_error(cases, tmp_path, smol_dir, tokenizer):
    ckpt_dir, _, trigger, _ = cases["qwen_trigger"]
    ckpt = load_checkpoint(ckpt_dir)
    active = save_reference(dataclasses.replace(ckpt, settings=dataclasses.replace(ckpt.settings,
                                                                                    trigger_active=True)),
                            tmp_path / "active")
    with pytest.raises(ValueError) as err:
        LLM(model=smol_dir, memgen=active, trigger_model=trigger, dtype="float64")
    message = str(err.value)
    assert str(OTHER_VOCAB) in message and str(len(tokenizer)) in message and "vocabulary" in message

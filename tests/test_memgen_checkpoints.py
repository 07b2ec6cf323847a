"""Several MemGen checkpoints on one base (LLM(memgen={name: ckpt})), changed live.

Every output is compared, in float64, with an LLM that runs that checkpoint alone
(itself held to the HF oracle by test_memgen_engine.py): mixed in one batch, under
KV pressure with the prefix cache on (W/T entries must never cross checkpoints), and
across live loads, updates and unloads.
"""
import dataclasses

import pytest
import torch

import memgen_fixtures
from memgen import LLM, SamplingParams
from memgen.checkpoint import load_checkpoint

MAX_TOKENS = 16
PROMPTS = memgen_fixtures.PROMPTS + ["We add the numbers, then we check the result.", "Numbers 1 2 3 4 5."]


def _params(name=None, **kw):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, memgen_checkpoint=name, **kw)


@pytest.fixture(scope="module")
def ckpts(request, tmp_path_factory, tokenizer, memgen_reasoner_dir):
    """name -> MemGenCheckpoint: inactive trigger, active trigger, another active one with other
    latent counts, and one whose weaver runs on its own (wider) model."""
    other = memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("memgen_other"), tokenizer,
                                                    memgen_reasoner_dir, prompt_latents_len=2,
                                                    inference_latents_len=3, trigger_active=True, seed=5)
    wide = load_checkpoint(request.getfixturevalue("memgen_wide_ckpt_dir"))
    return {"inactive": load_checkpoint(request.getfixturevalue("memgen_ckpt_dir")),
            "active": load_checkpoint(request.getfixturevalue("memgen_active_ckpt_dir")),
            "other": load_checkpoint(other),
            "wide": dataclasses.replace(wide, weaver_base=str(request.getfixturevalue("wide_weaver_dir")))}


def _alone(reasoner, ckpt, prompts=PROMPTS):
    llm = LLM(model=reasoner, memgen=ckpt, dtype="float64")
    return [(o.token_ids, o.augmentation) for o in llm.generate(prompts, _params(), use_tqdm=False)]


def _rows(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].augmentation) for o in outputs]


def _moved(ckpt, seed: int):
    """The same checkpoint with other weaver LoRA weights and projection."""
    g = torch.Generator().manual_seed(seed)
    new = dataclasses.replace(ckpt, weaver_lora=dataclasses.replace(ckpt.weaver_lora, layers={
        m: (a, b + 0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
        for m, (a, b) in ckpt.weaver_lora.layers.items()}))
    new.reasoner_to_weaver = {k: v * 1.5 for k, v in ckpt.reasoner_to_weaver.items()}
    return new


@pytest.mark.parametrize("pressure", [False, True])
def test_mixed_checkpoints_equal_each_alone(ckpts, memgen_reasoner_dir, pressure, torch_one_thread):
    """Every prompt on every checkpoint in one call, interleaved, prefix cache on: the
    same tokens and masks as each checkpoint alone; with a small KV cache, under preemption."""
    expected = {name: _alone(memgen_reasoner_dir, ckpt) for name, ckpt in ckpts.items()}
    options = dict(num_kv_blocks=16, max_num_seqs=8, max_model_len=64) if pressure else {}
    llm = LLM(model=memgen_reasoner_dir, memgen=ckpts, dtype="float64", enable_prefix_caching=True, **options)
    assert llm.memgen_checkpoints() == {name: 0 for name in ckpts}
    names = [name for _ in PROMPTS for name in ckpts]
    prompts = [p for p in PROMPTS for _ in ckpts]
    outputs = llm.generate(prompts, [_params(n) for n in names], use_tqdm=False)
    for i, (name, out) in enumerate(zip(names, outputs)):
        assert _rows([out])[0] == expected[name][i // len(ckpts)], f"{name}, prompt {i // len(ckpts)}"
        assert out.outputs[0].metrics["memgen_checkpoint"] == name
        assert out.outputs[0].metrics["memgen_version"] == 0
    if pressure:
        assert sum(o.outputs[0].metrics["num_preemptions"] for o in outputs) > 0
    # the wide weaver has its own pool; every other role shares the reasoner's forward
    assert [p.name for p in llm.engine.pools] == ["base", "W"]
    # the default is the first checkpoint
    assert _rows(llm.generate(PROMPTS[:2], _params(), use_tqdm=False)) == expected["inactive"][:2]


def test_update_while_a_request_runs(ckpts, memgen_reasoner_dir, torch_one_thread):
    """A request that started on version 0 finishes on it; requests made after the update
    run version 1; the old version's adapters go once its last request is gone."""
    old, new = ckpts["active"], _moved(ckpts["active"], 3)
    prompt = PROMPTS[1]
    old_alone, new_alone = _alone(memgen_reasoner_dir, old, [prompt]), _alone(memgen_reasoner_dir, new, [prompt])
    assert old_alone != new_alone
    llm = LLM(model=memgen_reasoner_dir, memgen={"a": old}, dtype="float64")
    binder = llm.engine.stream_binder
    stream = llm.stream(prompt, _params("a"))
    next(stream)                                   # the request runs on version 0
    assert llm.update_memgen("a", new) == 1
    assert len(llm.memgen.retiring) == 1           # version 0 still runs a request
    assert len(binder._used_adapter_ids) == 4
    after = llm.generate([prompt], _params("a"), use_tqdm=False)[0].outputs[0]
    assert (after.token_ids, after.augmentation) == new_alone[0]
    assert after.metrics["memgen_version"] == 1
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            first = stop.value.outputs[0]
            break
    assert (first.token_ids, first.augmentation) == old_alone[0]
    assert first.metrics["memgen_version"] == 0
    # the next live change lets version 0 go; an idle version is updated in place
    assert llm.update_memgen("a", old) == 2
    assert llm.memgen.retiring == [] and len(binder._used_adapter_ids) == 2
    out = llm.generate([prompt], _params("a"), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.augmentation) == old_alone[0] and out.metrics["memgen_version"] == 2


def test_load_and_unload(ckpts, memgen_reasoner_dir, tmp_path, torch_one_thread):
    expected = _alone(memgen_reasoner_dir, ckpts["other"])
    llm = LLM(model=memgen_reasoner_dir, memgen={"a": ckpts["active"]}, dtype="float64")
    ids_before = set(llm.engine.stream_binder._used_adapter_ids)
    # a corrupt directory: a clear error, nothing half-loaded, the engine still serves "a"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises((ValueError, OSError)):
        llm.load_memgen("b", broken)
    assert llm.memgen_checkpoints() == {"a": 0}
    assert llm.engine.stream_binder._used_adapter_ids == ids_before
    # a checkpoint whose weaver runs on a model this LLM did not load
    with pytest.raises(ValueError, match="did not load"):
        llm.load_memgen("w", ckpts["wide"])
    assert llm.engine.stream_binder._used_adapter_ids == ids_before
    # load from a directory, then run it beside "a"
    from memgen.checkpoint import save_reference
    assert llm.load_memgen("b", save_reference(ckpts["other"], tmp_path / "other")) == 0
    outs = llm.generate(PROMPTS, [_params("b"), _params("a")] * (len(PROMPTS) // 2) + [_params("b")] *
                        (len(PROMPTS) % 2), use_tqdm=False)
    for i, out in enumerate(outs):
        if out.outputs[0].metrics["memgen_checkpoint"] == "b":
            assert _rows([out])[0] == expected[i]
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_memgen("b", ckpts["other"])
    llm.unload_memgen("b")
    assert llm.memgen_checkpoints() == {"a": 0}
    with pytest.raises(ValueError, match="unknown MemGen checkpoint 'b'"):
        llm.generate(PROMPTS[0], _params("b"), use_tqdm=False)
    assert llm.engine.stream_binder._used_adapter_ids == ids_before
    # loaded again under the same name: its version goes on counting
    assert llm.load_memgen("b", ckpts["other"]) == 1


def test_version_bound_and_bad_input(ckpts, memgen_reasoner_dir):
    llm = LLM(model=memgen_reasoner_dir, memgen={"a": ckpts["active"]}, dtype="float64", max_memgen_versions=2)
    llm.load_memgen("b", ckpts["other"])
    with pytest.raises(RuntimeError, match="max_memgen_versions=2"):
        llm.load_memgen("c", ckpts["inactive"])
    with pytest.raises(ValueError, match="unknown MemGen checkpoint 'c'"):
        llm.update_memgen("c", ckpts["inactive"])
    with pytest.raises(ValueError, match="unknown MemGen checkpoint"):
        llm.unload_memgen("c")
    with pytest.raises(TypeError, match="memgen_checkpoint"):
        SamplingParams(memgen_checkpoint=3)
    with pytest.raises(ValueError, match="memgen=\\{\\}"):
        LLM(model=memgen_reasoner_dir, memgen={})
    with pytest.raises(ValueError, match="max_memgen_versions"):
        LLM(model=memgen_reasoner_dir, memgen={"a": ckpts["active"]}, max_memgen_versions=0)
    plain = LLM(model=memgen_reasoner_dir, dtype="float64")
    with pytest.raises(ValueError, match="plain model"):
        plain.generate(PROMPTS[0], _params("a"), use_tqdm=False)
    with pytest.raises(ValueError, match="plain model"):
        plain.load_memgen("a", ckpts["active"])


def test_checkpoint_on_another_base_is_refused(ckpts, memgen_reasoner_dir, wide_weaver_dir):
    """A checkpoint made for another reasoner (hidden 64 on a 96-wide base) fails its shape
    check, named; live, the engine keeps its checkpoints."""
    with pytest.raises(ValueError, match="MemGen checkpoint 'x'"):
        LLM(model=wide_weaver_dir, memgen={"x": ckpts["active"]}, dtype="float64")
    llm = LLM(model=memgen_reasoner_dir, memgen={"a": ckpts["active"]}, dtype="float64")
    other_base = dataclasses.replace(ckpts["active"], reasoner_to_weaver={
        k: v[..., :32] if k == "weight" else v for k, v in ckpts["active"].reasoner_to_weaver.items()})
    with pytest.raises(ValueError, match="MemGen checkpoint 'y'"):
        llm.load_memgen("y", other_base)
    assert llm.memgen_checkpoints() == {"a": 0}


def test_weight_pushes_copy_in_place_and_log_once(ckpts, memgen_reasoner_dir, caplog):
    """A trainer's push per step: the adapter stacks keep their tensors (copied into, not
    rebuilt) and the inactive trigger's load note is not repeated."""
    import logging

    from memgen.layers.lora import LoraHook

    with caplog.at_level(logging.WARNING, logger="memgen"):
        llm = LLM(model=memgen_reasoner_dir, memgen={"a": ckpts["inactive"]}, dtype="float64")
        stacks = [id(t) for m in llm.engine.model_runner.model.modules() if isinstance(getattr(m, "lora", None),
                                                                                      LoraHook)
                  for s in m.lora.stacks() for t in s[1:]]
        for seed in range(3):
            llm.update_memgen_weights(_moved(ckpts["inactive"], seed))
    after = [id(t) for m in llm.engine.model_runner.model.modules() if isinstance(getattr(m, "lora", None), LoraHook)
             for s in m.lora.stacks() for t in s[1:]]
    assert after == stacks
    assert sum("trigger inactive" in r.getMessage() for r in caplog.records) == 1
    expected = _alone(memgen_reasoner_dir, _moved(ckpts["inactive"], 2), PROMPTS[:2])
    assert _rows(llm.generate(PROMPTS[:2], _params(), use_tqdm=False)) == expected

"""Which model each MemGen role runs on: a weaver or trigger base given as
another directory holding the same model (same config, byte-identical
weights) shares the reasoner's model and forward; different weights get their
own pool. The load log names the layout."""
import logging
import shutil

import torch
from safetensors.torch import load_file, save_file

from memgen import LLM, SamplingParams
from memgen.sources import same_model

PARAMS = SamplingParams(temperature=0.0, max_tokens=10)


def test_a_copy_of_the_reasoner_shares_its_model(tmp_path, memgen_reasoner_dir, memgen_active_ckpt_dir, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(memgen_reasoner_dir, copy)
    assert same_model(copy, memgen_reasoner_dir)
    with caplog.at_level(logging.INFO, logger="memgen.llm"):
        llm = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, weaver_model=copy, trigger_model=copy,
                  dtype="float64")
    assert [p.name for p in llm.engine.pools] == ["base"]
    assert "weaver on the reasoner's model" in caplog.text and "trigger on the reasoner's model" in caplog.text
    alone = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float64")
    prompts = ["What is 12 plus 30?", "Hello. Then, go"]
    assert [o.token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)] == \
        [o.token_ids for o in alone.generate(prompts, PARAMS, use_tqdm=False)]


def test_other_weights_get_their_own_pool(tmp_path, memgen_reasoner_dir, memgen_active_ckpt_dir):
    other = tmp_path / "other"
    shutil.copytree(memgen_reasoner_dir, other)
    (weights,) = other.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert not same_model(other, memgen_reasoner_dir)
    llm = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, weaver_model=other, dtype="float64")
    assert [p.name for p in llm.engine.pools] == ["base", "W"]
    assert torch.is_tensor(llm.engine.pools[1].runner.model.model.embed_tokens.weight)


def test_same_model_needs_the_same_config(tmp_path, memgen_reasoner_dir):
    import json

    other = tmp_path / "cfg"
    shutil.copytree(memgen_reasoner_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (other / "config.json").write_text(json.dumps(config))
    assert not same_model(other, memgen_reasoner_dir)
    config["rms_norm_eps"] = config["rms_norm_eps"] / 10
    config["_name_or_path"] = "elsewhere"       # where it was loaded from is not the model
    (other / "config.json").write_text(json.dumps(config))
    assert same_model(other, memgen_reasoner_dir)

"""`memgen init` / `memgen.checkpoint.init`: a fresh checkpoint with the flags'
settings, initialised as the reference does, that the engine loads; refusals
of bad values and of existing output; `memgen --version`."""
import json

import pytest
import torch

import memgen
from memgen import LLM, SamplingParams
from memgen.checkpoint import load_checkpoint
from memgen.checkpoint.init import InitOptions, init_checkpoint
from memgen.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"memgen {memgen.__version__}"


def test_init_cli_settings_are_the_flags_and_the_engine_loads_it(tmp_path, memgen_reasoner_dir, capsys):
    out = tmp_path / "ckpt"
    assert main(["init", str(out), "--model", str(memgen_reasoner_dir), "--prompt-latents", "3",
                 "--inference-latents", "2", "--budget", "4", "--trigger-active", "--lora-r", "4",
                 "--lora-alpha", "8", "--lora-targets", "q_proj", "k_proj", "o_proj", "--seed", "7"]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())     # the reference layout
    assert config["model_type"] == "memgen" and (out / "weaver" / "weaver").is_dir()
    assert config["hidden_size"] == 64 and "_name_or_path" not in config   # no local path recorded
    ckpt = load_checkpoint(out)
    s = ckpt.settings
    assert (s.prompt_latents_len, s.inference_latents_len, s.max_inference_aug_num, s.trigger_active) == \
           (3, 2, 4, True)
    for lora in (ckpt.weaver_lora, ckpt.trigger_lora):
        assert (lora.r, lora.alpha) == (4, 8)
        assert sorted(lora.target_modules) == ["k_proj", "o_proj", "q_proj"]
        assert {m.rsplit(".", 1)[-1] for m in lora.layers} == {"q_proj", "k_proj", "o_proj"}
        # the reference's init: B zero (the adapter starts as a no-op), A not
        assert all(not b.any() and a.any() for a, b in lora.layers.values())
    assert ckpt.weaver["prompt_query_latents"].shape == (3, 64)
    assert torch.equal(ckpt.weaver["prompt_latent_ln.weight"], torch.ones(64))

    llm = LLM(model=memgen_reasoner_dir, memgen=out, dtype="float32")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    outs = llm.chat([[{"role": "user", "content": "Hello"}]], params, use_tqdm=False)
    aug = outs[0].augmentation
    assert len(aug) == len(outs[0].token_ids) and set(aug) <= {-100, 0, 1}
    assert sum(a == 1 for a in aug[1:]) <= 4           # the budget caps inference insertions


def test_init_trigger_inactive_inserts_until_budget(tmp_path, memgen_reasoner_dir):
    """Defaults (trigger inactive): the prompt insertion always happens."""
    out, ckpt = init_checkpoint(tmp_path / "c", memgen_reasoner_dir,
                                InitOptions(prompt_latents=2, inference_latents=2, budget=1, lora_r=2))
    assert ckpt.settings.trigger_active is False
    llm = LLM(model=memgen_reasoner_dir, memgen=out, dtype="float32")
    o = llm.chat([[{"role": "user", "content": "Hello"}]], SamplingParams(max_tokens=8, temperature=0.0),
                 use_tqdm=False)[0]
    assert o.augmentation[0] == 1 and o.metrics["num_insertions"] >= 1


def test_init_seed_decides_the_weights(tmp_path, memgen_reasoner_dir):
    opts = InitOptions(prompt_latents=2, inference_latents=2, lora_r=2)
    _, a = init_checkpoint(tmp_path / "a", memgen_reasoner_dir, opts)
    _, b = init_checkpoint(tmp_path / "b", memgen_reasoner_dir, opts)
    _, c = init_checkpoint(tmp_path / "c", memgen_reasoner_dir, InitOptions(prompt_latents=2, inference_latents=2,
                                                                            lora_r=2, seed=1))
    q = "prompt_query_latents"
    assert torch.equal(a.weaver[q], b.weaver[q]) and not torch.equal(a.weaver[q], c.weaver[q])
    assert torch.equal(load_checkpoint(tmp_path / "a").weaver[q], a.weaver[q])


def test_init_other_weaver_in_the_export_layout(tmp_path, memgen_reasoner_dir, wide_weaver_dir):
    """A weaver on another (wider) base: the safetensors layout records it, so
    LLM needs no weaver_model."""
    out = tmp_path / "wide"
    assert main(["init", str(out), "--model", str(memgen_reasoner_dir), "--weaver-model", str(wide_weaver_dir),
                 "--prompt-latents", "2", "--inference-latents", "2", "--lora-r", "2", "--format",
                 "safetensors"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.weaver_base == str(wide_weaver_dir) and ckpt.trigger_base is None
    assert ckpt.weaver["inference_query_latents"].shape == (2, 96)
    assert ckpt.reasoner_to_weaver["weight"].shape == (96, 64)
    llm = LLM(model=memgen_reasoner_dir, memgen=out, dtype="float32")
    o = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    assert len(o.token_ids) >= 1


@pytest.mark.parametrize("argv, message", [
    (["--prompt-latents", "-1"], "prompt-latents must be an integer >= 0"),
    (["--budget", "-2"], "budget must be an integer >= 0"),
    (["--lora-r", "0"], "lora-r must be an integer >= 1"),
    (["--lora-alpha", "0"], "lora-alpha must be > 0"),
    (["--lora-dropout", "1"], "lora-dropout must be in [0, 1)"),
    (["--lora-targets", "q_proj", "nope_proj"], "'nope_proj' matches no Linear"),
])
def test_init_bad_values_one_line(tmp_path, memgen_reasoner_dir, capsys, argv, message):
    out = tmp_path / "x"
    assert main(["init", str(out), "--model", str(memgen_reasoner_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_init_refuses_existing_output_unless_overwrite(tmp_path, memgen_reasoner_dir, capsys):
    out = tmp_path / "ckpt"
    base = ["init", str(out), "--model", str(memgen_reasoner_dir), "--lora-r", "2"]
    assert main(base + ["--budget", "1"]) == 0
    assert main(base + ["--budget", "3"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert load_checkpoint(out).settings.max_inference_aug_num == 1
    assert main(base + ["--budget", "3", "--overwrite"]) == 0
    assert load_checkpoint(out).settings.max_inference_aug_num == 3
    # a reference checkpoint replaced by an export: no stale reference files remain to confuse the loader
    assert main(base + ["--overwrite", "--format", "safetensors"]) == 0
    assert not (out / "projs.bin").exists() and (out / "memgen_config.json").is_file()
    # --overwrite never deletes a directory that is not a checkpoint
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["init", str(other), "--model", str(memgen_reasoner_dir), "--overwrite"]) == 2
    assert "not a MemGen checkpoint" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    # an empty directory is fine without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["init", str(empty), "--model", str(memgen_reasoner_dir), "--lora-r", "2"]) == 0

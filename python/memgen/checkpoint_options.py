"""The flags of a fresh MemGen checkpoint, defined once for every command that
makes one (`memgen init`, `memgen bench`'s random init, `memgen train` without
--memgen), so one concept has one name everywhere. The canonical names:

    --prompt-latents N       K latents inserted after the prompt
    --inference-latents N    K latents per insertion while decoding
    --budget N               most insertions while decoding (the reference's max_inference_aug_num)
    --trigger-active / --no-trigger-active
    --lora-r, --lora-alpha, --lora-targets, --lora-dropout
    --init-seed N            seed of the random initialisation
and, beside them:
    --format {reference,safetensors}   the checkpoint's file layout (add_format_argument)
    --weaver-model DIR, --trigger-model DIR   the weaver's and trigger's base models

Old spellings stay as hidden aliases (`add_deprecated_alias`: not in --help,
one line on stderr when used): `init --seed`, `init/bench --trigger-inactive`,
`bench --latents` (both latent counts), `convert --to`, `convert --weaver-base /
--trigger-base`, `train --max-inference-aug`, `train --save-format`.

Light on purpose: the CLI builds its parser from it before torch loads.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

# the reference YAMLs' values (InitOptions and random_init agree)
DEFAULT_PROMPT_LATENTS = 8
DEFAULT_INFERENCE_LATENTS = 8
DEFAULT_BUDGET = 5
DEFAULT_LORA_R = 16
DEFAULT_LORA_ALPHA = 32.0
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
DEFAULT_LORA_DROPOUT = 0.1
DEFAULT_INIT_SEED = 0
FORMATS = ("reference", "safetensors")

_UNSET = object()


class _DeprecatedAlias(argparse.Action):
    """An old flag name: sets the canonical flag's destination(s) and says, on one
    line of stderr, which name to use instead."""

    def __init__(self, option_strings, dest, *, canonical: str, dests: tuple[str, ...], value: Any = _UNSET,
                 **kwargs):
        super().__init__(option_strings, dest, nargs=0 if value is not _UNSET else None, **kwargs)
        self.canonical, self.dests, self.value = canonical, dests, value

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.canonical}", file=sys.stderr)
        for dest in self.dests:
            setattr(namespace, dest, values if self.value is _UNSET else self.value)


def add_deprecated_alias(parser, old: str, canonical: str, dest: str | tuple[str, ...], *, value: Any = _UNSET,
                         type=None, choices=None, metavar=None) -> None:
    """Accept the old flag `old` as `canonical`, hidden from --help: it stores its
    argument (parsed with `type`, checked against `choices`), or `value` when
    given (then it takes no argument), into `dest` (a tuple: every one of them).

        add_deprecated_alias(g, "--seed", "--init-seed", "init_seed", type=int)
        add_deprecated_alias(g, "--trigger-inactive", "--no-trigger-active", "trigger_active", value=False)
    """
    parser.add_argument(old, action=_DeprecatedAlias, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, canonical=canonical,
                        dests=(dest,) if isinstance(dest, str) else tuple(dest), value=value, type=type,
                        choices=choices, metavar=metavar)


class _BooleanFlag(argparse.BooleanOptionalAction):
    """--x / --no-x, with the help as written (Python 3.10's BooleanOptionalAction
    appends its own '(default: ...)', which would say True/False twice)."""

    def __init__(self, option_strings, dest, help=None, **kwargs):
        super().__init__(option_strings, dest, help=help, **kwargs)
        self.help = help


def _trigger_help(trigger_default: bool, why: str | None) -> str:
    state = "active" if trigger_default else "inactive"
    return ("--trigger-active: the trigger head decides at each delimiter whether to insert; "
            "--no-trigger-active: insert at every delimiter until the budget is spent "
            f"(default: {state}{': ' + why if why else ''})")


def add_fresh_checkpoint_arguments(group, *, trigger_default: bool, trigger_why: str | None = None,
                                   lora: bool = True, init_seed: bool = True, defer_defaults: bool = False) -> None:
    """--prompt-latents, --inference-latents, --budget, --trigger-active /
    --no-trigger-active, and (unless turned off) --lora-r, --lora-alpha,
    --lora-targets, --lora-dropout and --init-seed, on `group` (a parser or an
    argument group). Every help states its default. `trigger_default`: whether the
    trigger is active when neither flag is given (`trigger_why` says why).

    `defer_defaults`: parse absent flags as None (so a command can tell which were
    given, e.g. to refuse them beside --memgen); `fill_fresh_checkpoint_defaults`
    then puts the defaults in."""
    def default(value):
        return None if defer_defaults else value

    group.add_argument("--prompt-latents", type=int, default=default(DEFAULT_PROMPT_LATENTS), metavar="N",
                       help=f"K latents the weaver inserts after the prompt (default: {DEFAULT_PROMPT_LATENTS})")
    group.add_argument("--inference-latents", type=int, default=default(DEFAULT_INFERENCE_LATENTS), metavar="N",
                       help=f"K latents per insertion while decoding (default: {DEFAULT_INFERENCE_LATENTS})")
    group.add_argument("--budget", type=int, default=default(DEFAULT_BUDGET), metavar="N",
                       help="most insertions while decoding, per request (the reference's max_inference_aug_num; "
                            f"default: {DEFAULT_BUDGET})")
    group.add_argument("--trigger-active", action=_BooleanFlag, default=default(trigger_default),
                       help=_trigger_help(trigger_default, trigger_why))
    if lora:
        group.add_argument("--lora-r", type=int, default=default(DEFAULT_LORA_R), metavar="R",
                           help=f"LoRA rank of the weaver and the trigger (default: {DEFAULT_LORA_R})")
        group.add_argument("--lora-alpha", type=float, default=default(DEFAULT_LORA_ALPHA), metavar="ALPHA",
                           help=f"LoRA alpha (default: {DEFAULT_LORA_ALPHA:g})")
        group.add_argument("--lora-targets", nargs="+", default=default(list(DEFAULT_LORA_TARGETS)),
                           metavar="MODULE", help="module names the LoRAs adapt (default: "
                                                  f"{' '.join(DEFAULT_LORA_TARGETS)})")
        group.add_argument("--lora-dropout", type=float, default=default(DEFAULT_LORA_DROPOUT), metavar="P",
                           help=f"LoRA dropout, used in training (default: {DEFAULT_LORA_DROPOUT:g})")
    if init_seed:
        group.add_argument("--init-seed", type=int, default=default(DEFAULT_INIT_SEED), metavar="SEED",
                           help=f"seed of the random initialisation (default: {DEFAULT_INIT_SEED})")


_FLAG_DEFAULTS = {"prompt_latents": DEFAULT_PROMPT_LATENTS, "inference_latents": DEFAULT_INFERENCE_LATENTS,
                  "budget": DEFAULT_BUDGET, "lora_r": DEFAULT_LORA_R, "lora_alpha": DEFAULT_LORA_ALPHA,
                  "lora_targets": DEFAULT_LORA_TARGETS, "lora_dropout": DEFAULT_LORA_DROPOUT,
                  "init_seed": DEFAULT_INIT_SEED}


def fill_fresh_checkpoint_defaults(args: argparse.Namespace, *, trigger_default: bool) -> list[str]:
    """After `add_fresh_checkpoint_arguments(..., defer_defaults=True)`: the flags
    the user gave (canonical names, --trigger-active or --no-trigger-active), and
    every absent one set to its default."""
    given = []
    for dest, value in {**_FLAG_DEFAULTS, "trigger_active": trigger_default}.items():
        if not hasattr(args, dest):
            continue
        if getattr(args, dest) is None:
            setattr(args, dest, list(value) if isinstance(value, tuple) else value)
        elif dest == "trigger_active":
            given.append("--trigger-active" if args.trigger_active else "--no-trigger-active")
        else:
            given.append("--" + dest.replace("_", "-"))
    return given


def add_format_argument(parser, *, default: str, help: str | None = None) -> None:
    """--format {reference,safetensors}: the layout a checkpoint is written in."""
    parser.add_argument("--format", choices=FORMATS, default=default,
                        help=help or ("files to write: reference: the reference's save_pretrained layout; "
                                      "safetensors: this project's export (memgen_config.json and .safetensors), "
                                      f"which also records the weaver's and trigger's base models (default: "
                                      f"{default})"))

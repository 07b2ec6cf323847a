"""`memgen train {sft,weaver-grpo,trigger-grpo}`: weaver SFT, weaver GRPO and
trigger GRPO on `memgen.hf` with engine rollouts. The main CLI wires these two
functions under its `train` subcommand:

    add_train_arguments(parser)      # fills an argparse (sub)parser
    run_train_from_args(args) -> int # runs; 0 on success

Writes to --output-dir: the final checkpoint (reference layout in reference/,
safetensors export in export/, per --format), step-N/ checkpoints with
--save-every, train_log.jsonl (one line per optimizer step) and
train_summary.json. `--memgen OUTPUT_DIR` loads the final checkpoint from the
folder itself (load_checkpoint finds export/ or reference/ in it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .data import ANSWER_TEMPLATE   # data.py imports no torch: --help stays light

MODES = ("sft", "weaver-grpo", "trigger-grpo")


DESCRIPTION = ("Train MemGen on memgen.hf with engine rollouts: weaver SFT, weaver GRPO, or trigger GRPO "
               "with the reward-adaptive insertion penalty.")


MODE_HELP = {
    "sft": "weaver SFT on chat examples or conversations (one row per line of --data)",
    "weaver-grpo": "weaver GRPO with engine rollouts on eval-style records with an answer",
    "trigger-grpo": "trigger GRPO with engine rollouts and the reward-adaptive insertion penalty",
}
# what --format names `safetensors` is the export layout in train.common.save_checkpoint
_SAVE_FORMATS = {"reference": "reference", "safetensors": "export", "both": "both"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One subparser per mode, so each --help shows only the flags that mode reads."""
    if not p.description:
        p.description = DESCRIPTION
    modes = p.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + "}")
    for mode in MODES:
        sp = modes.add_parser(mode, help=MODE_HELP[mode], description=MODE_HELP[mode],
                              formatter_class=p.formatter_class)
        _add_common_arguments(sp, mode)
        if mode == "sft":
            _add_sft_arguments(sp)
        else:
            _add_grpo_arguments(sp, mode)
        _add_output_arguments(sp)


def _add_common_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    from memgen.checkpoint_options import add_deprecated_alias, add_fresh_checkpoint_arguments

    data_help = ("JSONL: chat examples with an assistant turn (several assistant turns train as a conversation), "
                 "AgentBank rows, or eval records with messages/prompt/question and an answer (see "
                 "--answer-template)" if mode == "sft" else
                 "JSONL: eval records with messages/prompt and answer/aliases/tests to reward")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--output-dir", required=True, help="where checkpoints and logs go; pass it to --memgen later")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="reasoner HF directory or .gguf (default: packaged SmolLM2-135M)")
    g.add_argument("--memgen", default=None, help="MemGen checkpoint to start from (default: a fresh one)")
    g.add_argument("--weaver-model", default=None, help="weaver base directory (default: recorded, else --model)")
    g.add_argument("--trigger-model", default=None, help="trigger base directory (default: recorded, else --model)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="training and rollout dtype (no bf16 yet: it would also cast the trained weights)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")

    g = p.add_argument_group("MemGen settings", "a fresh checkpoint's shape (without --memgen); --budget and the "
                             "trigger flags also override a loaded checkpoint's, and default to its values")
    if mode == "trigger-grpo":   # the trigger is what this mode trains: always active
        add_fresh_checkpoint_arguments(g, trigger_default=False, defer_defaults=True)
        for action in g._group_actions:
            if action.dest == "trigger_active":
                action.help = argparse.SUPPRESS
    else:
        add_fresh_checkpoint_arguments(g, trigger_default=False, defer_defaults=True,
                                       trigger_why="a fresh trigger is untrained; trigger-grpo trains it")
    add_deprecated_alias(g, "--max-inference-aug", "--budget", "budget", type=int)

    g = p.add_argument_group("optimisation (defaults: the reference YAMLs)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--epochs", type=int, default=None,
                   help="passes over --data (default: 2 for sft, 1 for grpo)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: "
                   "all epochs)")
    g.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "linear", "constant"],
                   help="learning-rate schedule after the warm-up")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--seed", type=int, default=42, help="seed of the data order, dropout and rollouts")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    g.add_argument("--reference-compat", action="store_true",
                   help="reproduce the reference trainers' losses exactly: sft sums the gradients of the "
                        "--grad-accum batches, weaver-grpo trains on the EOS copies after each rollout's first "
                        "EOS, trigger-grpo ignores --trigger-temperature in its log-probs and has no insertion "
                        "penalty, the first warm-up step's lr is 0 (docs/training.md lists each departure and "
                        "its effect)")
    g.add_argument("--forward", default=None, choices=["fast", "step"],
                   help="fast (the default, but with --reference-compat): a batch's or GRPO group's forwards in "
                        "one pass, each weaver prefix computed once, the same loss and gradients; step: the "
                        "step-by-step forward, one row at a time (the oracle, the reference's order of operations)")


def _add_sft_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sft")
    g.add_argument("--batch-size", type=int, default=4, help="rows per token-mean loss")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--max-length", type=int, default=1024, help="truncate examples to this many tokens")
    g.add_argument("--max-prompt-aug", type=int, default=None,
                   help="conversations: assistant turns trained per row, a random subset when a row has more "
                        "(the reference's max_prompt_aug_num; its TriviaQA scripts use 8; default: the "
                        "checkpoint's, 1 when fresh)")
    g.add_argument("--answer-template", default=ANSWER_TEMPLATE,
                   help="the assistant turn of a record that has an answer but no assistant text; {answer} is "
                        "replaced by the answer (default: %(default)r, what `memgen eval`'s boxed scorer reads)")


def _add_grpo_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    g = p.add_argument_group("grpo")
    g.add_argument("--num-generations", type=int, default=8, help="samples per prompt (the group)")
    g.add_argument("--prompts-per-step", type=int, default=1, help="groups per optimizer step")
    g.add_argument("--max-completion-length", type=int, default=512, help="tokens per rollout at most")
    g.add_argument("--temperature", type=float, default=1.0, help="reasoner sampling temperature")
    g.add_argument("--trigger-temperature", type=float, default=1.0, help="trigger sampling temperature")
    g.add_argument("--loss-type", default="bnpo", choices=["grpo", "bnpo", "dr_grpo"],
                   help="how token losses are normalised (TRL's names)")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range (low, and high unless --epsilon-high)")
    g.add_argument("--epsilon-high", type=float, default=None, help="upper clip range (default: --epsilon)")
    g.add_argument("--num-iterations", type=int, default=1, help="optimisation passes per rollout batch")
    g.add_argument("--task", default=None, choices=["boxed", "exact", "alias", "code"],
                   help="reward scorer (default: each record's task, else inferred from its fields)")
    if mode == "trigger-grpo":
        g.add_argument("--penalty-lambda", type=float, default=0.1,
                       help="weight of the reward-adaptive insertion penalty (paper Eq. 8-9)")
        g.add_argument("--penalty-form", default="rate", choices=["rate", "per_decision"],
                       help="the penalty per insertion rate or per decision")
        g.add_argument("--no-penalty", action="store_true", help="no insertion penalty (as the reference code)")
    else:   # the penalty is the trigger's: the weaver's GRPO has none
        p.set_defaults(penalty_lambda=0.0, penalty_form="rate", no_penalty=True)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    from memgen.checkpoint_options import add_deprecated_alias

    g = p.add_argument_group("output")
    g.add_argument("--format", default="both", choices=list(_SAVE_FORMATS),
                   help="checkpoint files to write: reference (the reference's save_pretrained layout), "
                        "safetensors (this project's export), or both")
    add_deprecated_alias(g, "--save-format", "--format", "format", choices=list(_SAVE_FORMATS),
                         type=lambda v: "safetensors" if v == "export" else v)
    g.add_argument("--save-every", type=int, default=None, help="also save every N optimizer steps (default: "
                   "only at the end)")
    g.add_argument("--quiet", action="store_true", help="no progress bar on stderr (train_log.jsonl still gets "
                   "every step)")


def _load_model(args):
    import torch

    from memgen.checkpoint import MemGenSettings, load_checkpoint, random_checkpoint
    from memgen.hf import HFMemGenModel
    from memgen.models import load_hf_config
    from memgen.sources import resolve_model_dir

    reasoner = Path(resolve_model_dir(args.model))
    weaver = Path(resolve_model_dir(args.weaver_model)) if args.weaver_model else None
    trigger = Path(resolve_model_dir(args.trigger_model)) if args.trigger_model else None
    from memgen.checkpoint_options import fill_fresh_checkpoint_defaults

    given = fill_fresh_checkpoint_defaults(args, trigger_default=False)
    if args.mode == "trigger-grpo" and "--no-trigger-active" in given:
        raise ValueError("trigger-grpo trains the trigger: it is always active (drop --no-trigger-active)")
    if args.memgen:
        shape = [flag for flag in given if flag not in ("--budget", "--trigger-active", "--no-trigger-active")]
        if shape:
            raise ValueError(f"{', '.join(shape)} set a fresh checkpoint's shape; --memgen {args.memgen} keeps "
                             "its own (only --budget and the trigger flags override a loaded checkpoint)")
        ckpt = load_checkpoint(args.memgen)
    else:
        lora = {"r": args.lora_r, "lora_alpha": args.lora_alpha, "target_modules": list(args.lora_targets),
                "lora_dropout": args.lora_dropout, "bias": "none", "task_type": "CAUSAL_LM"}
        settings = MemGenSettings(prompt_latents_len=args.prompt_latents, inference_latents_len=args.inference_latents,
                                  max_inference_aug_num=args.budget, trigger_active=args.trigger_active,
                                  weaver_lora_config=dict(lora), trigger_lora_config=dict(lora))
        configs = [load_hf_config(d or reasoner) for d in (reasoner, weaver, trigger)]
        ckpt = random_checkpoint(settings, *configs, seed=args.init_seed, weaver_base=str(weaver or reasoner),
                                 trigger_base=str(trigger or reasoner))
    changes = {}
    if "--budget" in given:
        changes["max_inference_aug_num"] = args.budget
    if getattr(args, "max_prompt_aug", None) is not None:
        changes["max_prompt_aug_num"] = args.max_prompt_aug
    if args.mode == "trigger-grpo":
        changes["trigger_active"] = True
    elif {"--trigger-active", "--no-trigger-active"} & set(given):
        changes["trigger_active"] = args.trigger_active
    if changes:
        ckpt = dataclasses.replace(ckpt, settings=dataclasses.replace(ckpt.settings, **changes))
    dtype = getattr(torch, args.dtype)
    # memgen.hf gives each role its own base instance (PEFT wraps its base in place, as in the
    # reference), so the base is read three times (~0.3 s each for SmolLM2-135M): one line, not three bars
    print(f"memgen train: loading {reasoner.name} for the reasoner, weaver and trigger ...", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = HFMemGenModel.from_checkpoint(ckpt, reasoner, weaver, trigger, dtype=dtype, device=args.device)
    finally:
        hf_logging.enable_progress_bar()
    return model, reasoner, weaver, trigger


def _logger(args, out_dir: Path, save):
    """The per-step callback (progress.StepLogger: total steps, a bar with loss
    and ETA, train_log.jsonl) with --save-every checkpoints; (callback, closer)."""
    from .progress import StepLogger

    def periodic_save(record: dict) -> None:
        if args.save_every and record["step"] % args.save_every == 0:
            save(out_dir / f"step-{record['step']}")

    on_step = StepLogger(out_dir / "train_log.jsonl", quiet=args.quiet, on_record=periodic_save)
    return on_step, on_step


def run_train_from_args(args: argparse.Namespace) -> int:
    from .common import save_checkpoint

    if not Path(args.data).is_file():   # before the (slow) model load
        raise FileNotFoundError(2, "training data not found", str(args.data))
    examples = None
    if args.mode == "sft":   # a bad line fails here, before the model loads
        from .data import read_chat_jsonl

        examples = read_chat_jsonl(args.data, args.answer_template)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, reasoner, weaver, trigger = _load_model(args)

    def save(path):
        return save_checkpoint(model, path, _SAVE_FORMATS[args.format], reasoner_dir=reasoner)

    on_step, log = _logger(args, out_dir, save)
    try:
        if args.mode == "sft":
            history = _run_sft(args, model, examples, on_step)
        else:
            history = _run_grpo(args, model, reasoner, weaver, trigger, on_step)
    finally:
        log.close()
    written = save(out_dir)
    summary = {"mode": args.mode, "steps": len(history), "final": history[-1] if history else None,
               "checkpoints": [str(p) for p in written], "args": {k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (str, int, float, bool, type(None)))}}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"memgen train: {len(history)} steps; checkpoint in {', '.join(str(p) for p in written)} "
          f"(load it with --memgen {out_dir})", file=sys.stderr)
    return 0


def _run_sft(args, model, examples, on_step) -> list[dict]:
    from .conversation import supervised_runs
    from .data import encode_example
    from .sft import SFTConfig, num_sft_steps, train_sft, trainable_examples

    examples = [encode_example(model.tokenizer, e, args.max_length) for e in examples]
    config = SFTConfig(learning_rate=args.lr, epochs=args.epochs or 2, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, max_steps=args.max_steps,
                       seed=args.seed, reference_compat=getattr(args, "reference_compat", False),
                       forward=getattr(args, "forward", None))
    usable = trainable_examples(examples)
    turns = sum(len(supervised_runs(e.labels)) for e in usable)
    on_step.start(num_sft_steps(len(usable), config),
                  f"{len(usable)} examples, {turns} assistant turns, batch {config.batch_size} x {config.grad_accum}")
    return train_sft(model, examples, config, on_step=on_step)


def _run_grpo(args, model, reasoner, weaver, trigger, on_step) -> list[dict]:
    from memgen import LLM
    from memgen.eval.records import read_records

    from .grpo import GRPOConfig, GRPOTrainer

    records = []
    for rec in read_records(args.data, task=args.task, strict=True).records:
        if rec.task is None:
            raise ValueError(f"{args.data}:{rec.line_no}: no reference to reward (answer, aliases or tests)")
        records.append({**rec.data, "task": rec.task})
    config = GRPOConfig(role="weaver" if args.mode == "weaver-grpo" else "trigger",
                        num_generations=args.num_generations, prompts_per_step=args.prompts_per_step,
                        max_completion_length=args.max_completion_length, temperature=args.temperature,
                        trigger_temperature=args.trigger_temperature, learning_rate=args.lr,
                        epochs=args.epochs or 1, max_steps=args.max_steps, lr_scheduler=args.lr_scheduler,
                        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                        max_grad_norm=args.max_grad_norm, loss_type=args.loss_type, epsilon=args.epsilon,
                        epsilon_high=args.epsilon_high, num_iterations=args.num_iterations,
                        penalty_lambda=0.0 if args.no_penalty else args.penalty_lambda,
                        penalty_form=args.penalty_form, seed=args.seed,
                        reference_compat=getattr(args, "reference_compat", False),
                        forward=getattr(args, "forward", None))
    llm = LLM(model=str(reasoner), memgen=model.to_checkpoint(), weaver_model=weaver, trigger_model=trigger,
              dtype=args.dtype, device=args.device)
    trainer = GRPOTrainer(model, llm, records, config)
    on_step.start(trainer.num_steps, f"{len(records)} prompts x {config.num_generations} rollouts, "
                                     f"{config.prompts_per_step} prompt(s) per step")
    return trainer.train(on_step=on_step)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m memgen.train.cli`) until `memgen train` is wired."""
    parser = argparse.ArgumentParser(prog="memgen train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train_from_args(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"memgen train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

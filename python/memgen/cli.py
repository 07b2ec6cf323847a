"""The `memgen` command line: generate, chat, init, convert, bench, eval, train.

A thin layer over the Python API; every subcommand has `--help`. Errors the
user can fix (bad paths, bad values) print one line and exit 2, not a traceback.
Heavy modules (torch, transformers, the engine) are imported inside the
subcommand functions, so `--help` and `--version` answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from memgen.checkpoint_options import (
    FORMATS, add_deprecated_alias, add_format_argument, add_fresh_checkpoint_arguments,
)
from memgen.model_options import (
    HelpFormatter, add_engine_arguments, add_model_arguments, check_device, engine_option_kwargs, llm_kwargs,
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line error: a bad option value prints what is
    wrong and where the options are listed, not the whole usage (twenty lines for
    generate), like every other error the user can fix; exit status 2 as argparse."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_sampling_arguments(p: argparse.ArgumentParser, *, several: bool) -> None:
    """The sampling options; `several`: --n (completions per prompt), generate only."""
    g = p.add_argument_group("sampling (vLLM's meanings)")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: all)")
    g.add_argument("--sample-seed", type=int, default=None,
                   help="per-request sampling seed (default: derived from --seed and the request's position)")
    if several:
        g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable; not included in the output; default: none)")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS / stop before this many tokens")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (up to --max-tokens)")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="top-K log-probabilities per token, in --json output (default: none)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="0 = none")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="0 = none")


def _utf8(text: str, what: str) -> str:
    """`text` unchanged if it is valid UTF-8; else ValueError naming `what` and the
    first bad byte. Python decodes argv (and stdin in a C/POSIX locale) with
    surrogateescape, which keeps an undecodable byte as a lone surrogate that the
    tokenizer cannot take."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        offset = len(text[: e.start].encode("utf-8"))
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
    raise ValueError(f"{what} is not valid UTF-8 ({byte} at byte offset {offset}); pass UTF-8 text "
                     "(e.g. convert it with iconv -t UTF-8)")


def _read_stdin(what: str) -> str:
    """All of stdin as text, decoded as UTF-8 (ValueError at the first bad byte)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:   # a text stream (tests, embedding): its own decoding already ran
        return _utf8(sys.stdin.read(), what)
    data = buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}); "
                         "pass UTF-8 text (e.g. convert it with iconv -t UTF-8)") from None


def _check_text_options(args) -> None:
    """The texts every generating command takes besides its prompts."""
    for i, stop in enumerate(args.stop or (), start=1):
        _utf8(stop, f"--stop text {i}" if len(args.stop) > 1 else "the --stop text")


def _build_llm(args):
    from memgen import LLM

    return LLM(**llm_kwargs(args), seed=args.seed, **engine_option_kwargs(args))


def _sampling_params(args):
    from memgen import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sample_seed, n=getattr(args, "n", 1), stop=args.stop,
                          min_tokens=args.min_tokens, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty)


def _completion_json(c) -> dict:
    out = {"text": c.text, "token_ids": c.token_ids, "augmentation": c.augmentation,
           "finish_reason": c.finish_reason, "metrics": c.metrics}
    if c.logprobs is not None:
        out["logprobs"] = [{str(t): lp for t, lp in d.items()} for d in c.logprobs]
    return out


def _print_output(out, as_json: bool) -> None:
    completions = out.outputs or [out]
    if as_json:
        body = _completion_json(completions[0])
        if len(completions) > 1:
            body["outputs"] = [_completion_json(c) for c in completions]
        print(json.dumps(body))
        return
    for c in completions:
        print(c.text)
        m = c.metrics
        print(f"[{len(c.token_ids)} tokens, {m.get('num_insertions', 0)} insertions, "
              f"{m.get('total_s', 0.0):.2f} s, finish: {c.finish_reason}]", file=sys.stderr)


def cmd_generate(args) -> int:
    if not args.prompt and sys.stdin.isatty():
        print("memgen generate: no prompt given: pass one or more prompts as arguments, or pipe one on stdin "
              "(e.g. echo 'Hello' | memgen generate)", file=sys.stderr)
        return 2
    if args.prompt:
        prompts = [_utf8(p, f"prompt {i}" if len(args.prompt) > 1 else "the prompt")
                   for i, p in enumerate(args.prompt, start=1)]
    else:
        prompts = [_read_stdin("the prompt on stdin")]
    _check_text_options(args)
    llm = _build_llm(args)
    params = _sampling_params(args)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 1)
    else:
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for out in outs:
        _print_output(out, args.json)
    return 0


def _stream_reply(llm, messages, params) -> str:
    """Print the assistant's reply as it comes; return its text."""
    gen = llm.stream(messages=messages, sampling_params=params)
    while True:
        try:
            print(next(gen), end="", flush=True)
        except StopIteration as done:
            out = done.value
            break
    print()
    m = out.metrics
    print(f"[{len(out.token_ids)} tokens, {m.get('num_insertions', 0)} insertions, {m.get('total_s', 0.0):.2f} s, "
          f"finish: {out.finish_reason}]", file=sys.stderr)
    return out.text


def cmd_chat(args) -> int:
    if args.message is not None:
        _utf8(args.message, "the --message text")
    if args.system is not None:
        _utf8(args.system, "the --system prompt")
    _check_text_options(args)
    if not args.message and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")   # a bad byte in a typed line: say so, go on
    llm = _build_llm(args)
    params = _sampling_params(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.message:  # one turn, non-interactive
        messages = history + [{"role": "user", "content": args.message}]
        if args.json:
            _print_output(llm.chat(messages, params, use_tqdm=False)[0], True)
        else:
            _stream_reply(llm, messages, params)
        return 0
    print("memgen chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        try:
            _utf8(line, "that message")
        except ValueError as e:
            print(f"memgen chat: {e}; type it again", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": _stream_reply(llm, history, params)})
    return 0


def cmd_init(args) -> int:
    from memgen.checkpoint.init import InitOptions, init_checkpoint

    options = InitOptions(prompt_latents=args.prompt_latents, inference_latents=args.inference_latents,
                          budget=args.budget, trigger_active=args.trigger_active, lora_r=args.lora_r,
                          lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                          lora_dropout=args.lora_dropout, seed=args.init_seed)
    out, ckpt = init_checkpoint(args.output_dir, args.model, options, weaver_model=args.weaver_model,
                                trigger_model=args.trigger_model, layout=args.format, overwrite=args.overwrite)
    s = ckpt.settings
    print(f"wrote a fresh MemGen checkpoint ({args.format} layout) to {out}: K={s.prompt_latents_len} prompt / "
          f"{s.inference_latents_len} inference latents, budget {s.max_inference_aug_num}, trigger "
          f"{'active' if s.trigger_active else 'inactive'}, LoRA r={args.lora_r} alpha={args.lora_alpha:g} on "
          f"{','.join(args.lora_targets)}, init seed {args.init_seed}")
    bases = "".join(f" --{role}-model {m}" for role, m in (("weaver", args.weaver_model), ("trigger", args.trigger_model))
                    if m is not None and args.format == "reference")
    model = f" --model {args.model}" if args.model else ""
    print(f"try it:   memgen generate --chat{model} --memgen {out}{bases} \"What is 12 + 30?\"")
    print(f"train it: memgen train sft{model} --memgen {out}{bases} --data DATA.jsonl --output-dir OUT")
    return 0


def cmd_convert(args) -> int:
    import torch

    from memgen.checkpoint import cast_checkpoint, load_checkpoint, save_export, save_reference

    ckpt = load_checkpoint(args.src)
    if args.dtype is not None:
        ckpt = cast_checkpoint(ckpt, getattr(torch, args.dtype))
    if args.weaver_model:
        ckpt.weaver_base = args.weaver_model
    if args.trigger_model:
        ckpt.trigger_base = args.trigger_model
    out = save_reference(ckpt, args.dst) if args.format == "reference" else save_export(ckpt, args.dst)
    print(f"wrote {args.format} checkpoint to {out}")
    return 0


def _add_init_parser(sub) -> None:
    p = sub.add_parser("init", formatter_class=HelpFormatter,
                       help="write a fresh MemGen checkpoint on a base model",
                       description="Write a fresh MemGen checkpoint (weaver, trigger, projections, LoRAs) on a "
                                   "base model, initialised as the reference does: query latents N(0,1), LoRA B "
                                   "zero (the adapters start as no-ops), nn.Linear defaults elsewhere. "
                                   "Defaults are the reference YAMLs'.")
    p.add_argument("output_dir", help="directory to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--model", default=None,
                   help="reasoner: HF directory or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--weaver-model", default=None, help="weaver base model (default: --model)")
    p.add_argument("--trigger-model", default=None, help="trigger base model (default: --model)")
    g = p.add_argument_group("MemGen settings (the reference config's fields)")
    add_fresh_checkpoint_arguments(g, trigger_default=False,
                                   trigger_why="a fresh trigger is untrained, as in the reference YAMLs")
    add_deprecated_alias(g, "--trigger-inactive", "--no-trigger-active", "trigger_active", value=False)
    add_deprecated_alias(g, "--seed", "--init-seed", "init_seed", type=int)
    add_format_argument(p, default="reference")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    p.set_defaults(func=cmd_init)


def build_parser() -> argparse.ArgumentParser:
    from memgen import __version__

    parser = _Parser(prog="memgen", formatter_class=HelpFormatter,
                     description="Fast, exact inference for MemGen models.")
    parser.add_argument("--version", action="version", version=f"memgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", formatter_class=HelpFormatter, help="complete raw-text prompts")
    p.add_argument("prompt", nargs="*", help="prompts (default: read one from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per output")
    add_model_arguments(p)
    add_engine_arguments(p)
    _add_sampling_arguments(p, several=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", formatter_class=HelpFormatter,
                       help="chat with the model (interactive, or one --message)")
    p.add_argument("--message", default=None,
                   help="one user message, answered non-interactively (default: an interactive session)")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    p.add_argument("--json", action="store_true", help="print the reply as one JSON object (no streaming)")
    add_model_arguments(p)
    add_engine_arguments(p)
    _add_sampling_arguments(p, several=False)
    p.set_defaults(func=cmd_chat)

    _add_init_parser(sub)

    p = sub.add_parser("convert", formatter_class=HelpFormatter, help="convert a MemGen checkpoint between layouts")
    p.add_argument("src", help="checkpoint directory (reference layout or safetensors export)")
    p.add_argument("dst", help="output directory")
    add_format_argument(p, default="safetensors")
    add_deprecated_alias(p, "--to", "--format", "format", choices=FORMATS)
    p.add_argument("--weaver-model", default=None, metavar="DIR",
                   help="record this as the weaver's base model (default: keep the recorded one)")
    p.add_argument("--trigger-model", default=None, metavar="DIR",
                   help="record this as the trigger's base model (default: keep the recorded one)")
    add_deprecated_alias(p, "--weaver-base", "--weaver-model", "weaver_model")
    add_deprecated_alias(p, "--trigger-base", "--trigger-model", "trigger_model")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                   help="store every tensor in this dtype (default: as they are; float16 halves a float32 file)")
    p.set_defaults(func=cmd_convert)

    # subcommands whose options and runner live beside their code
    for name, help_text, module, add, run in (
        ("bench", "latency/throughput benchmarks, memory on vs off", "memgen.benchmark",
         "add_bench_arguments", "run_bench_from_args"),
        ("eval", "offline batch evaluation of a JSONL dataset", "memgen.eval.runner",
         "add_eval_arguments", "run_eval_from_args"),
        ("train", "train MemGen's weaver (SFT, GRPO) or trigger (GRPO) with engine rollouts", "memgen.train.cli",
         "add_train_arguments", "run_train_from_args"),
        ("serve", "OpenAI-compatible HTTP server (streaming, continuous batching)", "memgen.serve.command",
         "add_serve_arguments", "run_serve_from_args"),
    ):
        commands = importlib.import_module(module)
        p = sub.add_parser(name, formatter_class=HelpFormatter, help=help_text)
        getattr(commands, add)(p)
        p.set_defaults(func=getattr(commands, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)   # one line, before any model loads (every command with --device)
        return args.func(args)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        print(f"memgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `memgen` command line: generate, chat, convert, and its error handling."""
import json

import pytest
import torch

from memgen.checkpoint import load_checkpoint
from memgen.cli import main


def test_generate_json(qwen2_dir, capsys):
    assert main(["generate", "Hello world,", "--model", str(qwen2_dir), "--max-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 5 and out["augmentation"] == [-100] * 5
    assert out["finish_reason"] == "length"


def test_generate_memgen_reports_insertions(memgen_reasoner_dir, memgen_ckpt_dir, capsys):
    assert main(["generate", "Hello", "--chat", "--model", str(memgen_reasoner_dir), "--memgen",
                 str(memgen_ckpt_dir), "--max-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["augmentation"][0] == 1 and out["metrics"]["num_insertions"] >= 1


def test_chat_one_message(qwen2_dir, capsys):
    assert main(["chat", "--message", "Hi", "--model", str(qwen2_dir), "--max-tokens", "3"]) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_user_errors_exit_2_with_one_line(qwen2_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    assert main(["generate", "x", "--model", str(qwen2_dir), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_convert_both_directions(memgen_ckpt_dir, tmp_path, capsys):
    export = tmp_path / "export"
    back = tmp_path / "back"
    assert main(["convert", str(memgen_ckpt_dir), str(export), "--format", "safetensors",
                 "--weaver-model", "some/weaver"]) == 0
    assert (export / "memgen_config.json").is_file()
    ckpt = load_checkpoint(export)
    assert ckpt.weaver_base == "some/weaver"
    assert main(["convert", str(export), str(back), "--format", "reference"]) == 0
    original, restored = load_checkpoint(memgen_ckpt_dir), load_checkpoint(back)
    for name in ("weaver", "trigger_head", "reasoner_to_weaver", "weaver_to_reasoner"):
        a, b = getattr(original, name), getattr(restored, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for m, (a, b) in original.weaver_lora.layers.items():
        ra, rb = restored.weaver_lora.layers[m]
        assert torch.equal(a, ra) and torch.equal(b, rb)
    assert main(["convert", str(tmp_path / "none"), str(tmp_path / "x")]) == 2
    # --dtype: every tensor cast, values kept to the dtype's precision
    half = tmp_path / "half"
    assert main(["convert", str(memgen_ckpt_dir), str(half), "--dtype", "float16"]) == 0
    small = load_checkpoint(half)
    assert small.weaver["prompt_query_latents"].dtype == torch.float16
    assert all(a.dtype == b.dtype == torch.float16 for a, b in small.trigger_lora.layers.values())
    assert torch.allclose(small.weaver_to_reasoner["weight"].float(), original.weaver_to_reasoner["weight"].float(),
                          atol=1e-3)


def test_help_for_every_subcommand(capsys):
    for command in ("generate", "chat", "init", "convert", "bench", "eval", "train"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert "usage: memgen" in capsys.readouterr().out


def test_model_options_are_shared_and_map_to_llm_keywords():
    """generate, bench and eval take the same model options from one place."""
    import argparse

    from memgen.benchmark import add_bench_arguments
    from memgen.eval.runner import add_eval_arguments
    from memgen.model_options import add_model_arguments, llm_kwargs

    flags = ["--model", "m", "--dtype", "float32", "--attention-backend", "triton", "--enforce-eager"]
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    kwargs = llm_kwargs(p.parse_args(flags))
    assert kwargs == dict(model="m", memgen=None, weaver_model=None, trigger_model=None, dtype="float32",
                          device="auto", attention_backend="triton", enforce_eager=True)
    assert llm_kwargs(p.parse_args(["--reference-compat"]))["reference_compat"] is True
    for add, extra in ((add_bench_arguments, []), (add_eval_arguments, ["in.jsonl"])):
        q = argparse.ArgumentParser()
        add(q)
        args = q.parse_args(flags + extra)
        assert (args.attention_backend, args.enforce_eager, args.dtype) == ("triton", True, "float32")
    with pytest.raises(SystemExit):
        p.parse_args(["--attention-backend", "flash"])


def test_parser_and_help_do_not_import_torch():
    """--help and --version answer without loading torch or transformers (the
    subcommands import them when they run): seconds saved on every call."""
    import subprocess
    import sys

    code = ("import sys\nfrom memgen.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'memgen.llm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generate_takes_vllm_options(qwen2_dir, capsys):
    """Sampling and engine options reach the request and the engine."""
    assert main(["generate", "Hello world,", "--model", str(qwen2_dir), "--max-tokens", "6", "--json",
                 "--ignore-eos", "--logprobs", "2", "--n", "2", "--temperature", "1.0", "--sample-seed", "3",
                 "--max-model-len", "64", "--max-num-seqs", "4", "--frequency-penalty", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["outputs"]) == 2 and all(len(c["token_ids"]) == 6 for c in out["outputs"])
    assert len(out["logprobs"]) == 6 and all(len(d) >= 2 for d in out["logprobs"])


def test_generate_stop_string(qwen2_dir, capsys):
    assert main(["generate", "Hello world,", "--model", str(qwen2_dir), "--max-tokens", "12", "--json",
                 "--ignore-eos"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    stop = full[4:6]
    assert main(["generate", "Hello world,", "--model", str(qwen2_dir), "--max-tokens", "12", "--json",
                 "--ignore-eos", "--stop", stop]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["text"] == full[:full.find(stop)] and out["finish_reason"] == "stop"


def test_generate_without_a_prompt_says_so(qwen2_dir, capsys, monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    assert main(["generate", "--model", str(qwen2_dir)]) == 2
    err = capsys.readouterr().err
    assert "no prompt given" in err and "stdin" in err


def test_chat_streams_the_reply(qwen2_dir, capsys):
    """The streamed reply is the same text chat() gives."""
    from memgen import LLM, SamplingParams

    assert main(["chat", "--message", "Hi", "--model", str(qwen2_dir), "--max-tokens", "8", "--ignore-eos"]) == 0
    streamed = capsys.readouterr().out
    want = LLM(qwen2_dir).chat([{"role": "user", "content": "Hi"}],
                               SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert streamed == want.text + "\n"


def test_llm_stream_pieces_add_up(qwen2_dir):
    from memgen import LLM, SamplingParams

    llm = LLM(qwen2_dir, dtype="float64")
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    gen = llm.stream("Hello world,", params)
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            out = done.value
            break
    assert "".join(pieces) == out.text == llm.generate("Hello world,", params, use_tqdm=False)[0].text
    # closing the generator early takes the request out of the engine
    gen = llm.stream("Hello world,", SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    next(gen)
    gen.close()
    assert not llm.engine.has_unfinished()
    assert all(m.num_free_blocks == m.num_blocks for m in (p.block_manager for p in llm.engine.pools))
    with pytest.raises(ValueError, match="n=2"):
        next(llm.stream("Hi", SamplingParams(n=2)))


# every subcommand that builds an LLM, with the arguments it needs to get that far
_DEVICE_COMMANDS = [["generate", "Hi"], ["chat", "--message", "Hi"], ["eval", "in.jsonl"], ["serve"], ["bench"]]


@pytest.mark.parametrize("argv", _DEVICE_COMMANDS, ids=lambda a: a[0])
def test_unavailable_or_unknown_device_is_one_line_and_exit_2(argv, capsys, monkeypatch):
    """--device cuda without CUDA (and --device tpu) is one line on stderr and exit
    2, before any model loads, in every subcommand that takes --device."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"memgen {argv[0]}: error: --device cuda: CUDA is not available") and "--device cpu" in err
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--device", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"unknown device '{bad}'" in err and err.startswith(f"memgen {argv[0]}: error:")


def test_device_spelling_is_checked_without_torch():
    from memgen.model_options import check_device, parse_device

    assert parse_device("CUDA:1") == "cuda:1" and parse_device(" auto ") == "auto"
    check_device("cpu")
    check_device("auto")
    with pytest.raises(ValueError, match="unknown device"):
        check_device("gpu")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "Hi", "--attention-backend", "flash"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'flash'" in err and "memgen generate --help" in err


def _stdin(monkeypatch, data: bytes):
    import io

    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="strict")
    stream.isatty = lambda: False
    monkeypatch.setattr("sys.stdin", stream)


def test_invalid_utf8_prompt_is_one_line_naming_the_byte(capsys, monkeypatch):
    """Invalid UTF-8 in argv (decoded with surrogateescape) or on stdin: exit 2 and
    one line naming the text and the first bad byte, before any model loads."""
    bad = b"ab\xffc".decode("utf-8", "surrogateescape")
    cases = [(["generate", bad], "the prompt is not valid UTF-8 (byte 0xff at byte offset 2)"),
             (["generate", "fine", bad], "prompt 2 is not valid UTF-8 (byte 0xff at byte offset 2)"),
             (["generate", "fine", "--stop", bad], "the --stop text is not valid UTF-8"),
             (["chat", "--message", "caf" + b"\xe9".decode("utf-8", "surrogateescape")],
              "the --message text is not valid UTF-8 (byte 0xe9 at byte offset 3)"),
             (["chat", "--message", "Hi", "--system", bad], "the --system prompt is not valid UTF-8")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "TextInputSequence" not in err, err
    _stdin(monkeypatch, "é ".encode() + b"\xc3(")   # a truncated 2-byte sequence after 3 valid bytes
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert err == ("memgen generate: error: the prompt on stdin is not valid UTF-8 (byte 0xc3 at byte offset 3); "
                   "pass UTF-8 text (e.g. convert it with iconv -t UTF-8)\n")


def test_chat_session_skips_an_invalid_utf8_line(qwen2_dir, capsys, monkeypatch):
    _stdin(monkeypatch, b"\xff bad\nHi\n\n")
    assert main(["chat", "--model", str(qwen2_dir), "--max-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "that message is not valid UTF-8 (byte 0xff at byte offset 0)" in err and "type it again" in err
    assert err.count("2 tokens") == 1     # the good line was answered


def test_eval_without_a_valid_record_exits_2(qwen2_dir, tmp_path, capsys):
    """An empty input, a blank one, or one whose every line is invalid is an
    error (exit 2, one line), not a run that reports records: 0/0 and exits 0."""
    cases = {"empty.jsonl": ("", "holds no record: it is empty"),
             "blank.jsonl": ("\n  \n", "holds no record: it is empty"),
             "one_bad.jsonl": ('{"answer": 1}\n', "holds no valid record: its one line is invalid; the first: "),
             "bad.jsonl": ('not json\n{"prompt": ""}\n\n[1]\n', "holds no valid record: all 3 lines are invalid; "
                                                                "the first: ")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["eval", str(path), "-o", str(out), "--model", str(qwen2_dir), "--no-progress"]) == 2, name
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and message in captured.err, captured.err
        assert captured.err.startswith(f"memgen eval: error: {path} ") and "records:" not in captured.out
        assert not out.exists()    # stopped before the output was taken


def _parse(argv):
    from memgen.cli import build_parser

    return build_parser().parse_args(argv)


def test_one_flag_name_per_concept_old_names_are_hidden_deprecated_aliases(capsys):
    """The canonical names parse; each old name sets the same option, says once on
    stderr which name to use, and is not in --help."""
    from memgen.benchmark import check_args

    args = _parse(["init", "out"])
    assert (args.init_seed, args.trigger_active, args.format, args.budget) == (0, False, "reference", 5)
    assert (args.prompt_latents, args.inference_latents) == (8, 8)
    args = _parse(["init", "out", "--init-seed", "7", "--trigger-active", "--format", "safetensors"])
    assert (args.init_seed, args.trigger_active, args.format) == (7, True, "safetensors")
    assert _parse(["init", "out", "--trigger-active", "--no-trigger-active"]).trigger_active is False
    assert capsys.readouterr().err == ""
    bench = _parse(["bench"])
    check_args(bench)
    assert (bench.prompt_latents, bench.inference_latents, bench.budget, bench.trigger_active) == (8, 8, 5, True)
    bench = _parse(["bench", "--prompt-latents", "3", "--inference-latents", "2", "--no-trigger-active"])
    check_args(bench)
    assert (bench.prompt_latents, bench.inference_latents, bench.trigger_active) == (3, 2, False)
    convert = _parse(["convert", "a", "b"])
    assert (convert.format, convert.weaver_model, convert.trigger_model) == ("safetensors", None, None)
    assert capsys.readouterr().err == ""

    old = [  # argv, what it sets, the deprecation line
        (["init", "out", "--seed", "7"], {"init_seed": 7}, "memgen init: --seed is deprecated; use --init-seed"),
        (["init", "out", "--trigger-active", "--trigger-inactive"], {"trigger_active": False},
         "memgen init: --trigger-inactive is deprecated; use --no-trigger-active"),
        (["bench", "--latents", "3"], {"prompt_latents": 3, "inference_latents": 3},
         "memgen bench: --latents is deprecated; use --prompt-latents and --inference-latents"),
        (["bench", "--trigger-inactive"], {"trigger_active": False},
         "memgen bench: --trigger-inactive is deprecated; use --no-trigger-active"),
        (["convert", "a", "b", "--to", "reference"], {"format": "reference"},
         "memgen convert: --to is deprecated; use --format"),
        (["convert", "a", "b", "--weaver-base", "w"], {"weaver_model": "w"},
         "memgen convert: --weaver-base is deprecated; use --weaver-model"),
        (["convert", "a", "b", "--trigger-base", "t"], {"trigger_model": "t"},
         "memgen convert: --trigger-base is deprecated; use --trigger-model"),
    ]
    for argv, want, line in old:
        args = _parse(argv)
        assert {k: getattr(args, k) for k in want} == want, argv
        assert capsys.readouterr().err == line + "\n"
    with pytest.raises(SystemExit):
        _parse(["convert", "a", "b", "--to", "gguf"])
    capsys.readouterr()
    for command, names in (("init", ["--seed", "--trigger-inactive"]),
                           ("bench", ["--latents", "--trigger-inactive"]),
                           ("convert", ["--to", "--weaver-base", "--trigger-base"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert not [n for n in names if f"{n} " in out or f"{n}\n" in out or f"{n}," in out], (command, out)


def test_bench_random_init_uses_both_latent_counts(memgen_reasoner_dir, capsys):
    from memgen.benchmark import check_args
    from memgen.benchmark.build import memory_source

    args = _parse(["bench", "--prompt-latents", "3", "--inference-latents", "2", "--budget", "1",
                   "--no-trigger-active"])
    check_args(args)
    s = memory_source(args, memgen_reasoner_dir).checkpoint.settings
    assert (s.prompt_latents_len, s.inference_latents_len, s.max_inference_aug_num, s.trigger_active) == \
           (3, 2, 1, False)
    assert "K=3 prompt / 2 inference latents" in capsys.readouterr().out
    for argv in (["--memgen", "ckpt", "--no-trigger-active"], ["--memgen", "ckpt", "--latents", "4"]):
        args = _parse(["bench", *argv])
        with pytest.raises(ValueError, match="cannot be combined with --memgen"):
            check_args(args)


def _subparsers():
    import argparse

    from memgen.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_help_states_defaults_and_speaks_of_the_users_concepts(capsys):
    """Every option of every subcommand (train's: of each of its modes) has a
    help text, and each option that takes a value says its default: added by
    the formatter, or in words where a number would not say it (None, auto)."""
    import argparse
    import re

    subs = _subparsers()
    train_modes = next(a for a in subs["train"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in [*subs.items(), *((f"train {mode}", p) for mode, p in train_modes.items())]:
        formatter = sub.formatter_class(prog=sub.prog)
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert (action.help or "").strip(), (name, action.option_strings)
            if action.nargs != 0 and not action.required:   # a required flag has no default
                text = formatter._get_help_string(action) % {"default": action.default}
                assert "default" in text.lower(), (name, action.option_strings, text)
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        out = capsys.readouterr().out
        assert not re.search(r"\bissues?\b", out, re.IGNORECASE), (name, out)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert re.search(r"--max-tokens MAX_TOKENS\s+most tokens to generate \(default: 256\)", capsys.readouterr().out)


def test_chat_does_not_offer_generate_only_options(capsys):
    subs = _subparsers()
    assert "--n" in subs["generate"]._option_string_actions
    assert "--n" not in subs["chat"]._option_string_actions
    with pytest.raises(SystemExit) as e:
        main(["chat", "--message", "Hi", "--n", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("memgen chat: error:") and "--n" in err

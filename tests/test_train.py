"""memgen.train: data masking, one SFT step, GRPO steps with engine rollouts,
the reward-adaptive penalty, advantages and the loss on hand-computed cases,
engine == memgen.hf after the weight push (float64), checkpoints and the CLI."""
import argparse
import copy
import json
import math

import pytest
import torch

import memgen_fixtures
from memgen import LLM, SamplingParams
from memgen.hf import MEMGEN_CHAT_TEMPLATE, HFMemGenModel
from memgen.train import (ChatExample, GRPOConfig, GRPOTrainer, SFTConfig, encode_example, group_advantages,
                          grpo_loss, insertion_rates, mask_assistant_header, parse_chat_example, save_checkpoint,
                          train_sft, trainable_parameters, trigger_logprobs, trigger_penalty)
from memgen.train.cli import add_train_arguments, run_train_from_args

COMPLETION = "We add, then check. Answer 42."
RECORDS = [{"id": i, "messages": [{"role": "user", "content": p}], "answer": "42", "task": "boxed"}
           for i, p in enumerate(memgen_fixtures.PROMPTS)]
MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MEMGEN_CHAT_TEMPLATE
    return tok


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _length_reward(rollout, record):
    """Varies within a group (sampled lengths differ), so advantages are non-zero."""
    return len(rollout.completion_ids) / MAX_TOKENS


# ---------------------------------------------------------------- data
def test_mask_assistant_header_hand_case():
    ids = [5, 1, 7, 8, 9, 1, 7, 8, 4]
    labels = [-100, -100, 7, 8, 9, 1, 7, 8, 4]
    assert mask_assistant_header(ids, labels, [1, 7, 8]) == [-100, -100, -100, -100, 9, -100, -100, -100, 4]


def test_encode_example_masks_prompt_and_assistant_header(chat_tokenizer):
    tok = chat_tokenizer
    ex = parse_chat_example({"messages": [{"role": "user", "content": "Hi."},
                                          {"role": "assistant", "content": COMPLETION}]})
    enc = encode_example(tok, ex)
    first = next(i for i, t in enumerate(enc.labels) if t != -100)
    # everything before the assistant's content is masked, the header included
    assert tok.decode(enc.input_ids[:first]) == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    # supervision: the content, <|im_end|> and the trailing newline, contiguous
    assert all(t != -100 for t in enc.labels[first:])
    assert enc.labels[first:] == enc.input_ids[first:]
    assert tok.decode(enc.input_ids[first:]) == COMPLETION + "<|im_end|>\n"
    # the prompt/completion form gives the same encoding; truncation keeps the prefix
    same = parse_chat_example({"prompt": "Hi.", "completion": COMPLETION})
    assert encode_example(tok, same).input_ids == enc.input_ids
    assert encode_example(tok, ex, max_length=first + 2).labels == enc.labels[:first + 2]


def test_eval_records_become_sft_examples():
    """The shipped eval format (bench/data/arith50.jsonl): the prompt, then the
    answer in the template as the assistant turn."""
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    ex = parse_chat_example({"id": "a", "messages": user, "answer": "5", "task": "boxed"})
    assert ex.prompt == user and ex.completion == "The answer is \\boxed{5}." and ex.id == "a"
    assert parse_chat_example({"question": "What is 2 + 3?", "answer": 5}).prompt == user
    assert parse_chat_example({"prompt": "What is 2 + 3?", "answer": 5}, answer_template="{answer}").completion == "5"
    # an assistant turn given in the record wins over the answer
    given = parse_chat_example({"messages": user + [{"role": "assistant", "content": "Five."}], "answer": "5"})
    assert given.completion == "Five." and given.prompt == user
    with pytest.raises(ValueError, match="must be a string or a number"):
        parse_chat_example({"messages": user, "answer": ["5"]})
    with pytest.raises(ValueError, match="must contain"):
        parse_chat_example({"messages": user, "answer": "5"}, answer_template="no slot")


def test_shipped_arith_data_parses():
    from pathlib import Path

    from memgen.train import read_chat_jsonl

    path = Path(__file__).resolve().parents[1] / "bench" / "data" / "arith50.jsonl"
    examples = read_chat_jsonl(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(examples) == len(records) == 50
    assert examples[0].completion == f"The answer is \\boxed{{{records[0]['answer']}}}."
    assert examples[0].prompt == records[0]["messages"]


def test_lr_never_zero_on_a_step_and_matches_transformers_after_warmup():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from memgen.train.common import lr_factor, make_scheduler

    for kind in ("cosine", "linear", "constant"):
        for steps in range(1, 25):
            for ratio in (0.0, 0.1, 0.5, 0.9):
                warmup = math.ceil(ratio * steps)
                factors = [lr_factor(kind, i, steps, warmup) for i in range(steps)]
                assert all(0 < f <= 1 for f in factors), (kind, steps, ratio, factors)
                assert factors[:warmup] == sorted(factors[:warmup])
    # after warm-up the curves are transformers' own
    for make, kind in ((get_cosine_schedule_with_warmup, "cosine"), (get_linear_schedule_with_warmup, "linear")):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = make(opt, 2, 10)
        want = [hf.lr_lambdas[0](i) for i in range(10)]
        assert want[0] == 0.0            # transformers' first warm-up step: the bug this avoids
        assert [lr_factor(kind, i, 10, 2) for i in range(2, 10)] == pytest.approx(want[2:])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert make_scheduler(opt, "cosine", 1, 0.1).get_last_lr() == [0.5]
    with pytest.raises(ValueError, match="lr scheduler"):
        make_scheduler(opt, "step", 1, 0.1)


CONVERSATION = [{"role": "system", "content": "Search, then answer."},
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "<think> I should look. </think>\n<search> Hamlet author </search>"},
                {"role": "user", "content": "<observation> Hamlet is a play by Shakespeare. </observation>"},
                {"role": "assistant", "content": "<think> Found it. </think>\n<answer> Shakespeare </answer>"}]


def test_conversations_learn_every_assistant_turn(chat_tokenizer):
    """The messages form of a conversation supervises each assistant block
    (content, <|im_end|>, newline), never its header, the system or user
    turns; the prompt/completion form learns the completion only."""
    tok = chat_tokenizer
    ex = parse_chat_example({"messages": CONVERSATION})
    assert ex.all_assistant_turns and ex.num_assistant_turns == 2
    enc = encode_example(tok, ex)
    assert enc.input_ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False),
                                add_special_tokens=False)["input_ids"]
    from memgen.train.conversation import supervised_runs

    runs = supervised_runs(enc.labels)
    assert [tok.decode(enc.input_ids[s:e]) for s, e in runs] == [m["content"] + "<|im_end|>\n"
                                                                 for m in CONVERSATION if m["role"] == "assistant"]
    assert all(enc.labels[s:e] == enc.input_ids[s:e] for s, e in runs)
    assert sum(e - s for s, e in runs) == sum(t != -100 for t in enc.labels)
    # the same conversation given as prompt + completion learns the completion only
    pc = parse_chat_example({"prompt": CONVERSATION[:-1], "completion": CONVERSATION[-1]["content"]})
    assert not pc.all_assistant_turns
    pc_enc = encode_example(tok, pc)
    assert pc_enc.input_ids == enc.input_ids and supervised_runs(pc_enc.labels) == runs[-1:]
    with pytest.raises(ValueError, match="assistant"):
        parse_chat_example({"messages": [{"role": "user", "content": "a"}]})


def test_agentbank_rows_become_the_reference_layout():
    from memgen.train.agentbank import SEARCH_SYSTEM_PROMPT

    row = {"conversations": [
        {"from": "human", "value": "Who wrote Hamlet?"},
        {"from": "gpt", "value": "Thought: I should look.\nAction: search[Hamlet author]"},
        {"from": "human", "value": "Observation: Hamlet is a play by Shakespeare.\nmore"},
        {"from": "gpt", "value": "Thought: Found it.\nFinal Answer: Shakespeare"}]}
    ex = parse_chat_example(row)
    assert ex.messages == [{"role": "system", "content": SEARCH_SYSTEM_PROMPT}] + CONVERSATION[1:]
    assert SEARCH_SYSTEM_PROMPT.startswith("Answer the given question. You must conduct reasoning inside <think>")
    assert SEARCH_SYSTEM_PROMPT.endswith("For example, <answer> Beijing </answer>.")
    with pytest.raises(ValueError, match="human"):
        parse_chat_example({"conversations": [{"from": "bot", "value": "x"}]})


# ------------------------------------------------------- hand-computed maths
def test_group_advantages_hand_case():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)     # unbiased std of (1, 0, 0, 1) is sqrt(1/3)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0], dtype=torch.float64))


def test_trigger_penalty_hand_case():
    augs = [[1, 0, -100, 1, 0],      # 2 of 4 decisions -> rate 0.5
            [1, 1, 1, 1],            # 1.0
            [1, 0, 0, 0],            # 0.25
            [0, -100, 0]]            # 0.0
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert insertion_rates(augs).tolist() == [0.5, 1.0, 0.25, 0.0]
    # high-reward rollouts: 0 and 2 -> p_bar = (0.5 + 0.25) / 2 = 0.375
    penalty, p_bar = trigger_penalty(rewards, augs, 4, lam=0.1)
    assert p_bar == 0.375
    assert torch.allclose(penalty, torch.tensor([0.0125, 0.0625, 0.0, 0.0], dtype=torch.float64))
    # the per-decision form: lam * insertions * (1 - p_bar)
    penalty, _ = trigger_penalty(rewards, augs, 4, lam=0.1, form="per_decision")
    assert torch.allclose(penalty, torch.tensor([0.125, 0.25, 0.0625, 0.0], dtype=torch.float64))
    # nothing rewarded: no reference rate, no penalty
    penalty, p_bar = trigger_penalty(torch.zeros(4), augs, 4, lam=0.1)
    assert p_bar is None and penalty.tolist() == [0.0] * 4
    # two groups: group 2's rewards (0.5, 0.2) -> mean 0.35, only the 0.5 rollout is high-reward
    penalty, p_bar = trigger_penalty(torch.tensor([1.0, 0.0, 0.5, 0.2]), augs, 2, lam=1.0)
    assert p_bar == pytest.approx(0.75 / 2)
    assert torch.allclose(penalty, torch.tensor([0.125, 0.625, 0.0, 0.0], dtype=torch.float64))


def test_grpo_loss_hand_case():
    lp = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    adv = torch.tensor([1.0, -2.0])
    # ratio 1 everywhere: per-position loss -A
    assert float(grpo_loss(lp, lp, adv, "bnpo")) == pytest.approx((-1 * 2 + 2 * 1) / 3)
    assert float(grpo_loss(lp, lp, adv, "grpo")) == pytest.approx((-1 + 2) / 2)
    assert float(grpo_loss(lp, lp, adv, "dr_grpo", max_completion_length=4)) == pytest.approx(0.0)
    # clipping: ratio 2 with A = 1 is clipped at 1.2; ratio 0.5 with A = 1 is not (min picks 0.5);
    # ratio 2 with A = -1 keeps the unclipped -2
    old = [torch.log(torch.tensor([0.5, 2.0]))]
    new = [torch.zeros(2)]
    assert float(grpo_loss(new, old, torch.tensor([1.0]), "bnpo")) == pytest.approx((-1.2 - 0.5) / 2)
    assert float(grpo_loss([torch.log(torch.tensor([2.0]))], [torch.zeros(1)], torch.tensor([1.0]), "bnpo")) \
        == pytest.approx(-1.2)
    assert float(grpo_loss([torch.log(torch.tensor([2.0]))], [torch.zeros(1)], torch.tensor([-1.0]), "bnpo")) \
        == pytest.approx(2.0)


# --------------------------------------------------------------- SFT
def test_sft_step_changes_exactly_the_trainable_parameters(chat_tokenizer, memgen_ckpt_dir, memgen_reasoner_dir):
    model = HFMemGenModel.from_checkpoint(memgen_ckpt_dir, memgen_reasoner_dir)
    example = encode_example(model.tokenizer, ChatExample([{"role": "user", "content": "Hi."}], COMPLETION))
    out = model.sft_forward(torch.tensor(example.input_ids), torch.tensor(example.labels))
    assert out.inference_points, "the example must insert inference latents too"
    before = _snapshot(model)
    history = train_sft(model, [example], SFTConfig(learning_rate=1e-3, batch_size=1, max_steps=1,
                                                     warmup_ratio=0.0))
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    trainable = set(trainable_parameters(model, "weaver"))
    assert any(".lora_A." in n for n in trainable) and "weaver_to_reasoner.weight" in trainable
    assert "prompt_latent_ln.bias" in trainable and "inference_latent_scale" in trainable
    assert _changed(before, model) == trainable
    assert not model.training


# ------------------------------------------------ GRPO + sync + checkpoints
def _greedy_pair(model, llm, tokenizer):
    """(engine rows, oracle rows): (tokens, augmentation) per prompt up to the first EOS."""
    ids, mask = memgen_fixtures.encode_prompts(tokenizer)
    oracle = memgen_fixtures.oracle_rows(model, ids, mask, MAX_TOKENS, tokenizer.eos_token_id)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    engine = [(o.token_ids, o.augmentation) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return engine, oracle


@pytest.mark.parametrize("role", ["weaver", "trigger"])
def test_grpo_step_with_engine_rollouts_then_sync(role, tmp_path, tokenizer, memgen_active_ckpt_dir,
                                                  memgen_reasoner_dir):
    """A GRPO step rolls out with the engine, trains exactly the role's
    parameters, pushes them, and the engine's greedy output then equals
    memgen.hf's with the trained weights (float64); the saved checkpoints
    load into a fresh engine with the same output."""
    model = HFMemGenModel.from_checkpoint(memgen_active_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64)
    llm = LLM(model=memgen_reasoner_dir, memgen=model.to_checkpoint(), dtype="float64")
    config = GRPOConfig(role=role, num_generations=4, prompts_per_step=2, max_completion_length=MAX_TOKENS,
                        learning_rate=0.05, warmup_ratio=0.0, max_steps=1, lr_scheduler="constant")
    trainer = GRPOTrainer(model, llm, RECORDS[:2], config, reward_fn=_length_reward)
    version = llm.memgen_version
    before = _snapshot(model)
    rollouts = trainer.rollouts(RECORDS[:2])
    assert len(rollouts) == 8 and [r.group for r in rollouts] == [0] * 4 + [1] * 4
    assert all(len(r.augmentation) == len(r.completion_ids) for r in rollouts)
    if role == "trigger":   # trigger decisions are sampled: some insert, some skip
        decisions = [d for r in rollouts for d in r.augmentation if d != -100]
        assert 0 in decisions and 1 in decisions
        # one forward over prompt + completion gives the decisions' log-probs exactly
        r = next(r for r in rollouts if r.num_decisions > 1)
        got = trigger_logprobs(model, r.prompt_ids, r.completion_ids, r.augmentation)
        want = []
        for j, d in enumerate(r.augmentation):
            if d != -100:
                logits = model.trigger_logits(torch.tensor([r.prompt_ids + r.completion_ids[:j]]))
                want.append(torch.log_softmax(logits[0], -1)[d])
        assert got.dtype == torch.float64 and torch.allclose(got, torch.stack(want), rtol=0, atol=1e-12)

    history = trainer.train()
    assert len(history) == 1 and history[0]["num_trained_rows"] > 0
    assert history[0]["num_rollouts"] == 8
    assert llm.memgen_version == version + 1
    assert _changed(before, model) == set(trainable_parameters(model, role))
    if role == "trigger":
        assert history[0]["penalty_mean"] >= 0.0

    engine, oracle = _greedy_pair(model, llm, tokenizer)
    assert engine == oracle
    # saved checkpoints (both layouts) load into a fresh engine and give the same output
    written = save_checkpoint(model, tmp_path / "ckpt", "both")
    assert [p.name for p in written] == ["reference", "export"]
    assert (written[0] / "weaver" / "weaver" / "adapter_model.safetensors").is_file()
    assert (written[1] / "memgen.safetensors").is_file()
    for path in written:
        fresh = LLM(model=memgen_reasoner_dir, memgen=path, dtype="float64")
        assert _greedy_pair(model, fresh, tokenizer)[0] == engine


def test_sft_then_sync_engine_equals_hf(tokenizer, memgen_ckpt_dir, memgen_reasoner_dir):
    """SFT on memgen.hf, push, and the engine's greedy output equals memgen.hf's (float64)."""
    model = HFMemGenModel.from_checkpoint(memgen_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64)
    llm = LLM(model=memgen_reasoner_dir, memgen=model.to_checkpoint(), dtype="float64")
    old, _ = _greedy_pair(model, llm, tokenizer)
    examples = [encode_example(model.tokenizer, ChatExample([{"role": "user", "content": p}], COMPLETION))
                for p in memgen_fixtures.PROMPTS]
    train_sft(model, examples, SFTConfig(learning_rate=0.05, batch_size=3, max_steps=2, warmup_ratio=0.0),
              on_step=lambda _: llm.update_memgen_weights(model.to_checkpoint()))
    engine, oracle = _greedy_pair(model, llm, tokenizer)
    assert engine == oracle
    assert engine != old, "the step must change the greedy output for the comparison to mean something"


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("steps", [1, 2])
def test_cli_short_sft_run_on_shipped_data_changes_the_weights(steps, tmp_path, memgen_ckpt_dir,
                                                               memgen_reasoner_dir):
    """`--max-steps 1|2` with the default warm-up and learning rate trains
    (the first warm-up step's lr is not 0), on bench/data/arith50.jsonl as shipped."""
    from pathlib import Path

    from memgen.checkpoint import load_checkpoint

    data = Path(__file__).resolve().parents[1] / "bench" / "data" / "arith50.jsonl"
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    out = tmp_path / "sft"
    args = parser.parse_args(["sft", "--data", str(data), "--output-dir", str(out), "--model",
                              str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir), "--max-steps", str(steps),
                              "--batch-size", "1", "--format", "safetensors", "--quiet"])
    assert run_train_from_args(args) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == steps and all(r["lr"] > 0 for r in log)
    before, after = load_checkpoint(memgen_ckpt_dir), load_checkpoint(out / "export")
    # the output folder itself loads (its export/ is found inside it)
    direct = load_checkpoint(out)
    assert torch.equal(direct.weaver["prompt_query_latents"], after.weaver["prompt_query_latents"])
    assert not torch.equal(before.weaver["prompt_query_latents"], after.weaver["prompt_query_latents"])
    assert not torch.equal(before.weaver_to_reasoner["weight"], after.weaver_to_reasoner["weight"])
    assert any(not torch.equal(b, after.weaver_lora.layers[m][1]) for m, (_, b) in before.weaver_lora.layers.items())
    # the trigger is not SFT's to train
    assert torch.equal(before.trigger_head["weight"], after.trigger_head["weight"])
    # bases that are the reasoner are not recorded: the export stays loadable on another machine
    assert after.weaver_base is None and after.trigger_base is None


def test_cli_sft_bad_data_fails_before_loading(tmp_path, capsys):
    """A bad line is reported with its line number, before any model is read
    (--model points nowhere: loading would fail differently)."""
    from memgen.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    rc = main(["train", "sft", "--data", str(data), "--output-dir", str(tmp_path / "o"),
               "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:1" in err and "answer" in err and "no-model" not in err


def test_cli_sft_and_trigger_grpo(tmp_path, memgen_ckpt_dir, memgen_reasoner_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                       {"role": "assistant", "content": COMPLETION}]})
                              for p in memgen_fixtures.PROMPTS))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["sft", "--data", str(data), "--output-dir", str(tmp_path / "sft"),
                              "--model", str(memgen_reasoner_dir), "--memgen", str(memgen_ckpt_dir),
                              "--max-steps", "1", "--batch-size", "2", "--quiet"])
    assert run_train_from_args(args) == 0
    out = tmp_path / "sft"
    assert (out / "reference" / "projs.bin").is_file() and (out / "export" / "memgen_config.json").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1

    grpo_data = tmp_path / "grpo.jsonl"
    grpo_data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    args = parser.parse_args(["trigger-grpo", "--data", str(grpo_data), "--output-dir", str(tmp_path / "grpo"),
                              "--model", str(memgen_reasoner_dir), "--memgen", str(out),
                              "--max-steps", "1", "--num-generations", "2", "--max-completion-length", "8",
                              "--format", "safetensors", "--quiet"])
    assert run_train_from_args(args) == 0
    summary = json.loads((tmp_path / "grpo" / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["final"]["num_rollouts"] == 2
    assert summary["checkpoints"] == [str(tmp_path / "grpo" / "export")]


def test_cli_conversational_sft_reference_compat_shows_steps_and_loads_from_its_folder(
        tmp_path, capsys, memgen_ckpt_dir, memgen_reasoner_dir):
    """Multi-turn rows (the reference's TriviaQA layout, raw AgentBank rows
    too) train with --reference-compat and --max-prompt-aug; the run prints
    its total optimizer steps and a progress bar; the output folder loads
    with --memgen directly (reference layout only here)."""
    from memgen.checkpoint import load_checkpoint
    from memgen.cli import main

    data = tmp_path / "conv.jsonl"
    raw = {"conversations": [{"from": "human", "value": "Who wrote Hamlet?"},
                             {"from": "gpt", "value": "Thought: I should look.\nAction: search[Hamlet author]"},
                             {"from": "human", "value": "Observation: Hamlet is a play by Shakespeare."},
                             {"from": "gpt", "value": "Thought: Found it.\nFinal Answer: Shakespeare"}]}
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(raw) + "\n")
    out = tmp_path / "conv"
    rc = main(["train", "sft", "--data", str(data), "--output-dir", str(out), "--model", str(memgen_reasoner_dir),
               "--memgen", str(memgen_ckpt_dir), "--epochs", "2", "--batch-size", "1", "--grad-accum", "2",
               "--max-prompt-aug", "1", "--reference-compat", "--format", "reference"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "memgen train: 2 optimizer steps (2 examples, 4 assistant turns, batch 1 x 2)" in err
    assert "2/2" in err and "loss=" in err          # the bar's last state
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["lr"] == 0.0                      # compat: transformers' warm-up starts at 0
    assert not (out / "export").exists()
    ckpt = load_checkpoint(out)
    assert ckpt.settings.max_prompt_aug_num == 1
    assert not torch.equal(ckpt.weaver["prompt_query_latents"],
                           load_checkpoint(memgen_ckpt_dir).weaver["prompt_query_latents"])
    # an unrelated empty folder is still refused with the usual message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="export/ or reference/"):
        load_checkpoint(tmp_path / "empty")


def test_train_flags_per_mode_canonical_names_and_aliases(capsys, tmp_path):
    """Each mode's --help offers only what it reads; the fresh-checkpoint flags are the
    names init and bench use; old names still parse, with one deprecation line; a
    fresh checkpoint's shape beside --memgen is refused before any load."""
    parser = argparse.ArgumentParser(prog="memgen train")
    add_train_arguments(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    sft, weaver, trigger = sub["sft"], sub["weaver-grpo"], sub["trigger-grpo"]
    for flag in ("--budget", "--trigger-active", "--prompt-latents", "--init-seed", "--format", "--reference-compat"):
        assert flag in sft._option_string_actions, flag
    assert "--num-generations" not in sft._option_string_actions and "--max-prompt-aug" in sft._option_string_actions
    assert "--num-generations" in weaver._option_string_actions and "--penalty-lambda" not in weaver._option_string_actions
    assert "--penalty-lambda" in trigger._option_string_actions and "--batch-size" not in trigger._option_string_actions

    base = ["--data", "d.jsonl", "--output-dir", "o"]
    args = parser.parse_args(["sft", *base, "--max-inference-aug", "3", "--save-format", "export"])
    err = capsys.readouterr().err
    assert (args.budget, args.format) == (3, "safetensors")
    assert "--max-inference-aug is deprecated; use --budget" in err and "--save-format is deprecated; use --format" in err
    args = parser.parse_args(["weaver-grpo", *base])
    assert (args.budget, args.trigger_active, args.format, args.penalty_lambda) == (None, None, "both", 0.0)

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}\n')
    for argv, message in ((["sft", "--memgen", "ckpt", "--lora-r", "4"], "--lora-r set a fresh checkpoint's shape"),
                          (["trigger-grpo", "--no-trigger-active"], "always active")):
        args = parser.parse_args([argv[0], "--data", str(data), "--output-dir", str(tmp_path / "o"), *argv[1:]])
        with pytest.raises(ValueError, match=message):
            run_train_from_args(args)

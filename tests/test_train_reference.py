"""memgen.train against the reference's training semantics, float64 on CPU.

Each test runs memgen.train's own step code (accumulate_step for SFT,
policy_rows + policy_loss_backward for GRPO) and an independent float64
computation of what the reference computes for the same batch
(tests/reference_training.py), and compares the loss and the gradient of
every trainable tensor to 1e-9 (relative to the tensor's largest entry):
  - reference_compat=True equals the reference: SFT with gradient
    accumulation (sum of micro-batch gradients), conversational SFT (random
    turn subset), weaver GRPO with the EOS copies, trigger GRPO without the
    trigger temperature;
  - the default equals its documented semantics: SFT token mean over the
    whole step, weaver GRPO cut at the first EOS, trigger log-probs at the
    sampling temperature.
The model is built from a float64 checkpoint whose values are not float32
numbers, so any float32 rounding on the way shows up far above 1e-9; a
finite-difference check ties the gradients to the loss itself.
"""
import dataclasses
import random

import pytest
import torch

import reference_training as ref
from memgen.checkpoint import cast_checkpoint, load_checkpoint
from memgen.hf import HFMemGenModel
from memgen.train import ChatExample, GRPOConfig, encode_example, encode_prompt, freeze_for, parse_chat_example
from memgen.train.grpo import policy_loss_backward, policy_rows
from memgen.train.rollout import Rollout
from memgen.train.sft import accumulate_step, plan_batch

TOL = 1e-9
USERS = ["What is 12 plus 30?", "Hello", "Solve the math problem, and put the answer in a box."]
ANSWERS = ["We add, then check. Answer 42.", "Hello world, a new line.\nMore text.",
           "We add the numbers. Finally, we write it down, 42."]


def float64_checkpoint(path, seed=0):
    """The checkpoint in float64, every value moved by ~1e-9 relative (no
    longer a float32 number)."""
    ckpt = cast_checkpoint(load_checkpoint(path), torch.float64)
    g = torch.Generator().manual_seed(seed)

    def nudge(t):
        return t * (1 + 1e-9 * torch.randn(t.shape, generator=g, dtype=torch.float64))

    def lora(l):
        return dataclasses.replace(l, layers={m: (nudge(a), nudge(b)) for m, (a, b) in l.layers.items()})

    return dataclasses.replace(
        ckpt, weaver={k: nudge(v) for k, v in ckpt.weaver.items()},
        reasoner_to_weaver={k: nudge(v) for k, v in ckpt.reasoner_to_weaver.items()},
        weaver_to_reasoner={k: nudge(v) for k, v in ckpt.weaver_to_reasoner.items()},
        trigger_head={k: nudge(v) for k, v in ckpt.trigger_head.items()},
        weaver_lora=lora(ckpt.weaver_lora), trigger_lora=lora(ckpt.trigger_lora))


@pytest.fixture(scope="module")
def model(memgen_ckpt_dir, memgen_reasoner_dir):
    return HFMemGenModel.from_checkpoint(float64_checkpoint(memgen_ckpt_dir), memgen_reasoner_dir,
                                         dtype=torch.float64)


@pytest.fixture(scope="module")
def active_model(memgen_active_ckpt_dir, memgen_reasoner_dir):
    return HFMemGenModel.from_checkpoint(float64_checkpoint(memgen_active_ckpt_dir), memgen_reasoner_dir,
                                         dtype=torch.float64)


def gradients(model, role, run):
    """(run()'s value, name -> gradient) with only `role`'s parameters trainable."""
    params = freeze_for(model, role)
    for p in params.values():
        p.grad = None
    value = float(run())
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    model.requires_grad_(False)
    return value, grads


def backward(loss):
    loss.backward()
    return loss


def assert_same(got, want, tol=TOL):
    (loss_got, grads_got), (loss_want, grads_want) = got, want
    assert abs(loss_got - loss_want) <= tol * abs(loss_want), (loss_got, loss_want)
    assert grads_got.keys() == grads_want.keys() and grads_want
    assert any(bool(g.abs().max() > 0) for g in grads_want.values())
    for name, g in grads_want.items():
        assert grads_got[name].dtype == torch.float64, name
        diff = float((grads_got[name] - g).abs().max())
        assert diff <= tol * max(float(g.abs().max()), 1e-300), (name, diff, float(g.abs().max()))


def max_rel_diff(a, b) -> tuple[float, float]:
    """(relative loss difference, largest relative gradient difference) of two results."""
    (la, ga), (lb, gb) = a, b
    return abs(la - lb) / abs(lb), max(float((ga[n] - gb[n]).abs().max() / gb[n].abs().max()) for n in gb
                                       if gb[n].abs().max() > 0)


def sft_rows(model, n=4):
    examples = [encode_example(model.tokenizer, ChatExample([{"role": "user", "content": USERS[i % 3]}],
                                                            ANSWERS[(i + i // 3) % 3]))
                for i in range(n)]
    return [(e.input_ids, e.labels) for e in examples], examples


# ---------------------------------------------------------------- float64
def test_every_parameter_and_the_loss_stay_float64(model):
    rows, examples = sft_rows(model, 1)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    batches = [plan_batch(model, examples, random.Random(0))]
    value, grads = gradients(model, "weaver", lambda: accumulate_step(model, batches)[0])
    assert all(g.dtype == torch.float64 for g in grads.values())
    # the loss equals the independent float64 computation to 1e-12
    with torch.no_grad():
        want = float(ref.forward_loss(model, *ref.collate_right(rows, model.tokenizer.pad_token_id)))
    assert abs(value - want) <= 1e-12 * want


def float64_rms_norm(self, hidden_states):
    """transformers' RMSNorm computed in its input's dtype (transformers' own
    casts to float32 and back, on the reference's side as on memgen's)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_gradient_matches_float64_finite_differences(model, monkeypatch):
    """The directional derivative of the SFT loss along a random unit
    direction of all trainable tensors, from a 4th-order central difference
    in float64, equals the gradient's projection to 1e-9. A float32 step
    anywhere in the loss would make the difference quotient noisy at about
    1e-8 / h. transformers' RMSNorm is such a step (it computes in float32
    whatever its input), so this test swaps in a float64 one: what is left
    float32 would be memgen's."""
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", float64_rms_norm)
    _, examples = sft_rows(model, 1)
    batches = [plan_batch(model, examples, random.Random(0))]
    _, grads = gradients(model, "weaver", lambda: accumulate_step(model, batches)[0])
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in grads}
    norm = sum(float((d * d).sum()) for d in direction.values()) ** 0.5
    direction = {n: d / norm for n, d in direction.items()}   # a unit step: h is the step's length
    analytic = sum(float((grads[n] * direction[n]).sum()) for n in grads)
    originals = {n: params[n].detach().clone() for n in grads}

    def loss_at(t):
        with torch.no_grad():
            for n in grads:
                params[n].copy_(originals[n] + t * direction[n])
            seg = batches[0][0]
            from memgen.train.sft import segment_loss_sum

            return float(segment_loss_sum(model, seg)) / seg.num_supervised

    h = 1e-3
    try:
        numeric = (loss_at(-2 * h) - 8 * loss_at(-h) + 8 * loss_at(h) - loss_at(2 * h)) / (12 * h)
    finally:
        with torch.no_grad():
            for n in grads:
                params[n].copy_(originals[n])
    assert abs(numeric - analytic) <= 1e-9 * abs(analytic), (numeric, analytic)


# ---------------------------------------------------------------- SFT
def test_sft_accumulation_reference_compat_is_the_trainer_step(model):
    """grad_accum 2 x batch 2: compat = the sum of the two micro-batch
    gradients (the reference's Trainer step); the default = one token mean
    over the step, i.e. the reference's forward on all four rows as one batch."""
    rows, examples = sft_rows(model, 4)
    micro = [rows[:2], rows[2:]]
    batches = [plan_batch(model, examples[:2], random.Random(0)), plan_batch(model, examples[2:], random.Random(0))]
    compat = gradients(model, "weaver", lambda: accumulate_step(model, batches, reference_compat=True)[0])
    trainer = gradients(model, "weaver", lambda: ref.sft_step_backward(model, micro))
    assert_same(compat, trainer)
    # the step-by-step forward: the reference's order of operations (the fast default sums the same
    # terms in another order, which transformers' float32 RMSNorm rounds at ~1e-8: test_train_fast)
    default = gradients(model, "weaver", lambda: accumulate_step(model, batches, forward="step")[0])
    one_batch = gradients(model, "weaver", lambda: ref.sft_step_backward(model, [rows]))
    assert_same(default, one_batch)
    # the compat step is about twice the default's (exactly twice at equal token counts)
    assert 1.5 < compat[0] / default[0] < 2.5


# ---------------------------------------------------- conversational SFT
CONVERSATIONS = [
    [{"role": "system", "content": "Search, then answer."},
     {"role": "user", "content": "What is 12 plus 30?"},
     {"role": "assistant", "content": "We add, then check."},
     {"role": "user", "content": "Hello world, this is a small test."},
     {"role": "assistant", "content": "A new line, and more text.\nThe answer is 42."},
     {"role": "user", "content": "Numbers 1 2 3."},
     {"role": "assistant", "content": "Finally, we write it down."}],
    [{"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hello world, a new line."},
     {"role": "user", "content": "The quick brown fox."},
     {"role": "assistant", "content": "We check the result. Answer: 42."}],
]


@pytest.mark.parametrize("max_turns", [2, 8])
def test_conversational_sft_matches_the_reference(model, max_turns):
    """Each chosen assistant turn is its own single-turn forward up to its end
    (earlier turns' latents unseen); with more turns than max_prompt_aug_num a
    subset is drawn by random.sample, the same draw as the reference's global
    `random` in the same state. Two conversations in one batch."""
    examples = [encode_example(model.tokenizer, parse_chat_example({"messages": c})) for c in CONVERSATIONS]
    rows = [(e.input_ids, e.labels) for e in examples]
    old = model.settings.max_prompt_aug_num
    model.settings.max_prompt_aug_num = max_turns
    try:
        batches = [plan_batch(model, examples, random.Random(7))]
        assert len(batches[0]) == (4 if max_turns == 2 else 5)
        ours = gradients(model, "weaver", lambda: accumulate_step(model, batches, reference_compat=True)[0])
        random.seed(7)
        theirs = gradients(model, "weaver", lambda: ref.sft_step_backward(model, [rows]))
    finally:
        model.settings.max_prompt_aug_num = old
    assert_same(ours, theirs)


# ---------------------------------------------------------------- GRPO
def _rollouts(model, eos_at_end=(True, True, False, True)):
    """Four rollouts of one prompt with different lengths; the one without an
    EOS is the longest (it ran to max_completion_length)."""
    tok = model.tokenizer
    prompt = encode_prompt(tok, {"messages": [{"role": "user", "content": USERS[0]}]})
    texts = ["We add, then check.", "Answer 42.", "We add the numbers, then we check the result. Finally,",
             "Hello world, a new line.\nMore"]
    out = []
    for text, eos in zip(texts, eos_at_end):
        ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
        aug = [1] + [(-100 if i % 3 else i % 2) for i in range(1, len(ids))]
        out.append(Rollout(group=0, prompt_ids=prompt, completion_ids=ids, augmentation=aug, text=text,
                           finish_reason="stop" if eos else "length"))
    width = max(len(r.completion_ids) for r in out)
    assert len(out[2].completion_ids) == width and len({len(r.completion_ids) for r in out}) == 4
    return out


ADVANTAGES = torch.tensor([0.9, -1.3, 0.4, -0.2], dtype=torch.float64)


@pytest.fixture
def pad_is_eos(model):
    """The tokenizer with pad = eos (SmolLM2's packaged tokenizer is so): the
    reference's `ids != pad` masks then hide every <|im_end|>, the prompt's too."""
    tok = model.tokenizer
    old = tok.pad_token
    tok.pad_token = tok.eos_token
    yield
    tok.pad_token = old


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo"])
def test_weaver_grpo_reference_compat_trains_the_eos_copies(model, loss_type):
    rollouts = _rollouts(model)
    prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
    header = model.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    results = {}
    for compat in (True, False):
        # forward="step": the reference's order of operations, also for the default (see the SFT test above)
        config = GRPOConfig(role="weaver", temperature=0.7, loss_type=loss_type, reference_compat=compat,
                            forward="step")
        rows = policy_rows(model, rollouts, config, header)
        results[compat] = gradients(model, "weaver", lambda: policy_loss_backward(model, rows, ADVANTAGES, config))
        want = gradients(model, "weaver", lambda: backward(ref.weaver_grpo_loss(
            model, prompts, completions, ADVANTAGES, temperature=0.7, loss_type=loss_type, eos_copies=compat)))
        assert_same(results[compat], want)
    compat_rows = policy_rows(model, rollouts, GRPOConfig(reference_compat=True), header)
    width = max(len(c) for c in completions)
    assert sum(r.num_valid for r in compat_rows) == 4 * width
    # the copies change the gradient (and, under bnpo, the loss: its denominator)
    assert max_rel_diff(results[True], results[False])[1] > 1e-3


def test_weaver_grpo_reference_compat_when_pad_is_eos(model, pad_is_eos):
    """pad == eos: the reference's rows attend to no <|im_end|> (prompt
    included) and train neither the EOS nor its copies; compat does the same."""
    rollouts = _rollouts(model)
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id
    prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
    config = GRPOConfig(role="weaver", reference_compat=True)
    rows = policy_rows(model, rollouts, config, [])
    assert 0 in rows[0].attention_mask[:rows[0].prompt_len]      # the prompt's <|im_end|>
    ours = gradients(model, "weaver", lambda: policy_loss_backward(model, rows, ADVANTAGES, config))
    theirs = gradients(model, "weaver", lambda: backward(ref.weaver_grpo_loss(model, prompts, completions,
                                                                              ADVANTAGES)))
    assert_same(ours, theirs)


def test_trigger_grpo_reference_compat_ignores_the_trigger_temperature(active_model):
    model = active_model
    rollouts = _rollouts(model)
    args = ([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
            [r.augmentation for r in rollouts], ADVANTAGES)
    results = {}
    for compat in (True, False):
        config = GRPOConfig(role="trigger", trigger_temperature=0.5, reference_compat=compat, forward="step")
        rows = policy_rows(model, rollouts, config, [])
        results[compat] = gradients(model, "trigger", lambda: policy_loss_backward(model, rows, ADVANTAGES, config))
        want = gradients(model, "trigger", lambda: backward(ref.trigger_grpo_loss(
            model, *args, temperature=None if compat else 0.5)))
        assert_same(results[compat], want)
    assert max_rel_diff(results[True], results[False])[1] > 1e-3

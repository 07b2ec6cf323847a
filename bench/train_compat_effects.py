"""How much memgen.train's defaults differ from its reference-compatible mode
(the reference trainers' semantics), measured on the tests' tiny float64
example (tests/test_train_reference.py builds the same one). The numbers go
into docs/training.md's table.

    python bench/train_compat_effects.py      # ~30 s on one core; writes bench/results/train_compat_effects.json

Each row, default vs reference_compat on the same batch: the relative
difference of the loss, the relative difference of the whole gradient (all
trainable tensors as one vector: |g_default - g_compat| / |g_compat|) and the
cosine between the two gradients. Both modes run the step-by-step forward, so
only their semantics differ (the fast forward agrees with it to ~1e-8 in float64,
through transformers' float32 RMSNorm).
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the tiny-model builders and the tests' float64 helpers


def compare(default, compat) -> dict:
    """Loss and gradient differences of two (loss, name -> grad) results."""
    (ld, gd), (lc, gc) = default, compat
    dot = sum(float((gd[n] * gc[n]).sum()) for n in gc)
    nd = sum(float((g * g).sum()) for g in gd.values()) ** 0.5
    nc = sum(float((g * g).sum()) for g in gc.values()) ** 0.5
    diff = sum(float(((gd[n] - gc[n]) ** 2).sum()) for n in gc) ** 0.5
    return {"loss_default": ld, "loss_compat": lc, "loss_rel_diff": abs(ld - lc) / abs(lc),
            "grad_rel_diff": diff / nc, "grad_norm_ratio_compat_over_default": nc / nd, "grad_cosine": dot / (nd * nc)}


def main() -> None:
    torch.set_num_threads(1)
    import fixtures
    import memgen_fixtures
    import test_train_reference as T

    from memgen.hf import HFMemGenModel
    from memgen.train import GRPOConfig
    from memgen.train.grpo import policy_loss_backward, policy_rows
    from memgen.train.sft import accumulate_step, plan_batch

    work = Path(tempfile.mkdtemp(prefix="memgen-compat-"))
    tok = fixtures.build_tokenizer(work / "tok")
    reasoner = memgen_fixtures.build_memgen_reasoner(work / "reasoner", tok)
    inactive = memgen_fixtures.build_memgen_checkpoint(work / "inactive", tok, reasoner)
    active = memgen_fixtures.build_memgen_checkpoint(work / "active", tok, reasoner, trigger_active=True)
    model = HFMemGenModel.from_checkpoint(T.float64_checkpoint(inactive), reasoner, dtype=torch.float64)
    trig = HFMemGenModel.from_checkpoint(T.float64_checkpoint(active), reasoner, dtype=torch.float64)
    rows = {}

    # SFT, grad_accum 2 x batch 2
    _, examples = T.sft_rows(model, 4)
    batches = [plan_batch(model, examples[:2], random.Random(0)), plan_batch(model, examples[2:], random.Random(0))]
    res = {c: T.gradients(model, "weaver", lambda c=c: accumulate_step(model, batches, reference_compat=c,
                                                                              forward="step")[0])
           for c in (False, True)}
    rows["sft_grad_accum_2"] = compare(res[False], res[True])

    # weaver GRPO: EOS copies (and pad == eos)
    rollouts = T._rollouts(model)
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def weaver(loss_type):
        out = {}
        for c in (False, True):
            config = GRPOConfig(role="weaver", loss_type=loss_type, reference_compat=c, forward="step")
            prs = policy_rows(model, rollouts, config, header)
            out[c] = (T.gradients(model, "weaver", lambda: policy_loss_backward(model, prs, T.ADVANTAGES, config)),
                      sum(r.num_valid for r in prs))
        return {"scored_tokens_default": out[False][1], "scored_tokens_compat": out[True][1],
                **compare(out[False][0], out[True][0])}

    for lt in ("bnpo", "grpo"):
        rows[f"weaver_grpo_eos_copies_{lt}"] = weaver(lt)
    old_pad = model.tokenizer.pad_token
    model.tokenizer.pad_token = model.tokenizer.eos_token
    try:
        rows["weaver_grpo_pad_is_eos_bnpo"] = weaver("bnpo")
    finally:
        model.tokenizer.pad_token = old_pad

    # trigger GRPO: temperature, and the mask when pad == eos
    def trigger(temperature):
        out = {c: T.gradients(trig, "trigger", lambda c=c: policy_loss_backward(
            trig, policy_rows(trig, rollouts, GRPOConfig(role="trigger", trigger_temperature=temperature,
                                                         reference_compat=c, forward="step"), []),
            T.ADVANTAGES, GRPOConfig(role="trigger", trigger_temperature=temperature, reference_compat=c,
                                     forward="step")))
            for c in (False, True)}
        return compare(out[False], out[True])

    for t in (0.5, 1.0):
        rows[f"trigger_grpo_temperature_{t}"] = trigger(t)
    trig.tokenizer.pad_token = trig.tokenizer.eos_token
    try:
        rows["trigger_grpo_pad_is_eos_T1"] = trigger(1.0)
    finally:
        trig.tokenizer.pad_token = old_pad

    out = ROOT / "bench" / "results" / "train_compat_effects.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'case':32s} {'loss rel diff':>13s} {'grad rel diff':>13s} {'grad cosine':>11s}  scored tokens")
    for name, r in rows.items():
        tokens = f"{r['scored_tokens_default']} -> {r['scored_tokens_compat']}" if "scored_tokens_compat" in r else ""
        print(f"{name:32s} {r['loss_rel_diff']:13.3g} {r['grad_rel_diff']:13.3g} {r['grad_cosine']:11.4f}  {tokens}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

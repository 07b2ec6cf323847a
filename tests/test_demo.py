"""The shipped demo checkpoint (demo/smollm2-arith, made by demo/train.sh): it
is what the README says it is, and it runs on the packaged SmolLM2 with
insertions in the output."""
from pathlib import Path

import pytest
import torch

from memgen.checkpoint import load_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "demo" / "smollm2-arith"


def test_demo_checkpoint_is_as_documented():
    ckpt = load_checkpoint(DEMO)
    s = ckpt.settings
    assert (s.prompt_latents_len, s.inference_latents_len, s.max_inference_aug_num, s.trigger_active) == \
           (8, 8, 2, False)
    assert ckpt.reasoner_config["hidden_size"] == 576          # SmolLM2-135M
    assert ckpt.weaver_base is None and ckpt.trigger_base is None   # portable: the bases are the reasoner
    assert ckpt.weaver["prompt_query_latents"].dtype == torch.float16
    # trained: the weaver LoRA's B moved off its zero init (the trigger's, untrained, did not)
    assert any(b.any() for _, b in ckpt.weaver_lora.layers.values())
    assert not any(b.any() for _, b in ckpt.trigger_lora.layers.values())
    assert sum(f.stat().st_size for f in DEMO.iterdir()) < 8 * 2**20


@pytest.mark.slow
def test_demo_checkpoint_runs_on_the_packaged_model():
    from memgen import LLM, SamplingParams
    from memgen.sources import resolve_model_dir

    try:
        resolve_model_dir(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    llm = LLM(memgen=DEMO)
    question = ("Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside "
                "\\boxed{}.Question: Ava has 12 apples and buys 30 more. How many apples does Ava have now?\n")
    out = llm.chat([{"role": "user", "content": question}], SamplingParams(max_tokens=48, temperature=0.0),
                   use_tqdm=False)[0]
    assert out.augmentation[0] == 1 and out.metrics["num_insertions"] >= 2
    assert "\\boxed{" in out.text

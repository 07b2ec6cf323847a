"""Multi-LoRA on packed layers equals PEFT's LoRA, row by row, in one mixed forward."""
import pytest
import torch

from memgen.checkpoint import LoraWeights
from memgen.layers.backend import TorchBackend
from memgen.layers.context import ForwardContext, forward_context
from memgen.layers.lora import install_lora, resolve_target
from memgen.models import load_model

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _prefill(model, ids_per_chunk, adapter_per_chunk, block_size=8, backend=None, dtype=torch.float64):
    """One forward over several independent prefill chunks (one per row group)."""
    attn = model.attention_layers()
    layer0 = attn[0]
    num_blocks = sum((len(c) + block_size - 1) // block_size for c in ids_per_chunk)
    backend = backend or TorchBackend()
    for a in attn:
        shape = (num_blocks, block_size, layer0.num_kv_heads, layer0.head_dim)
        a.bind(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), backend)
    slots, tables, positions, adapters, next_block = [], [], [], [], 0
    for ids, adapter in zip(ids_per_chunk, adapter_per_chunk):
        n = (len(ids) + block_size - 1) // block_size
        table = list(range(next_block, next_block + n))
        next_block += n
        slots += [table[p // block_size] * block_size + p % block_size for p in range(len(ids))]
        tables.append(table)
        positions += list(range(len(ids)))
        adapters += [adapter] * len(ids)
    max_blocks = max(len(t) for t in tables)
    lens = [len(c) for c in ids_per_chunk]
    ctx = ForwardContext(
        cu_seqlens_q=torch.tensor([0] + list(torch.tensor(lens).cumsum(0))),
        context_lens=torch.tensor(lens), slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [-1] * (max_blocks - len(t)) for t in tables]),
        max_seqlen_q=max(lens), max_seqlen_k=max(lens), block_size=block_size,
        adapter_ids=torch.tensor(adapters), backend=backend)
    ctx.attn_metadata = backend.prepare(ctx)
    with forward_context(ctx), torch.inference_mode():
        hidden = model(torch.tensor(sum(ids_per_chunk, [])), torch.tensor(positions))
        return model.compute_logits(hidden).split(lens)


def _peft_lora(base_dir, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64, attn_implementation="sdpa")
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            b = module.lora_B["default"].weight
            b.data = torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3
            path = name.removeprefix("base_model.model.")
            layers[path] = (module.lora_A["default"].weight.detach().clone(), b.detach().clone())
    return peft.eval(), LoraWeights(r=4, alpha=8, target_modules=TARGETS, layers=layers)


def test_mixed_adapter_forward_matches_peft(qwen2_dir):
    model = load_model(qwen2_dir, torch.float64, torch.device("cpu"), max_position=256)
    peft_a, lora_a = _peft_lora(qwen2_dir, seed=1)
    peft_b, lora_b = _peft_lora(qwen2_dir, seed=2)
    install_lora(model, 0, lora_a, torch.float64, "cpu")
    install_lora(model, 1, lora_b, torch.float64, "cpu")
    ids = [[5, 9, 40, 7, 11, 3, 8], [12, 30, 4], [7, 7, 100, 2, 50]]
    engine = _prefill(model, ids, [0, -1, 1])
    with torch.no_grad():
        want_a = peft_a(torch.tensor([ids[0]])).logits[0]
        with peft_a.disable_adapter():
            want_base = peft_a(torch.tensor([ids[1]])).logits[0]
        want_b = peft_b(torch.tensor([ids[2]])).logits[0]
    torch.testing.assert_close(engine[0], want_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(engine[1], want_base, rtol=0, atol=1e-10)
    torch.testing.assert_close(engine[2], want_b, rtol=0, atol=1e-10)
    # the adapters matter: adapter rows differ from the base
    with torch.no_grad(), peft_a.disable_adapter():
        base_row0 = peft_a(torch.tensor([ids[0]])).logits[0]
    assert (engine[0] - base_row0).abs().max() > 1e-3


def test_bad_targets_are_value_errors(qwen2_dir):
    model = load_model(qwen2_dir, torch.float32, torch.device("cpu"), max_position=64)
    with pytest.raises(ValueError, match="not a supported projection"):
        resolve_target(model, "model.layers.0.self_attn.rotary")
    with pytest.raises(ValueError, match="only 2 layers"):
        resolve_target(model, "model.layers.7.self_attn.q_proj")
    bad = LoraWeights(r=2, alpha=4, target_modules=["q_proj"],
                      layers={"model.layers.0.self_attn.q_proj": (torch.zeros(2, 5), torch.zeros(64, 2))})
    with pytest.raises(ValueError, match="shapes"):
        install_lora(model, 0, bad, torch.float32, "cpu")


@pytest.mark.kernels
def test_stacked_lora_on_the_triton_backend_equals_the_torch_backend(qwen2_dir):
    """Both backends add the adapters stacked per layer (zero-padded ranks, and an
    all-zero slot where a layer lacks an adapter): Triton's add_lora kernels give the
    torch version's logits (PEFT's order of operations), within fp32 rounding."""
    from memgen.layers.backend import TritonBackend

    _, lora_a = _peft_lora(qwen2_dir, seed=1)
    _, lora_b = _peft_lora(qwen2_dir, seed=2)
    # adapter 1: rank 2, only on q_proj (layers without it still see adapter-1 rows)
    lora_b = LoraWeights(r=2, alpha=8, target_modules=["q_proj"], layers={
        path: (a[:2], b[:, :2]) for path, (a, b) in lora_b.layers.items() if path.endswith("q_proj")})
    ids = [[5, 9, 40, 7, 11, 3, 8], [12, 30, 4], [7, 7, 100, 2, 50]]
    results = []
    for backend in (TorchBackend(), TritonBackend()):
        model = load_model(qwen2_dir, torch.float32, torch.device("cpu"), max_position=256)
        install_lora(model, 0, lora_a, torch.float32, "cpu")
        install_lora(model, 1, lora_b, torch.float32, "cpu")
        results.append(_prefill(model, ids, [0, -1, 1], backend=backend, dtype=torch.float32))
    hook = model.model.layers[0].mlp.down_proj.lora
    assert hook.num_adapters == 2 and [s[1].shape[0] for s in hook.stacks()] == [2]
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_weight_push_keeps_the_stacked_tensors(qwen2_dir):
    """Re-installing an adapter of the same shapes (training's weight push) copies the
    new values into the stacks the fused path already built: CUDA graphs captured
    over them stay valid. New shapes build new stacks; a bad adapter changes nothing."""
    _, lora_a = _peft_lora(qwen2_dir, seed=1)
    _, lora_b = _peft_lora(qwen2_dir, seed=2)
    model = load_model(qwen2_dir, torch.float32, torch.device("cpu"), max_position=64)
    install_lora(model, 0, lora_a, torch.float32, "cpu")
    hook = model.model.layers[0].self_attn.qkv_proj.lora
    before = hook.stacks()
    tensors = [t for s in before for t in s[1:]]
    install_lora(model, 0, lora_b, torch.float32, "cpu")     # same shapes, new values
    assert hook.stacks() is before and [t for s in hook.stacks() for t in s[1:]] == tensors
    q_path = "model.layers.0.self_attn.q_proj"
    q_slice = model.model.layers[0].self_attn.qkv_proj.output_slices["q"]
    stack_a = next(s for s in before if s[0] == q_slice)[1]
    torch.testing.assert_close(stack_a[0], lora_b.layers[q_path][0].float())
    bad = LoraWeights(r=4, alpha=8, target_modules=["q_proj"], layers={q_path: (torch.zeros(4, 5), torch.zeros(64, 4))})
    with pytest.raises(ValueError, match="shapes"):
        install_lora(model, 0, bad, torch.float32, "cpu")
    assert len(hook.deltas) == 2                               # q and v of lora_b, untouched
    install_lora(model, 1, lora_a, torch.float32, "cpu")     # a second adapter: new layout
    assert hook.stacks() is not before and hook.stacks()[0][1].shape[0] == 2

"""The fast training forward (memgen.hf.fast_forward, memgen.train.fast) gives
the step-by-step forward's numbers: in float64, the loss and the gradient of
every trainable tensor agree to 1e-12 relative, for SFT batches of different
rows, GRPO groups sharing their prompt (masks with zeros included), the
turns of a conversation, every tiny architecture and a weaver wider than the
reasoner; and its delimiter scan finds the insertion points the full-prefix
decode finds, on tokenizers built to be awkward."""
import contextlib
import random

import pytest
import torch

import memgen_fixtures
from memgen.hf import HFMemGenModel
from memgen.hf.fast_forward import (ends_with_delimiter, forward_rows, insertion_points, lm_logits, nested_prefix,
                                    plan_row, supports_fast_forward)
from memgen.hf.sft import insertion_points as step_insertion_points
from memgen.train import ChatExample, encode_example
from memgen.train.common import trainable_parameters
from memgen.train.fast import groups, loss_sum, token_logprobs

DELIMS = (",", ".", "\n")
TOL = 1e-12
COMPLETIONS = ["We add, then check. Answer 42.", "First, 12. Then 30, and so 42.\nDone.",
               "It is 42.", "Hmm, well, a, b, c. d.\ne"]


@contextlib.contextmanager
def float64_rmsnorm():
    """transformers' RMSNorms compute in float32 whatever the input's dtype, so
    a float64 model's gradients are float32-exact only; two graphs that sum the
    same terms in another order then differ by ~1e-7. Compute them in the
    input's dtype while comparing (both paths alike)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    classes = [modeling_qwen2.Qwen2RMSNorm, modeling_qwen3.Qwen3RMSNorm, modeling_llama.LlamaRMSNorm]
    saved = [c.forward for c in classes]
    for c in classes:
        c.forward = forward
    try:
        yield
    finally:
        for c, f in zip(classes, saved):
            c.forward = f


def _train_mode(model):
    """Trainable weaver, LoRA dropout off (the two paths draw different dropout masks)."""
    params = trainable_parameters(model, "weaver")
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    return params


def _grads(params, loss):
    for p in params.values():
        p.grad = None
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


def _assert_close(fast_loss, step_loss, fast_grads, step_grads):
    assert abs(float(fast_loss) - float(step_loss)) <= TOL * abs(float(step_loss))
    assert fast_grads.keys() == step_grads.keys() and step_grads
    for name, g in step_grads.items():
        assert float((fast_grads[name] - g).norm()) <= TOL * float(g.norm()), name


def _sft_fast_and_step(model, params, rows):
    """((fast loss, grads), (step loss, grads)) of the summed CE over single-turn
    rows: memgen.train.fast.loss_sum against one sft_forward per row."""
    with float64_rmsnorm():
        step = sum(torch.nn.functional.cross_entropy(
            model.sft_forward(torch.tensor(ids), torch.tensor(labels)).logits[:-1], torch.tensor(labels[1:]),
            ignore_index=-100, reduction="sum") for ids, labels in rows)
        step_grads = _grads(params, step)
        fast = loss_sum(model, rows)
        fast_grads = _grads(params, fast)
    return (fast, fast_grads), (step, step_grads)


def _step_logprobs(model, ids, labels, mask=None):
    """log p(labels[t+1]) at every supervised label, from sft_forward."""
    out = model.sft_forward(torch.tensor(ids), torch.tensor(labels), None if mask is None else torch.tensor(mask))
    reads = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]
    logp = torch.log_softmax(out.logits[reads], -1)
    return logp.gather(-1, torch.tensor([labels[t + 1] for t in reads])[:, None]).squeeze(-1)


def _examples(tok, prompts=memgen_fixtures.PROMPTS):
    return [encode_example(tok, ChatExample([{"role": "user", "content": p}], c))
            for p, c in zip(prompts * 2, COMPLETIONS)]


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


# ------------------------------------------------------------ delimiters
def _tricky_tokenizers(tokenizer):
    """(name, tokenizer): the tests' byte-level BPE, a byte-level BPE over
    multi-byte text whose merges glue delimiters to other text, a
    SentencePiece-style one (Metaspace, byte fallback, a stripped leading
    space), and a WordPiece one with cleanup."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["Café, naïve. 日本語、テスト。\n😀👍🏽 e\u0301, ok.\n\n,\".',\n",
            "a.b,c\nd ., ,. \n, x.\ny,", "Über straße, 北京. 🎉\n\t.\r\n", "word, word. word\nword,word.word"] * 8
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    out = [("fixture-bytelevel", tokenizer)]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.append(("bytelevel-multibyte", PreTrainedTokenizerFast(tokenizer_object=bpe)))

    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    sp.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *specials, *bytes_]))
    out.append(("sentencepiece-style", PreTrainedTokenizerFast(tokenizer_object=sp)))

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", *specials]))
    out.append(("wordpiece-cleanup", PreTrainedTokenizerFast(tokenizer_object=wp, clean_up_tokenization_spaces=True)))
    return out


def test_delimiter_scan_equals_full_prefix_decode(tokenizer):
    """ends_with_delimiter(ids, i) == decode(ids[:i]).endswith(delimiters) at
    every i, on random id sequences (split UTF-8 characters, special tokens,
    empty decodes, runs of delimiters) and on encoded text."""
    rng = random.Random(0)
    checked = hits = 0
    for name, tok in _tricky_tokenizers(tokenizer):
        vocab = len(tok)
        delim_ids = [i for i in range(vocab) if tok.decode([i]).endswith(DELIMS)]
        empty_ids = [i for i in range(vocab) if tok.decode([i]) == ""]
        rows = [tok("Café, naïve.\n日本語、😀. a,b\n\n, x", add_special_tokens=False)["input_ids"]]
        for _ in range(40):
            row = []
            for _ in range(rng.randint(1, 40)):
                pool = rng.choice([range(vocab), delim_ids or range(vocab), empty_ids or range(vocab), range(vocab)])
                row.append(rng.choice(list(pool)))
            rows.append(row)
        for ids in rows:
            for i in range(1, len(ids) + 1):
                want = tok.decode(ids[:i], skip_special_tokens=False).endswith(DELIMS)
                assert ends_with_delimiter(tok, ids, i, DELIMS) == want, (name, ids[:i])
                checked += 1
                hits += want
    assert checked > 2000 and hits > 200


def test_insertion_points_equal_the_step_paths(tokenizer, memgen_ckpt_dir, memgen_reasoner_dir):
    """The early-stopping scan returns sft.insertion_points' points, for every budget."""
    model = HFMemGenModel.from_checkpoint(memgen_ckpt_dir, memgen_reasoner_dir)
    for example in _examples(model.tokenizer):
        supervised = [t != -100 for t in example.labels]
        for budget in (0, 1, 2, 5, 50):
            model.settings.max_inference_aug_num = budget
            want = step_insertion_points(model, torch.tensor(example.input_ids), torch.tensor(example.labels))
            assert insertion_points(model.tokenizer, DELIMS, example.input_ids, supervised, budget) == want
    with pytest.raises(ValueError, match="exactly one start of supervision"):
        insertion_points(model.tokenizer, DELIMS, [5, 6, 7, 8], [False, True, False, True], 5)


# ------------------------------------------------------------ forwards
@pytest.fixture(scope="module")
def f64_models(memgen_ckpt_dir, memgen_active_ckpt_dir, memgen_wide_ckpt_dir, memgen_reasoner_dir,
               wide_weaver_dir):
    load = HFMemGenModel.from_checkpoint
    return {"inactive": load(memgen_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64),
            "active": load(memgen_active_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64),
            "wide": load(memgen_wide_ckpt_dir, memgen_reasoner_dir, weaver_dir=wide_weaver_dir,
                         dtype=torch.float64)}


@pytest.mark.parametrize("kind,budget", [("inactive", 5), ("active", 2), ("wide", 5), ("inactive", 0)])
def test_sft_batch_equals_step_by_step(f64_models, kind, budget, torch_one_thread):
    """A batch of different rows (different prompts, lengths and points) in one
    fast forward: loss and every trainable gradient == the rows' sft_forwards."""
    model = f64_models[kind]
    model.settings.max_inference_aug_num, old = budget, model.settings.max_inference_aug_num
    try:
        params = _train_mode(model)
        examples = _examples(model.tokenizer)
        rows = [(e.input_ids, e.labels) for e in examples]
        plans = [plan_row(model, ids, labels) for ids, labels in rows]
        assert not nested_prefix(plans) and groups(plans) == [(list(range(len(rows))), False)]
        if budget:
            assert sum(len(p.inference_points) for p in plans) >= 4
        (fast, fast_grads), (step, step_grads) = _sft_fast_and_step(model, params, rows)
        _assert_close(fast, step, fast_grads, step_grads)
    finally:
        model.settings.max_inference_aug_num = old


def test_grpo_group_shares_its_prompt(f64_models, torch_one_thread):
    """A GRPO group (one prompt, completions of different lengths, some with
    delimiters and EOS, one row masked as the reference's rows are) runs the
    prompt once; its weighted log-prob sum and gradients equal sft_forward's."""
    model = f64_models["active"]
    params = _train_mode(model)
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False,
                                     add_generation_prompt=True)
    prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    comps = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in COMPLETIONS]
    comps += [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (3, 17, 30)]
    rows = [(prompt + c, [-100] * len(prompt) + c, None) for c in comps]
    # a reference-style row: EOS copies after the first EOS, masked where ids == pad, scored where the mask is 1
    ids = prompt + comps[0] + [tok.pad_token_id] * 3
    mask = [int(t != tok.pad_token_id) for t in ids]
    labels = [t if m else -100 for t, m in zip(ids[len(prompt):], mask[len(prompt):])]
    rows.append((ids, [-100] * len(prompt) + labels, mask))
    weights = torch.randn(len(rows), generator=g, dtype=torch.float64)
    with float64_rmsnorm():
        plans = [plan_row(model, i, l, m) for i, l, m in rows]
        assert nested_prefix(plans) and groups(plans) == [(list(range(len(rows))), True)]
        step = sum(w * _step_logprobs(model, *row).sum() for w, row in zip(weights, rows))
        step_grads = _grads(params, step)
        fast = sum(w * lp.sum() for w, lp in zip(weights, token_logprobs(model, rows)))
        fast_grads = _grads(params, fast)
    _assert_close(fast, step, fast_grads, step_grads)


def test_conversation_turns_share_the_conversation(f64_models, torch_one_thread):
    """The turns of a conversation (spec §3.2: each turn one forward over the
    conversation up to its end, latents before the turn) nest: one pass over
    the conversation serves them all, with the step-by-step numbers."""
    model = f64_models["inactive"]
    params = _train_mode(model)
    tok = model.tokenizer
    messages = [{"role": "system", "content": "Be brief."}]
    for i, c in enumerate(COMPLETIONS + COMPLETIONS[:2]):
        messages += [{"role": "user", "content": f"Question {i}, please."}, {"role": "assistant", "content": c}]
    def tokens(msgs):
        return tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]

    ids = tokens(messages)
    header = len(tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    # one single-turn forward per assistant turn: ids up to the turn's end, labels on the turn
    # (its content, <|im_end|> and newline; the header is not supervised)
    rows = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(tokens(messages[:k])) + header, len(tokens(messages[:k + 1]))
            assert ids[:end] == tokens(messages[:k + 1])
            rows.append((ids[:end], [-100] * start + ids[start:end]))
    assert len(rows) == 6
    assert nested_prefix([plan_row(model, i, l) for i, l in rows])
    (fast, fast_grads), (step, step_grads) = _sft_fast_and_step(model, params, rows)
    _assert_close(fast, step, fast_grads, step_grads)


def test_every_tiny_architecture(tiny_model_dir, torch_one_thread):
    """qwen2, qwen3 (q/k norms) and llama (tied embeddings): a batch and a shared group."""
    from memgen.checkpoint import MemGenSettings

    settings = MemGenSettings(prompt_latents_len=3, inference_latents_len=2, max_inference_aug_num=3,
                              weaver_lora_config=dict(memgen_fixtures.LORA_CONFIG),
                              trigger_lora_config=dict(memgen_fixtures.LORA_CONFIG))
    model = HFMemGenModel.from_random(settings, tiny_model_dir, dtype=torch.float64)
    _randomize_lora(model)
    assert supports_fast_forward(model) is None
    params = _train_mode(model)
    examples = _examples(model.tokenizer)
    same_prompt = [encode_example(model.tokenizer, ChatExample([{"role": "user", "content": "Hi."}], c))
                   for c in COMPLETIONS]
    for batch in ([(e.input_ids, e.labels) for e in examples], [(e.input_ids, e.labels) for e in same_prompt]):
        (fast, fast_grads), (step, step_grads) = _sft_fast_and_step(model, params, batch)
        _assert_close(fast, step, fast_grads, step_grads)


def test_hidden_rows_without_latents_and_lm_head(f64_models):
    """A row whose latent blocks are empty (K = 0 for both kinds) is a plain
    reasoner pass: its reads equal the reasoner's own logits."""
    model = f64_models["inactive"]
    example = _examples(model.tokenizer)[0]
    saved = model.prompt_query_latents, model.inference_query_latents
    try:
        model.prompt_query_latents = torch.nn.Parameter(saved[0][:0])
        model.inference_query_latents = torch.nn.Parameter(saved[1][:0])
        plan = plan_row(model, example.input_ids, example.labels)
        assert plan.points == [] and plan.reads
        with torch.no_grad():
            hidden = forward_rows(model, [plan])[0]
            want = model.reasoner(torch.tensor([example.input_ids])).logits[0, plan.reads]
        assert torch.allclose(lm_logits(model.reasoner, hidden), want, rtol=1e-12, atol=1e-12)
    finally:
        model.prompt_query_latents, model.inference_query_latents = saved


def test_trigger_logprobs_equal_the_trigger_forward(f64_models, torch_one_thread):
    """Trigger GRPO's decision log-probs without the trigger's LM head, a
    group's prompt run once: equal to one trigger CausalLM forward per row,
    gradients of the trigger LoRA and head included; pad tokens inside a
    completion (mask 0) read as transformers reads them."""
    from memgen.hf import positions_from_mask
    from memgen.train.fast import trigger_logprobs

    model = f64_models["active"]
    params = trainable_parameters(model, "trigger")
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    tok = model.tokenizer
    pad = tok.pad_token_id
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(1)
    comps = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (1, 9, 20, 31)]
    comps[2][5] = comps[2][11] = pad                     # masked tokens read by later decisions
    rows = []
    for c in comps:
        decisions = [int(torch.randint(0, 2, (1,), generator=g)) if j % 3 == 0 else -100 for j in range(len(c))]
        ids = prompt + c
        rows.append((ids, [int(t != pad) for t in ids], len(prompt), decisions))
    rows.append((rows[1][0], None, len(prompt), rows[1][3]))      # another mask: its own run
    weights = torch.randn(len(rows), generator=g, dtype=torch.float64)

    def step_logprobs(ids, mask, p, decisions):
        ids_t = torch.tensor([ids])
        m = torch.ones_like(ids_t) if mask is None else torch.tensor([mask])
        hidden = model.trigger(input_ids=ids_t, attention_mask=m, position_ids=positions_from_mask(m),
                               output_hidden_states=True).hidden_states[-1][0]
        logp = torch.log_softmax(model.trigger_head(hidden[p - 1:p - 1 + len(decisions)]) / 0.7, -1)
        d = torch.tensor(decisions)
        return logp[d != -100].gather(-1, d[d != -100][:, None]).squeeze(-1)

    with float64_rmsnorm():
        step = sum(w * step_logprobs(*row).sum() for w, row in zip(weights, rows))
        step_grads = _grads(params, step)
        fast = sum(w * lp.sum() for w, lp in zip(weights, trigger_logprobs(model, rows, 0.7)))
        fast_grads = _grads(params, fast)
    _assert_close(fast, step, fast_grads, step_grads)


# ------------------------------------------------------------ the trainers' hooks
def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_train_sft_fast_equals_step(memgen_ckpt_dir, memgen_reasoner_dir, torch_one_thread):
    """train_sft(forward="fast") and (forward="step") from the same weights:
    the same losses and gradient norms at every step and the same weights
    after, on batches mixing one-turn rows and conversations, accumulating 2."""
    from memgen.train import SFTConfig, parse_chat_example, train_sft

    runs = {}
    for forward in ("step", "fast"):
        model = HFMemGenModel.from_checkpoint(memgen_ckpt_dir, memgen_reasoner_dir, dtype=torch.float64)
        model.settings.max_prompt_aug_num = 2          # the 3-turn conversation trains 2 random turns
        tok = model.tokenizer
        examples = _examples(tok)
        chat = [{"role": "user", "content": "Hi."}]
        for c in COMPLETIONS[:3]:
            chat += [{"role": "assistant", "content": c}, {"role": "user", "content": "And then?"}]
        examples.insert(1, encode_example(tok, parse_chat_example({"messages": chat[:-1]})))
        config = SFTConfig(learning_rate=1e-3, batch_size=2, grad_accum=2, max_steps=2, warmup_ratio=0.0,
                           forward=forward, shuffle=False)
        with float64_rmsnorm():
            history = train_sft(model, examples, config)
        runs[forward] = (history, _snapshot(model))
    (h_step, w_step), (h_fast, w_fast) = runs["step"], runs["fast"]
    assert len(h_step) == len(h_fast) == 2
    for a, b in zip(h_step, h_fast):
        assert a["loss"] == pytest.approx(b["loss"], rel=TOL) and a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)
    assert w_step.keys() == w_fast.keys() and w_step
    for name, w in w_step.items():
        assert float((w_fast[name] - w).norm()) <= 1e-10 * float(w.norm()), name


@pytest.mark.parametrize("role,compat", [("weaver", False), ("weaver", True), ("trigger", False), ("trigger", True)])
def test_policy_loss_fast_equals_step(f64_models, role, compat, torch_one_thread):
    """grpo.policy_loss_backward: forward="fast" (the rows in one pass, one
    backward) and "step" give the same loss and gradients, on two groups of
    rollouts (EOS, EOS copies and pad in reference-compat rows, zero advantages)."""
    from memgen.train.data import ASSISTANT_HEADER
    from memgen.train.grpo import GRPOConfig, policy_loss_backward, policy_rows
    from memgen.train.rollout import Rollout

    model = f64_models["active"]
    params = trainable_parameters(model, role)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    tok = model.tokenizer
    g = torch.Generator().manual_seed(2)
    rollouts = []
    for group, question in enumerate(["What is 12 plus 30?", "Hello"]):
        prompt = tok(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for i, c in enumerate(COMPLETIONS):
            comp = tok(c, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if i % 2 == 0 else [])
            aug = [int(torch.randint(0, 2, (1,), generator=g)) if j % 4 == 0 else -100 for j in range(len(comp))]
            rollouts.append(Rollout(group, prompt, comp, aug, c, "stop"))
    header = tok(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
    advantages = torch.randn(len(rollouts), generator=g, dtype=torch.float64)
    advantages[3] = 0.0
    results = {}
    for forward in ("step", "fast"):
        config = GRPOConfig(role=role, reference_compat=compat, forward=forward, trigger_temperature=0.8,
                            temperature=0.9, loss_type="grpo")
        rows = policy_rows(model, rollouts, config, header)
        for p in params.values():
            p.grad = None
        with float64_rmsnorm():
            loss = policy_loss_backward(model, rows, advantages, config)
        results[forward] = (loss, {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
    _assert_close(results["fast"][0], results["step"][0], results["fast"][1], results["step"][1])

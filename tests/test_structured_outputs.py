"""Structured outputs offline (SamplingParams.structured_outputs, vLLM's names):
the text follows the constraint, constrained rows batch with unconstrained rows
that stay bit for bit what they are alone (float64), MemGen's latents are still
inserted inside the JSON, and preemption, n, seed, stop, max_tokens and EOS
behave; bad constraints are ValueErrors before anything enters the engine."""
import json
import re

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from memgen import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"]}
COMPACT = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
PROMPTS = ["Hello world", "The quick brown fox", "Question: what is 12 plus 30?"]


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, dtype="float64", max_model_len=128)


def _valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_exported_and_vllm_shaped():
    import memgen

    assert memgen.StructuredOutputsParams is StructuredOutputsParams
    sp = SamplingParams(structured_outputs={"regex": "[ab]+"})     # vLLM's request-field dict
    assert isinstance(sp.structured_outputs, StructuredOutputsParams) and sp.structured_outputs.kind == "regex"
    assert StructuredOutputsParams(json=json.dumps(SCHEMA)).key() == StructuredOutputsParams(json=SCHEMA).key()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_is_followed(llm, temperature):
    eos = llm.tokenizer.eos_token_id
    sp = SamplingParams(max_tokens=60, temperature=temperature, seed=3, n=2, structured_outputs=COMPACT)
    for out in llm.generate(PROMPTS, sp, use_tqdm=False):
        for c in out.outputs:
            assert c.finish_reason == "stop" and c.token_ids[-1] == eos   # EOS only once the JSON is complete
            assert eos not in c.token_ids[:-1]
            _valid(c.text)


@pytest.mark.parametrize("so, pattern", [
    (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), r"[0-9]{3}-[a-z]{2,4}"),
    (StructuredOutputsParams(choice=["yes", "no", 'say "hi"']), r'yes|no|say "hi"'),
    (StructuredOutputsParams(grammar='root ::= "a" ("b" | "c")* "."'), r"a[bc]*\."),
    (StructuredOutputsParams(json_object=True, disable_any_whitespace=True), r"\{.*\}"),
])
def test_regex_choice_grammar_json_object(llm, so, pattern):
    sp = SamplingParams(max_tokens=40, temperature=1.0, seed=0, n=3, structured_outputs=so)
    for out in llm.generate(PROMPTS, sp, use_tqdm=False):
        for c in out.outputs:
            if c.finish_reason == "stop":
                assert re.fullmatch(pattern, c.text, re.DOTALL), c.text
            else:   # cut by max_tokens: a prefix of a match (the grammar never allowed a wrong token)
                assert c.finish_reason == "length" and len(c.token_ids) == 40
    if so.json_object:
        done = [c for o in llm.generate(PROMPTS, sp, use_tqdm=False) for c in o.outputs if c.finish_reason == "stop"]
        assert all(isinstance(json.loads(c.text), dict) for c in done)


def test_unconstrained_rows_are_unchanged_in_a_mixed_batch(llm):
    """float64: plain rows (greedy, seeded, with logprobs) equal themselves run alone,
    whatever constrained rows share their steps."""
    plain = [SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11, logprobs=2, ignore_eos=True)]
    alone = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    constrained = SamplingParams(max_tokens=60, temperature=1.0, seed=5, structured_outputs=COMPACT)
    mixed = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[1]],
                         [constrained, plain[0], constrained, plain[1]], use_tqdm=False)
    for a, m in zip(alone, [mixed[1], mixed[3]]):
        assert m.token_ids == a.token_ids and m.logprobs == a.logprobs
    # a constrained row is the same alone and batched (seeded), and differs from the plain run
    solo = llm.generate(PROMPTS[2], constrained, use_tqdm=False)[0]
    assert mixed[0].token_ids == solo.token_ids
    _valid(solo.text)


def test_max_tokens_stop_and_seed(llm):
    cut = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, structured_outputs=COMPACT),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4 and cut.text.startswith('{"')
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0.0, structured_outputs=COMPACT),
                        use_tqdm=False)[0]
    assert full.token_ids[:4] == cut.token_ids
    stopped = llm.generate(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0.0, stop=[","],
                                                      structured_outputs=COMPACT), use_tqdm=False)[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.index(",")]
    seeded = SamplingParams(max_tokens=60, temperature=1.0, seed=42, n=2, structured_outputs=COMPACT)
    a, b = (llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0] for _ in range(2))
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_ignore_eos_ends_where_the_grammar_ends(llm):
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    out = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no")


def test_preemption_and_recompute_keep_the_outputs(qwen2_dir, llm):
    sps = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, structured_outputs=COMPACT) for i in range(3)]
    expected = [llm.generate(p, sp, use_tqdm=False)[0].token_ids for p, sp in zip(PROMPTS, sps)]
    tight = LLM(qwen2_dir, dtype="float64", block_size=4, max_model_len=64, num_kv_blocks=18)
    outs = tight.generate(PROMPTS, sps, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    for o in outs:
        _valid(o.text)


def test_compiled_grammars_are_cached(llm):
    backend = llm.structured_outputs()
    schema = {"type": "object", "properties": {"cache_me": {"type": "integer"}}, "required": ["cache_me"]}
    before = backend.num_compiled
    for so in (StructuredOutputsParams(json=schema), StructuredOutputsParams(json=json.dumps(schema, indent=2))):
        llm.generate("Hi", SamplingParams(max_tokens=2, structured_outputs=so), use_tqdm=False)
    assert backend.num_compiled == before + 1


@pytest.mark.parametrize("make, match", [
    (lambda: StructuredOutputsParams(json='{"type": "object",'), "not valid JSON"),
    (lambda: StructuredOutputsParams(json={"type": "nonsense"}), "does not compile"),
    (lambda: StructuredOutputsParams(regex="a(("), "does not compile"),
    (lambda: StructuredOutputsParams(grammar="root ::= undefined_rule"), "does not compile"),
    (lambda: StructuredOutputsParams(json=SCHEMA, regex="a"), "exactly one"),
    (lambda: StructuredOutputsParams(), "exactly one"),
    (lambda: StructuredOutputsParams(choice=[]), "non-empty"),
    (lambda: SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+")), "min_tokens"),
    (lambda: SamplingParams(structured_outputs={"json": SCHEMA, "nope": 1}), "unknown field"),
])
def test_bad_constraints_are_value_errors(llm, make, match):
    with pytest.raises(ValueError, match=match):
        so = make()
        llm.generate("Hi", so if isinstance(so, SamplingParams) else SamplingParams(max_tokens=2, structured_outputs=so),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finish_reason   # still serving


# ---- MemGen: the trigger and weaver run as before, latents land inside the JSON ----------
@pytest.fixture(scope="module")
def memgen_llm(memgen_reasoner_dir, memgen_active_ckpt_dir):
    return LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float64", max_model_len=160)


def test_memgen_latents_inside_constrained_json(memgen_llm):
    conv = [[{"role": "user", "content": p}] for p in PROMPTS]
    sp = SamplingParams(max_tokens=60, temperature=1.0, seed=7, n=2, structured_outputs=COMPACT)
    outs = memgen_llm.chat(conv, sp, use_tqdm=False)
    inside = 0
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop"
            _valid(c.text)
            assert len(c.augmentation) == len(c.token_ids)
            # insertions before tokens after the opening brace and before the final EOS: inside the JSON
            inside += sum(1 for a in c.augmentation[1:-1] if a == 1)
            # the fixture's checkpoint: 3 prompt latents, 2 per insertion while decoding
            assert c.metrics["num_latent_positions"] == 3 * (c.augmentation[0] == 1) + 2 * c.augmentation[1:].count(1)
    assert inside > 0, "MemGen's weaver inserted no latents inside the JSON"


def test_memgen_plain_rows_unchanged_beside_constrained(memgen_llm):
    conv = [{"role": "user", "content": PROMPTS[1]}]
    plain = SamplingParams(max_tokens=16, temperature=0.0)
    alone = memgen_llm.chat(conv, plain, use_tqdm=False)[0]
    constrained = SamplingParams(max_tokens=40, temperature=1.0, seed=1, structured_outputs=COMPACT)
    mixed = memgen_llm.chat([[{"role": "user", "content": PROMPTS[0]}], conv], [constrained, plain],
                            use_tqdm=False)
    assert mixed[1].token_ids == alone.token_ids and mixed[1].augmentation == alone.augmentation


def test_memgen_preemption_keeps_constrained_outputs(memgen_reasoner_dir, memgen_active_ckpt_dir, memgen_llm):
    conv = [[{"role": "user", "content": p}] for p in PROMPTS]
    sps = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, structured_outputs=COMPACT) for i in range(3)]
    expected = memgen_llm.chat(conv, sps, use_tqdm=False)
    tight = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float64", max_model_len=96,
                block_size=4, num_kv_blocks=80, max_num_batched_tokens=16)
    outs = tight.chat(conv, sps, use_tqdm=False)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0, "the KV budget must force preemption"
    for o, e in zip(outs, expected):
        assert o.token_ids == e.token_ids and o.augmentation == e.augmentation


def test_cache_is_bounded_and_a_missing_backend_is_clear(llm, monkeypatch):
    import sys

    from memgen.structured import backend as backend_module

    backend = llm.structured_outputs()
    monkeypatch.setattr(backend_module, "MAX_CACHED_GRAMMARS", 2)
    for word in ("alpha", "beta", "gamma"):
        backend.compile(StructuredOutputsParams(regex=word))
    assert len(backend._cache) == 2 and ("regex", "alpha", False) not in backend._cache
    monkeypatch.setitem(sys.modules, "xgrammar", None)     # as if not installed
    with pytest.raises(ImportError, match=r"memgen\[structured\]") as e:
        backend_module.StructuredOutputs(llm.tokenizer, llm.vocab_size, frozenset([2]))
    assert isinstance(e.value, ValueError)                  # so the server answers 400, not 500

"""Decode-step CUDA graphs (engine/cuda_graph.py), on the CPU: a stand-in graph
records the captured callable and re-runs it on the same static buffers at each
replay, so the buffer copies and the padding rows go through the Triton kernels
(interpreted) exactly as a replayed CUDA graph would see them."""
import types

import pytest
import torch

from memgen import LLM, SamplingParams
from memgen.config import EngineConfig
from memgen.engine.cuda_graph import DecodeGraphs, build_decode_graphs, default_batch_sizes, max_blocks_per_seq

pytestmark = pytest.mark.kernels

PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


class RecordingGraph:
    """CPU stand-in for torch.cuda.CUDAGraph: capture runs fn once and keeps it,
    replay runs it again (on whatever the static buffers hold then)."""
    log: list = []

    def __init__(self):
        self.fn, self.replays = None, 0

    def capture(self, fn, pool) -> None:
        RecordingGraph.log.append(pool)
        self.fn = fn
        fn()

    def replay(self) -> None:
        self.replays += 1
        self.fn()

    def pool(self):
        return ("pool", id(self))


def _install(llm, batch_sizes, max_batch=4):
    """Graphs on every runner of the engine, with a log of the live row count of each replayed step."""
    steps = []
    for runner in (p.runner for p in llm.engine.pools):
        graphs = DecodeGraphs(runner, max_batch, max_blocks_per_seq(runner), graph_factory=RecordingGraph,
                              batch_sizes=batch_sizes)
        graphs.capture()
        run = graphs.run

        def spy(inp, _run=run, _graphs=graphs):
            steps.append((inp.input_ids.shape[0], inp.context.adapter_ids is not None))
            return _run(inp)

        graphs.run = spy
        runner.decode_graphs = graphs
    return steps


def _outputs(llm, prompts):
    return [(o.token_ids, o.augmentation) for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def test_plain_decode_graphs_replay_padded_batches_with_eager_tokens(qwen2_dir):
    llm = LLM(qwen2_dir, dtype="float32", attention_backend="triton", enable_prefix_caching=False, max_num_seqs=4)
    prompts = ["Hello world, this", "The quick brown fox jumps over", "One"]
    want = _outputs(llm, prompts)

    RecordingGraph.log = []
    steps = _install(llm, batch_sizes=[2, 4])
    graphs = llm.engine.model_runner.decode_graphs
    assert set(graphs.graphs) == {(4, False), (2, False)}     # no LoRA hooks: one variant
    assert RecordingGraph.log[0] is None and RecordingGraph.log[1] == ("pool", id(graphs.graphs[(4, False)]))

    got = _outputs(llm, prompts)
    assert got == want
    # every decode step (3 live rows) ran the size-4 graph: one padding row
    assert steps == [(3, False)] * (PARAMS.max_tokens - 1)
    assert graphs.graphs[(4, False)].replays == PARAMS.max_tokens - 1 == graphs.num_replays
    assert graphs.graphs[(2, False)].replays == 0
    # the padding row stored nothing and stays padding
    assert graphs.slot_mapping[3] == -1 and graphs.context_lens[3] == 1 and graphs.block_tables[3, 0] == 0

    # one prompt alone: 1 row padded to 2, and again the eager tokens
    steps.clear()
    assert _outputs(llm, prompts[:1]) == want[:1]
    assert steps and all(s == (1, False) for s in steps)
    assert graphs.graphs[(2, False)].replays == len(steps)
    assert graphs.slot_mapping[1:].tolist() == [-1] * 3 and graphs.context_lens[1:].tolist() == [1] * 3


def test_memgen_decode_graphs_give_eager_tokens_and_masks(memgen_reasoner_dir, memgen_active_ckpt_dir):
    kwargs = dict(memgen=memgen_active_ckpt_dir, dtype="float32", attention_backend="triton",
                  enable_prefix_caching=False, max_num_seqs=4)
    llm = LLM(memgen_reasoner_dir, **kwargs)
    prompts = ["Hello. Then, go", "A, b. c"]     # the trigger decides mid-generation: R + T decode steps
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = [(o.token_ids, o.augmentation) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert any(1 in aug for _, aug in want)   # latents were inserted: weaver steps ran eagerly in between

    steps = _install(llm, batch_sizes=[4])
    graphs = llm.engine.model_runner.decode_graphs
    assert set(graphs.graphs) == {(4, False), (4, True)}     # LoRA hooks: with and without adapter ids
    got = [(o.token_ids, o.augmentation) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert steps and all(n < 4 for n, _ in steps)            # every replay padded
    assert {a for _, a in steps} == {False, True}            # reasoner-only and mixed (trigger LoRA) steps


def test_weight_update_recaptures(memgen_reasoner_dir, memgen_active_ckpt_dir):
    """New adapter stacks (update_memgen_weights -> install_lora) make the graphs stale: captured again."""
    from memgen.layers.lora import LoraHook

    llm = LLM(memgen_reasoner_dir, memgen=memgen_active_ckpt_dir, dtype="float32", attention_backend="triton")
    runner = llm.engine.model_runner
    graphs = DecodeGraphs(runner, 1, max_blocks_per_seq(runner), graph_factory=RecordingGraph, batch_sizes=[1])
    graphs.capture()    # the adapter variant's warm-up stacks the adapters
    before = graphs.graphs[(1, True)]
    inp = _decode_input(runner, 1, adapter_ids=torch.tensor([1]))
    assert graphs.can_run(inp) and graphs.graphs[(1, True)] is before
    hooks = [m.lora for m in runner.model.modules() if isinstance(getattr(m, "lora", None), LoraHook)]
    assert hooks and all(h._stacks is not None for h in hooks)
    for h in hooks:
        h._stacks = None                                       # what _restack does after install_lora
    assert graphs.can_run(inp) and graphs.graphs[(1, True)] is not before
    assert all(h._stacks is not None for h in hooks)           # the new capture baked in the new stacks


def _decode_input(runner, n, **overrides):
    """A ModelInput of n one-row decode chunks (fresh tensors, nothing of the engine)."""
    from memgen.engine.input_batch import ModelInput
    from memgen.layers.context import ForwardContext

    i64 = dict(dtype=torch.int64)
    ctx = ForwardContext(cu_seqlens_q=torch.arange(n + 1, **i64), context_lens=torch.full((n,), 3, **i64),
                         slot_mapping=torch.arange(n, **i64) * runner.block_size + 2,
                         block_tables=torch.arange(n, **i64)[:, None], max_seqlen_q=1, max_seqlen_k=3,
                         block_size=runner.block_size, adapter_ids=overrides.pop("adapter_ids", None))
    for k, v in overrides.items():
        setattr(ctx, k, v)
    return ModelInput(torch.zeros(n, **i64), torch.full((n,), 2, **i64), None, None, ctx, torch.arange(n))


def test_can_run_only_pure_decode_steps_that_fit(qwen2_dir):
    llm = LLM(qwen2_dir, dtype="float32", attention_backend="triton", max_num_seqs=8)
    runner = llm.engine.model_runner
    width = max_blocks_per_seq(runner)
    graphs = DecodeGraphs(runner, 4, width, graph_factory=RecordingGraph, batch_sizes=[2, 4])
    graphs.graphs = {(2, False): object(), (4, False): object()}   # as if captured (capture() not needed here)
    graphs._snapshot = graphs._state()
    assert [graphs._padded[n] for n in range(1, 5)] == [2, 2, 4, 4]
    assert all(graphs.can_run(_decode_input(runner, n)) for n in (1, 2, 3, 4))
    assert not graphs.can_run(_decode_input(runner, 5))                      # more rows than max_batch
    assert not graphs.can_run(_decode_input(runner, 3, max_seqlen_q=2))      # a prefill chunk
    inp = _decode_input(runner, 2)
    inp.latents, inp.latent_index = torch.zeros(1, runner.model.hidden_size), torch.tensor([0, -1])
    assert graphs.can_run(inp)                                               # embedding rows ride along
    inp = _decode_input(runner, 2, block_tables=torch.zeros(2, width + 1, dtype=torch.int64))
    assert not graphs.can_run(inp)                                           # a wider block table
    assert not graphs.can_run(_decode_input(runner, 2, adapter_ids=torch.tensor([-1, 0])))  # no adapter variant

    assert default_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32] and default_batch_sizes(5) == [1, 2, 4, 5]


def test_build_decode_graphs_is_none_where_eager(qwen2_dir):
    from memgen.layers.backend import TorchBackend, TritonBackend

    llm = LLM(qwen2_dir, dtype="float32", attention_backend="triton")
    runner = llm.engine.model_runner
    assert build_decode_graphs(runner, EngineConfig(enforce_eager=False)) is None    # CPU
    cuda = types.SimpleNamespace(device=torch.device("cuda"), attn_backend=TritonBackend())
    assert build_decode_graphs(cuda, EngineConfig(enforce_eager=True)) is None       # asked for eager
    cuda.attn_backend = TorchBackend()
    assert build_decode_graphs(cuda, EngineConfig(enforce_eager=False)) is None      # host-syncing backend


def test_a_failed_capture_warns_and_runs_eagerly(monkeypatch):
    """On a GPU a capture problem costs speed, never the run: a warning, then eager steps."""
    from types import SimpleNamespace

    from memgen.config import EngineConfig
    from memgen.engine import cuda_graph

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def capture(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "DecodeGraphs", Failing)
    monkeypatch.setattr(cuda_graph, "max_blocks_per_seq", lambda runner: 4)
    runner = SimpleNamespace(device=torch.device("cuda"), attn_backend=SimpleNamespace(graph_safe=True))
    with pytest.warns(RuntimeWarning, match="capture failed.*eagerly"):
        assert cuda_graph.build_decode_graphs(runner, EngineConfig(enforce_eager=False)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU (bench/gpu.sh runs this)")
def test_real_cuda_graphs_give_the_eager_tokens(memgen_reasoner_dir, memgen_active_ckpt_dir):
    """On a GPU: graphs are captured by default, replayed for decode steps, and the
    greedy tokens and augmentation masks equal eager mode's (float32, Triton)."""
    from test_triton_backend import _outputs as outputs_with_logprobs, assert_same_outputs

    prompts = ["What is 12 plus 30?", "Hello", "The quick brown fox"]
    kwargs = dict(model=memgen_reasoner_dir, dtype="float32", device="cuda", attention_backend="triton")
    for memgen in (None, memgen_active_ckpt_dir):
        eager = outputs_with_logprobs(LLM(**kwargs, memgen=memgen, enforce_eager=True), prompts)
        llm = LLM(**kwargs, memgen=memgen)
        graphs = llm.engine.model_runner.decode_graphs
        assert graphs is not None
        assert_same_outputs(outputs_with_logprobs(llm, prompts), eager)
        assert graphs.num_replays > 0


def test_memgen_following_streams_replay_weaver_rows(memgen_reasoner_dir, memgen_active_ckpt_dir):
    """With W and T following R (the CUDA default), MemGen's decode steps carry weaver rows,
    whose input is an embedding (latents buffer): they replay graphs too, with eager's
    tokens and masks."""
    kwargs = dict(memgen=memgen_active_ckpt_dir, dtype="float32", attention_backend="triton",
                  enable_prefix_caching=False, max_num_seqs=4, lazy_memgen_streams=False)
    llm = LLM(memgen_reasoner_dir, **kwargs)
    prompts = ["Hello. Then, go", "A, b. c"]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = [(o.token_ids, o.augmentation) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert any(1 in aug for _, aug in want)

    runner = llm.engine.model_runner
    graphs = DecodeGraphs(runner, 8, max_blocks_per_seq(runner), graph_factory=RecordingGraph, batch_sizes=[8])
    graphs.capture()
    with_latents = []
    run = graphs.run

    def spy(inp):
        with_latents.append(inp.latents is not None)
        return run(inp)

    graphs.run = spy
    runner.decode_graphs = graphs
    got = [(o.token_ids, o.augmentation) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert with_latents and all(with_latents)      # every decode step carried weaver rows, and replayed

"""The engine loop: requests in, one batched forward per step, sampled tokens
out. `step()` = schedule -> forward (one per pool) -> mark computed -> the
latent runtime picks the rows that are due -> sample -> append / stop / free. A plain
LLM and MemGen differ only in their requests' LatentPolicy (engine/policy.py runs them)."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memgen.config import EngineConfig
from memgen.engine.block_manager import BlockManager
from memgen.engine.cuda_graph import build_decode_graphs
from memgen.engine.extra_streams import StreamBinder, StreamModel
from memgen.engine.extra_streams import BASE_POOL, SCRATCH_SLACK_BLOCKS, Pool
from memgen.engine.model_runner import ModelRunner
from memgen.engine.policy import LatentRuntime, StepHidden
from memgen.engine.scheduler import Scheduler
from memgen.engine.sequence import Sequence
from memgen.layers.backend import select_backend
from memgen.layers.sampler import Sampler, SamplingBatch
from memgen.latent_policy import LatentPolicy
from memgen.outputs import NOT_CONSULTED, EngineOutput
from memgen.sampling_params import SamplingParams

DEFAULT_CPU_KV_BUDGET_GB = 1.0
DEFAULT_GPU_KV_FRACTION = 0.8     # of the free memory after loading the weights


class LLMEngine:
    def __init__(self, model_dir: Path, hf_config, config: EngineConfig, dtype: torch.dtype,
                 device: torch.device, eos_token_ids: frozenset[int], default_policy=None,
                 detokenize=None, stream_models: list[StreamModel] | None = None):
        """`default_policy`: None, or a factory (base runner, stream binder) -> (policy_for, its
        extra pools, its streams per sequence in the base pool), where `policy_for(params)` is the
        LatentPolicy of a request that carries none: LLM(memgen=...) passes MemGen's
        (memgen_setup.py), which picks a request's checkpoint."""
        self.config, self.dtype, self.device = config, dtype, device
        self.detokenize = detokenize    # token ids -> text, for stop strings (LLM passes its tokenizer's)
        self.max_model_len = config.max_model_len
        self.eos_token_ids = eos_token_ids
        backend = select_backend(config.attention_backend, device, dtype)
        self.model_runner = ModelRunner(model_dir, hf_config, dtype, device, self.max_model_len, config.block_size,
                                        attn_backend=backend)
        # one pool (model + KV cache + block manager) per distinct checkpoint, addressed by its
        # index (self.pools[i].index == i); the reasoner's is pool 0
        base = Pool(BASE_POOL, 0, self.model_runner)
        self.pools = [base]
        self.policy_for: Callable[[SamplingParams], LatentPolicy] | None = None
        self.stream_binder = StreamBinder(self.model_runner, dtype, device)   # where policies' streams run
        if default_policy is not None:
            self.policy_for, pools, base.num_streams = default_policy(self.model_runner, self.stream_binder)
            self.pools += pools
        if stream_models:   # models a user's StreamSpec(model=name) runs on: each its own pool
            self.pools += self.stream_binder.open_models(stream_models, len(self.pools), self.max_model_len,
                                                         config.block_size)
        self.runtime = LatentRuntime(self.model_runner, self.max_model_len, self.stream_binder)
        assert [pool.index for pool in self.pools] == list(range(len(self.pools))), "pools are numbered in order"
        for pool in self.pools:
            num_blocks = self._num_kv_blocks(pool.runner, pool.num_streams)
            pool.runner.allocate_kv_cache(num_blocks)
            # CUDA graphs for decode steps (None where they do not apply), one row per stream in the pool
            pool.runner.decode_graphs = build_decode_graphs(pool.runner, config, pool.num_streams)
            pool.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.block_manager = base.block_manager     # the reasoner's
        self.scheduler = Scheduler([pool.block_manager for pool in self.pools], config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.sampler = Sampler()
        self._num_requests = 0
        self._requests: dict[int, Sequence] = {}    # request id -> its sequence, until its last output
        # memgen.structured.backend.StructuredOutputs, set by LLM on first use (None: no request
        # ever carried structured_outputs); it masks constrained rows at sampled positions only
        self.structured = None

    def _num_kv_blocks(self, runner: ModelRunner, num_streams: int) -> int:
        """KV blocks for one pool; `num_streams` streams per sequence live in it."""
        cfg = self.config
        per_block = runner.kv_bytes_per_block
        slack = SCRATCH_SLACK_BLOCKS if num_streams > 1 else 0
        one_seq = num_streams * (-(-self.max_model_len // cfg.block_size) + slack)
        if cfg.num_kv_blocks is not None:
            num_blocks, source = cfg.num_kv_blocks, f"num_kv_blocks={cfg.num_kv_blocks}"
        elif cfg.kv_cache_memory_gb is not None:
            num_blocks = int(cfg.kv_cache_memory_gb * 2**30) // per_block
            source = f"kv_cache_memory_gb={cfg.kv_cache_memory_gb}"
        else:
            if self.device.type == "cuda":
                budget = torch.cuda.mem_get_info(self.device)[0] * DEFAULT_GPU_KV_FRACTION
            else:
                budget = DEFAULT_CPU_KV_BUDGET_GB * 2**30
            num_blocks = min(cfg.max_num_seqs * one_seq, max(one_seq, int(budget) // per_block))
            source = "the default KV budget"
        if num_blocks < one_seq:
            raise ValueError(
                f"the KV cache from {source} holds {num_blocks} blocks of {cfg.block_size} tokens, fewer than "
                f"one sequence of max_model_len={self.max_model_len} needs ({one_seq}"
                f"{f' for {num_streams} streams' if num_streams > 1 else ''}): raise num_kv_blocks / "
                "kv_cache_memory_gb or lower max_model_len")
        return num_blocks

    # ---- requests -------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Queue a validated request (LLM.generate validates the whole batch first); returns
        its id, which the outputs of step() and abort() carry."""
        if params.latent_policy is not None and self.policy_for is not None:
            raise ValueError("a request runs one latent policy, and this engine runs its default one on every request")
        index = self._num_requests
        self._num_requests += 1
        generator = torch.Generator(device=self.device)
        seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + index
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        stop = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        template = params.latent_policy
        if template is not None:    # the runtime holds the policy; the sequence keeps plain data only
            params = copy.copy(params)
            params.latent_policy = None
        elif self.policy_for is not None:
            template = self.policy_for(params)
        seq = Sequence(prompt_token_ids, params, generator, stop, request_index=index)
        if params.structured_outputs is not None:
            self.structured.add(seq)    # its grammar matcher (seq.grammar)
        self.runtime.start(seq, template)      # a LatentPolicy's extra streams are added here
        self.scheduler.add(seq)
        self._requests[index] = seq
        return index

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def cap_running(self, max_num_seqs: int) -> None:
        """Run at most this many sequences at once from now on (the KV cache stays as sized)."""
        self.scheduler.max_num_seqs = max_num_seqs

    def stats(self) -> dict:
        """Sequences running and waiting, preemptions so far, KV blocks per pool (used, total)."""
        sched = self.scheduler
        return {"running": sched.core.num_running, "waiting": len(sched.waiting), "preemptions": sched.num_preemptions,
                "kv_blocks": {pool.name: (bm.num_blocks - bm.num_free_blocks, bm.num_blocks)
                              for pool, bm in ((pool, pool.block_manager) for pool in self.pools)}}

    # ---- one step -------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Run one batched forward (in the order the module docstring gives). Returns what
        happened, as data: one EngineOutput per request that changed (its new token; why it ended)."""
        self.runtime.before_schedule()     # new requests' policies start (on_start) here
        out = self.scheduler.schedule()
        if not out.num_chunks:
            if out.preempted:
                return []
            raise RuntimeError("the scheduler found nothing to run although requests are waiting "
                               f"({len(self.scheduler.waiting)} waiting): the KV cache is too small")
        hidden = self._forward(out)
        self.scheduler.postprocess(out)
        seqs, due_hidden, ended = self.runtime.after_forward(out.chunks, hidden)
        for seq in ended:
            self._finish(seq, "length")
        if not seqs:
            return self._outputs(ended, seqs)
        logits = self.model_runner.compute_logits(due_hidden)
        structured = self.structured
        if structured is not None:
            logits = structured.mask(seqs, logits)     # constrained rows only
        sampled = self.sampler(logits, _sampling_batch(seqs))
        if structured is not None:
            structured.accept(seqs, sampled.token_ids)
        for seq, token, lp in zip(seqs, sampled.token_ids, sampled.logprobs):
            seq.append_token(token, lp)
            if token in seq.stop_token_ids or self._hit_stop_string(seq) or \
                    (structured is not None and structured.done(seq)):
                self._finish(seq, "stop")
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.reasoner.num_tokens >= self.max_model_len:
                self._finish(seq, "length")
        self.runtime.after_sample(seqs, sampled.token_ids)
        for seq in self.runtime.ended():
            self._finish(seq, "length")
        return self._outputs(ended, seqs)

    def _outputs(self, ended: list[Sequence], sampled: list[Sequence]) -> list[EngineOutput]:
        """The step's news: the requests that ended before sampling, then those that sampled."""
        return [self._output(seq, False) for seq in ended] + [self._output(seq, True) for seq in sampled]

    def _output(self, seq: Sequence, sampled: bool) -> EngineOutput:
        n, latent = seq.num_output_tokens, seq.latent
        new = slice(n - 1, n) if sampled else slice(0)
        mask = None if latent is None else latent.augmentation(new)    # MemGen's: its policy's record
        out = EngineOutput(seq.request_index, seq.output_token_ids[new],
                           seq.output_logprobs[new] if seq.params.logprobs is not None else None,
                           mask if mask is not None else [NOT_CONSULTED] * sampled)
        if seq.finish_reason is not None:     # its last output: why it ended, its metrics and record
            self._requests.pop(seq.request_index, None)
            out.finish_reason, out.metrics = seq.finish_reason, _metrics(seq)
            out.policy_record = None if seq.latent is None else seq.latent.record
        return out

    def _forward(self, out) -> StepHidden:
        """One forward per pool (one in all when W and T share the reasoner's base)."""
        pool_of_chunk = out.core.pool_indices()
        hidden = StepHidden(len(pool_of_chunk))
        for pool in self.pools:
            indices = [i for i, p in enumerate(pool_of_chunk) if p == pool.index]
            if indices:
                inp = pool.runner.prepare(out.core, pool.index)
                hidden.add_pool(pool.runner.forward(inp), indices, (inp.last_rows + 1).tolist())  # host: no sync
        return hidden

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Does the output's text contain one of the request's stop strings (once
        min_tokens are out)? LLM cuts the text before it."""
        stops = seq.params.stop
        if not stops or seq.num_output_tokens < seq.params.min_tokens or self.detokenize is None:
            return False
        text = self.detokenize(seq.output_token_ids)
        return any(stop in text for stop in stops)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """The one way a request ends (abort aside)."""
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq, reason)
        self.runtime.finished(seq)

    def abort(self, request_ids: list[int]) -> list[EngineOutput]:
        """Drop requests (a generate() call that raised, a client gone): their blocks go back
        to the pools and the engine serves the next call as a fresh one would. Returns the
        last output of each one not yet reported ("abort" unless it had finished)."""
        seqs = [seq for seq in map(self._requests.get, request_ids) if seq is not None]
        self.scheduler.abort(seqs)
        for seq in seqs:
            self.runtime.finished(seq)
        self.runtime.close_finished()
        return [self._output(seq, False) for seq in seqs]


def _metrics(seq: Sequence) -> dict:
    """A request's final metrics (RequestOutput.metrics); times are None where it never got there."""
    latent, n = seq.latent, seq.num_output_tokens
    mask = None if latent is None else latent.augmentation(slice(n))
    return {"time_to_first_token_s": None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
            "total_s": None if seq.finish_time is None else seq.finish_time - seq.arrival_time,
            "num_insertions": 0 if mask is None else mask.count(1), "num_trigger_calls": 0,
            "num_latent_positions": 0 if latent is None else latent.num_inserted,
            **({} if latent is None else {"num_fed_tokens": latent.num_fed}),
            "num_cached_prompt_tokens": seq.num_cached_prompt_tokens, "num_preemptions": seq.num_preemptions,
            **({} if latent is None else latent.metrics())}     # the policy's own (MemGen: num_trigger_calls)


def _sampling_batch(seqs: list[Sequence]) -> SamplingBatch:
    """The due rows' settings from each request's `sampling` (made once, when it joined);
    penalties and bans only when a row has them."""
    *settings, penalties, min_tokens = map(list, zip(*[s.sampling for s in seqs]))
    penalized = any(p is not None for p in penalties)
    return SamplingBatch(
        *settings, penalties=penalties if penalized else None,
        prompt_ids=[s.prompt_token_ids if p else None for s, p in zip(seqs, penalties)] if penalized else None,
        output_ids=[s.output_token_ids if p else None for s, p in zip(seqs, penalties)] if penalized else None,
        # min_tokens: no stop id (EOS included) may be sampled before then
        banned=[s.stop_token_ids if s.num_output_tokens < m else None for s, m in zip(seqs, min_tokens)]
        if any(min_tokens) else None)

"""The public offline API (API.md): `LLM(...).generate(prompts, params)` and
`.chat(messages, params)`. Every request of a call is checked before any
enters the engine; bad input raises ValueError / TypeError saying what would
be right."""
from __future__ import annotations

import numbers
import os
import time
from pathlib import Path

import torch

from memgen.config import EngineConfig, resolve_device, resolve_dtype
from memgen.engine.extra_streams import resolve_stream_models
from memgen.engine.llm_engine import LLMEngine
from memgen.latent_policy import has_room
from memgen.memgen_setup import DEFAULT_MAX_VERSIONS, MemGenCheckpoints, MemGenLoader
from memgen.outputs import OutputBuilder, RequestOutput
from memgen.sampling_params import SamplingParams

DEFAULT_MAX_MODEL_LEN = 4096


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, memgen: str | os.PathLike | dict | None = None,
                 weaver_model: str | os.PathLike | None = None, trigger_model: str | os.PathLike | None = None,
                 dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                 reference_compat: bool = False, stream_models: dict | None = None,
                 max_memgen_versions: int = DEFAULT_MAX_VERSIONS, **engine_options):
        """`memgen`: a MemGen checkpoint (directory or MemGenCheckpoint), or several on the one
        base as {name: checkpoint} (a request picks one with SamplingParams.memgen_checkpoint;
        the first is the default); weaver_model / trigger_model apply to each.
        `max_memgen_versions`: checkpoint versions live at once (loaded ones, and old versions
        still finishing requests after an update or unload)."""
        if memgen is None and (weaver_model is not None or trigger_model is not None):
            raise ValueError("weaver_model and trigger_model apply only to a MemGen checkpoint (memgen=...); "
                             "leave them None for a plain LLM")
        if memgen is not None and stream_models:
            raise ValueError("stream_models are for the streams of your own latent policies, which an "
                             "LLM(memgen=...) does not run (its requests run MemGen's); MemGen's own streams "
                             "take weaver_model / trigger_model")
        unknown = set(engine_options) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"unknown LLM option(s) {sorted(unknown)}; engine options are "
                            f"{sorted(EngineConfig.field_names())}")
        config = EngineConfig(**engine_options)
        config.validate()
        self.reference_compat = bool(reference_compat)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

        # config.json and the tokenizer are read without transformers where that is exact
        # (model_config.py, tokenizer.py): its import is most of the startup of a small model
        from memgen.model_config import load_model_config
        from memgen.sources import resolve_model_dir
        from memgen.tokenizer import load_tokenizer

        self.model_dir = Path(resolve_model_dir(model))
        self.hf_config = load_model_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.vocab_size = int(self.hf_config.vocab_size)
        max_positions = int(getattr(self.hf_config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN))
        if config.max_model_len is None:
            config.max_model_len = min(max_positions, DEFAULT_MAX_MODEL_LEN)
        elif config.max_model_len > max_positions:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                             f"max_position_embeddings={max_positions}; use at most {max_positions}")
        self.config = config
        self._memgen_loader = MemGenLoader(self.model_dir, self.hf_config, self.dtype, self.reference_compat,
                                           weaver_model, trigger_model)
        sources = None if memgen is None else self._memgen_loader.sources(memgen)
        if sources is not None:
            if self.tokenizer.pad_token is None:  # the reference's fallback (spec §1.1)
                self.tokenizer.pad_token = self.tokenizer.eos_token
            from memgen.memory.chat_template import MEMGEN_CHAT_TEMPLATE
            self.tokenizer.chat_template = MEMGEN_CHAT_TEMPLATE   # MemGen's ChatML variant
        # models a StreamSpec(model=name) runs on, checked before anything loads
        models = None if stream_models is None else resolve_stream_models(
            stream_models, self.model_dir, self.hf_config, config.max_model_len)
        # MemGen's checkpoints are the engine's policy factory (memgen_setup.py); W and T are lazy,
        # or follow R (the CUDA default)
        lazy = config.lazy_memgen_streams if config.lazy_memgen_streams is not None else self.device.type != "cuda"
        self.memgen = None if sources is None else MemGenCheckpoints(
            sources, self.tokenizer, self.dtype, self.device, config.max_model_len, config.block_size,
            follow=not lazy, max_versions=_positive_int("max_memgen_versions", max_memgen_versions))
        self.engine = LLMEngine(self.model_dir, self.hf_config, config, self.dtype, self.device,
                                _eos_token_ids(self.tokenizer, self.hf_config),
                                default_policy=None if self.memgen is None else self.memgen.factory(),
                                detokenize=self._detokenize, stream_models=models)
        # one builder for every call: a generate() while a stream() is suspended steps both
        self._builder = OutputBuilder(self.tokenizer)

    # ---- several checkpoints, changed live (between steps, on the engine's thread) ------------
    def _memgen_or_raise(self) -> MemGenCheckpoints:
        if self.memgen is None:
            raise ValueError("this LLM runs a plain model: build it with LLM(..., memgen=...) to use MemGen "
                             "checkpoints")
        return self.memgen

    def load_memgen(self, name: str, checkpoint) -> int:
        """Load another MemGen checkpoint (directory or MemGenCheckpoint) on this base under
        `name`, without a restart; returns its version. Its weaver/trigger must run on a model
        this LLM holds. Nothing changes when it fails (a corrupt directory, another base)."""
        memgen = self._memgen_or_raise()
        source = self._memgen_loader.source(checkpoint, name)
        return memgen.load(name, source, self.engine.runtime.templates_in_use())

    def update_memgen(self, name: str, checkpoint) -> int:
        """New weights (directory or MemGenCheckpoint) for checkpoint `name`; returns its new
        version. Requests already running on the old version finish on it; new ones take the new."""
        memgen = self._memgen_or_raise()
        memgen.get(name)
        source = self._memgen_loader.source(checkpoint, name)
        return memgen.update(name, source, self.engine.runtime.templates_in_use())

    def unload_memgen(self, name: str) -> None:
        """Unload checkpoint `name` (its running requests finish first; new ones may not pick it)."""
        self._memgen_or_raise().unload(name, self.engine.runtime.templates_in_use())

    def memgen_checkpoints(self) -> dict[str, int]:
        """The loaded MemGen checkpoints, name -> version (the first is the default)."""
        return {} if self.memgen is None else self.memgen.versions()

    def update_memgen_weights(self, ckpt) -> None:
        """Live weight sync of the default checkpoint: push a `memgen.checkpoint.MemGenCheckpoint`
        (e.g. `HFMemGenModel.to_checkpoint()` after a training step) into this engine without
        reloading the base model (`update_memgen(name, ckpt)` for a named one)."""
        from memgen.checkpoint import MemGenCheckpoint

        if not isinstance(ckpt, MemGenCheckpoint):
            raise TypeError(f"expected a MemGenCheckpoint, got {type(ckpt).__name__}")
        self.update_memgen(self._memgen_or_raise().get().name, ckpt)

    @property
    def memgen_version(self) -> int:
        """The default checkpoint's version (0 when loaded; +1 per update)."""
        return self._memgen_or_raise().get().version

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    # ---- public API -----------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: str | list[str] | list[int] | list[list[int]]; strings are raw text."""
        token_lists = [self._to_token_ids(p, i) for i, p in enumerate(_as_prompt_list(prompts))]
        params = self._check_params(sampling_params, len(token_lists))
        for i, (ids, sp) in enumerate(zip(token_lists, params)):
            self._check_request(ids, sp, i)
        return self._run(token_lists, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, tools: list[dict] | None = None
             ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them,
        rendered with the tokenizer's chat template; `tools`: OpenAI's tool list, rendered
        into the prompt (memgen.structured.tools; parse the output with parse_tool_calls)."""
        conversations = _as_conversation_list(messages)
        token_lists = [self._apply_chat_template(c, add_generation_prompt, tools) for c in conversations]
        return self.generate(token_lists, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt=None, sampling_params: SamplingParams | None = None, messages=None):
        """One completion, token by token: yields the new text as it becomes final
        (an unfinished UTF-8 tail or a stop string's prefix is held back), and
        returns its RequestOutput (the generator's return value). Give `prompt` (str or
        token ids) or `messages` (one conversation, chat template applied).

            gen = llm.stream("Hello", SamplingParams(max_tokens=32))
            for piece in gen: print(piece, end="", flush=True)
        """
        from memgen.detokenizer import IncrementalText

        if (prompt is None) == (messages is None):
            raise ValueError("stream() takes a prompt or messages (one conversation), not both or neither")
        ids = (self._apply_chat_template(_as_conversation_list(messages)[0], True) if messages is not None
               else self._to_token_ids(prompt, 0))
        (params,) = self._check_params(sampling_params, 1)
        if params.n != 1:
            raise ValueError(f"stream() makes one completion; got n={params.n} (use generate() for n > 1)")
        self._check_request(ids, params, 0)
        engine, builder = self.engine, self._builder
        rid = builder.add(engine.add_request(ids, params), ids, params)
        text = IncrementalText(self._detokenize, params.stop)
        try:
            while not builder.finished(rid):
                builder.update(engine.step())
                piece = text.update(builder.token_ids(rid))
                if piece:
                    yield piece
        except BaseException:   # an error, Ctrl-C, or the caller closing the generator
            builder.update(engine.abort([rid]))
            builder.forget([rid])
            raise
        out = builder.request_output([rid])
        builder.forget([rid])
        rest = text.finish(out.text)
        if rest:
            yield rest
        return out

    # ---- validation -----------------------------------------------------------
    def _to_token_ids(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {index} is an empty string: give at least one character")
            ids = list(self.tokenizer(prompt)["input_ids"])
            if not ids:
                raise ValueError(f"prompt {index} ({prompt!r}) tokenizes to no tokens")
            return ids
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point:
                raise TypeError(f"prompt {index} is a tensor of shape {tuple(prompt.shape)} and dtype {prompt.dtype}; "
                                "token ids must be a 1-D integer tensor or a list of ints")
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError(f"prompt {index} is an empty token list: give at least one token id")
            ids = []
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise TypeError(f"prompt {index} holds {t!r} ({type(t).__name__}); token ids must be ints")
                ids.append(int(t))
            return ids
        raise TypeError(f"prompt {index} is a {type(prompt).__name__}; a prompt must be a str or a list of "
                        "token ids (ints)")

    def _check_params(self, sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * num_prompts
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            if len(params) != num_prompts:
                raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts: "
                                 "pass one SamplingParams, or a list with one per prompt")
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] is a {type(p).__name__}, expected SamplingParams")
        else:
            raise TypeError(f"sampling_params must be a SamplingParams, a list of them, or None; "
                            f"got {type(sampling_params).__name__}")
        for p in {id(p): p for p in params}.values():
            p.validate()
            for t in p.stop_token_ids or ():
                if t >= self.vocab_size:
                    raise ValueError(f"stop token id {t} is outside the vocabulary [0, {self.vocab_size})")
            if p.logprobs is not None and p.logprobs > self.vocab_size:
                raise ValueError(f"logprobs={p.logprobs} exceeds the vocabulary size {self.vocab_size}")
            if p.structured_outputs is not None:   # compiled (and cached) now, off the engine's step
                self.structured_outputs().compile(p.structured_outputs)
        return params

    def structured_outputs(self):
        """This LLM's memgen.structured.backend.StructuredOutputs (made on first use;
        the engine masks the rows of constrained requests with it)."""
        if self.engine.structured is None:
            from memgen.structured.backend import StructuredOutputs

            self.engine.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.engine.eos_token_ids)
        return self.engine.structured

    def _check_request(self, ids: list[int], params: SamplingParams, index: int) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {index} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, longer than max_model_len={self.max_model_len}; "
                             "shorten it or raise max_model_len")
        if params.latent_policy is not None:
            if self.memgen is not None:
                raise ValueError(f"request {index}: SamplingParams.latent_policy cannot be combined with a MemGen "
                                 "checkpoint: a request runs one latent policy, and on an LLM(memgen=...) that is "
                                 "MemGen's; load the model without memgen=... to use your own")
            self.engine.runtime.bind_streams(params.latent_policy)   # e.g. a stream on an undeclared model
        if params.memgen_checkpoint is not None and self.memgen is None:
            raise ValueError(f"request {index} asks for MemGen checkpoint {params.memgen_checkpoint!r}, but this LLM "
                             "runs a plain model (no memgen=...)")
        k = 0
        if self.memgen is not None:
            try:
                k = self.memgen.get(params.memgen_checkpoint).source.ckpt.settings.prompt_latents_len
            except ValueError as err:
                raise ValueError(f"request {index}: {err}") from None
        if k and not has_room(len(ids), k, self.max_model_len):   # the room rule, for the prompt latents
            raise ValueError(f"prompt {index} has {len(ids)} tokens: with MemGen's {k} prompt latents and the first "
                             f"token it needs {len(ids) + k + 1} positions, more than max_model_len="
                             f"{self.max_model_len}; shorten it or raise max_model_len")

    def _apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool,
                             tools: list[dict] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model_dir} has no chat template; use generate() with raw text")
        extra = {}
        if tools is not None or any(m.get("tool_calls") for m in conversation):
            # tools and tool calls: natively where the template takes them, else folded into turns
            from memgen.structured.tools import check_messages, check_tools, prepare_conversation

            check_messages(conversation)
            conversation, tools = prepare_conversation(self.tokenizer.chat_template, conversation,
                                                       None if tools is None else check_tools(tools))
            extra = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **extra)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- the run --------------------------------------------------------------
    def _run(self, token_lists: list[list[int]], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine, builder = self.engine, self._builder
        # n completions per prompt are n engine requests (they share the prompt's cached blocks)
        groups = [[builder.add(engine.add_request(ids, p.for_completion(i)), ids, p, i) for i in range(p.n)]
                  for ids, p in zip(token_lists, params)]
        flat = [rid for group in groups for rid in group]
        pending = set(flat)     # a suspended stream()'s request also steps here; its outputs wait in the builder
        bar = tqdm(total=len(flat), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        start, num_tokens, last_update = time.perf_counter(), 0, 0.0
        try:
            while pending:
                outputs = engine.step()
                builder.update(outputs)
                num_tokens += sum(len(o.new_token_ids) for o in outputs)
                finished = pending & {o.request_id for o in outputs if o.finished}
                pending -= finished
                now = time.perf_counter()
                if finished or now - last_update > 0.5:
                    bar.set_postfix_str(f"{num_tokens / max(now - start, 1e-9):.1f} tok/s", refresh=False)
                    bar.update(len(finished))
                    last_update = now
        except BaseException:
            # an error or Ctrl-C mid-call: nothing of this call stays in the engine
            engine.abort(flat)
            builder.forget(flat)
            raise
        finally:
            bar.close()
        results = [builder.request_output(group) for group in groups]
        builder.forget(flat)
        return results

    def _detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [prompts] if prompts.dim() == 1 else list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str, a list of str, a list of token ids or a list of such lists; "
                        f"got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass a string, a list of token ids, or a non-empty list of them")
    if all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in prompts):
        return [list(prompts)]            # one prompt given as token ids
    if any(isinstance(p, numbers.Integral) for p in prompts):
        raise TypeError("prompts mixes token ids with other items: pass a list of ints (one prompt) "
                        "or a list of prompts")
    return list(prompts)


def _as_conversation_list(messages) -> list[list[dict]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise (TypeError if not isinstance(messages, (list, tuple)) else ValueError)(
            "messages must be a non-empty conversation (a list of {'role': ..., 'content': ...} dicts) "
            "or a non-empty list of conversations")
    conversations = [list(messages)] if isinstance(messages[0], dict) else list(messages)
    for i, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)):
            raise TypeError(f"conversation {i} is a {type(conv).__name__}; expected a list of message dicts")
        if not conv:
            raise ValueError(f"conversation {i} is empty: give at least one message")
        for j, m in enumerate(conv):
            if not isinstance(m, dict):
                raise TypeError(f"conversation {i}, message {j} is a {type(m).__name__}; expected a dict "
                                "with 'role' and 'content'")
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"conversation {i}, message {j} needs string 'role' and 'content' fields, "
                                 f"got keys {sorted(m)}")
    return conversations


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _eos_token_ids(tokenizer, hf_config) -> frozenset[int]:
    """The tokenizer's eos id (the config's when the tokenizer has none)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    return frozenset(() if eos is None else eos if isinstance(eos, (list, tuple)) else [eos])

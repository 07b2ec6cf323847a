"""Ray Data's own LLM path, pointed at `memgen serve`: for data that already lives in
a Ray Dataset (parquet on S3, a pipeline with other stages) and for replicas that are
already serving (`memgen serve --replicas N` behind vllm-router), Ray Data's
`HttpRequestProcessorConfig` sends each row to the OpenAI routes and this module
turns rows into requests and responses into memgen's fields:

    import ray
    from memgen.eval.ray_data import memgen_http_processor

    processor = memgen_http_processor("http://127.0.0.1:8000", model="memgen", max_tokens=256)
    ds = processor(ray.data.read_json("prompts.jsonl"))      # rows with "prompt" or "messages"
    ds.write_json("out/")        # + text, token_ids, augmentation, finish_reason, usage per row

Greedy requests give what `LLM.generate` / `LLM.chat` give offline (the server's
greedy outputs equal offline generation). It does not score, resume or record
settings: `memgen eval --ray` does (docs/distributed.md says which to use when).
"""
from __future__ import annotations

from typing import Any, Callable


def _plain(value: Any) -> Any:
    """Ray Data hands nested columns back as numpy arrays; JSON wants lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def request_body(row: dict[str, Any], model: str, chat: bool, sampling: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI request for one row: `messages` (a chat), or `prompt` (raw text on
    /v1/completions; one user message on /v1/chat/completions when `chat`)."""
    body: dict[str, Any] = {"model": model, **sampling, "return_token_ids": True}
    if chat:
        messages = row.get("messages")
        if messages is None:
            messages = [{"role": "user", "content": row["prompt"]}]
        body["messages"] = _plain(messages)
    else:
        if "prompt" not in row:
            raise ValueError("a row without 'prompt' needs chat=True (its 'messages' go to /v1/chat/completions)")
        body["prompt"] = row["prompt"]
    return body


def response_fields(response: dict[str, Any]) -> dict[str, Any]:
    """memgen's output fields from one OpenAI response (choice 0)."""
    response = _plain(response)
    if "choices" not in response:
        raise RuntimeError(f"memgen serve answered with an error: {response.get('error', response)}")
    choice = response["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    token_ids = choice.get("token_ids")
    if token_ids is None and "message" in choice:
        token_ids = choice["message"].get("token_ids")
    return {"text": text, "token_ids": token_ids, "augmentation": choice.get("augmentation"),
            "finish_reason": choice.get("finish_reason"), "usage": response.get("usage")}


def memgen_http_processor(base_url: str, model: str, *, chat: bool = False, max_tokens: int = 256,
                          temperature: float = 0.0, seed: int | None = None, batch_size: int = 16,
                          concurrency: int = 1, max_retries: int = 3, qps: int | None = None,
                          extra_body: dict[str, Any] | None = None, keep_columns: bool = True,
                          stage_num_cpus: float | None = None) -> Callable:
    """A Ray Data processor (`processor(ds) -> ds`) that sends each row to
    `base_url` (a `memgen serve` or the router in front of its replicas): raw prompts
    to /v1/completions, or with `chat` messages to /v1/chat/completions. `max_retries`:
    a request refused (429/502/503/504) or cut (connection error) is sent again, after
    1, 2, 4 ... s, which rides over a replica's drain or death behind the router.
    `stage_num_cpus`: CPUs each Ray Data stage reserves (default Ray's)."""
    try:
        from ray.data.llm import HttpRequestProcessorConfig, build_processor
    except ImportError as e:
        raise ImportError(f'Ray Data LLM is missing ({e}); install it with: pip install "memgen-engine[ray]"') from None

    route = "/v1/chat/completions" if chat else "/v1/completions"
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, **(extra_body or {})}
    if seed is not None:
        sampling["seed"] = seed
    config = HttpRequestProcessorConfig(url=base_url.rstrip("/") + route, batch_size=batch_size,
                                        concurrency=concurrency, max_retries=max_retries, qps=qps,
                                        **({"http_request_stage": {"num_cpus": stage_num_cpus}}
                                           if stage_num_cpus is not None else {}))

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "payload": request_body(row, model, chat, sampling)}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: _plain(v) for k, v in row.items() if k not in ("payload", "http_response")} if keep_columns else {}
        return {**out, **response_fields(row["http_response"])}

    map_kwargs = {"num_cpus": stage_num_cpus} if stage_num_cpus is not None else None
    return build_processor(config, preprocess=preprocess, postprocess=postprocess,
                           preprocess_map_kwargs=map_kwargs, postprocess_map_kwargs=map_kwargs)

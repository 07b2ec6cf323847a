"""`memgen serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one
`LLM`, for agents that talk to models over the OpenAI API.

One job per module:
- `command`: the CLI's options and runner (light: imports nothing heavy);
- `app`: the FastAPI app and its routes;
- `schemas`: the request and response bodies (pydantic, OpenAI's shapes plus
  MemGen's fields);
- `protocol`: an API request -> validated prompts and SamplingParams (through
  the `LLM`'s own checks, so bad input gets the offline API's messages);
- `responses`: engine outputs -> OpenAI responses and stream chunks;
- streaming text comes from `memgen.detokenizer` (shared with `LLM.stream`);
- `engine_loop`: the one background thread that steps the engine for every
  connection (continuous batching, aborts, per-request queues);
- `metrics`: Prometheus metrics;
- `errors`: OpenAI's error schema.

Needs the `serve` extra: `pip install 'memgen-engine[serve]'`.
"""

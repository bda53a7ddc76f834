"""`olmoe serve` (olmoe.cli.serve): an OpenAI-compatible HTTP server (needs the `serve` extra: FastAPI, uvicorn).

engine.py    the continuous-batching scheduler: one thread decodes all running sequences
slots.py     the KV cache whose rows hold sequences of different lengths
prefixes.py  recent prompts' keys and values, for prompts that begin the same (evaluation)
protocol.py  OpenAI's request bodies (pydantic), error body and response shapes
limits.py    what one request may ask for (the --max-* and --request-timeout flags)
app.py       the FastAPI routes, server-sent events, errors, the OpenAPI schema
metrics.py   /metrics in Prometheus text format
"""

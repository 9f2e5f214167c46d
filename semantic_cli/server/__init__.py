"""`semantic serve`: one resident engine for every invocation and every OpenAI client.

How a request reaches the engine:

    client --HTTP--> uvicorn (asyncio loop) --> app.py (checks, a Job) --queue--> worker.py
    (the engine thread: lock, prepare, Batch.add, step, record, cache) --emit--> the job's
    asyncio queue --> the response (JSON, SSE or the CLI's NDJSON stream)

Modules: `runtime` (lock, discovery file, sockets), `worker` (the engine loop), `app`
(routes, limits, errors), `openai_api` (request models and response shapes), `wire` (the
CLI's event stream), `client` (the CLI's side), `serve` (start and stop).
"""

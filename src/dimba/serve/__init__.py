"""`dimba serve`: an HTTP API (an OpenAI-compatible completions subset plus dimba's sampler fields) and a live web
page of the denoising, over a dynamically batching engine. Needs ``pip install 'dimba[serve]'`` (FastAPI, uvicorn).

`dimba.serve.server.run_server` is what the CLI runs; `dimba.serve.app.create_app` builds the app around a
`dimba.serve.engine.Engine` (for embedding the server in another program or testing it).
"""

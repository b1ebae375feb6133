"""The web server: `batcher` (continuous-batching decode loop), `schema` (the API's models and limits), `app` (FastAPI
routes and the chat page `ui.html`). `python serve.py --config=...` wires them to a checkpoint."""

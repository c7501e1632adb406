"""`recipe serve`: an OpenAI-compatible server whose facts are edited live, durably and auditably.

- store.py     the durable edit store (journal + snapshots in one folder)
- facts.py     the editor's edits kept in step with the store (supersede, update, replay)
- engine.py    the worker thread: edits serialised, generations batched, audits per answer
- schemas.py   request bodies in OpenAI's shapes, every size bounded
- security.py  bearer tokens and the body-size limit
- streaming.py server-sent events for ``stream: true``
- app.py       the FastAPI app
- commands.py  `recipe serve`, `recipe edit`, `recipe generate`
"""

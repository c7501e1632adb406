"""The FastAPI app: OpenAI's completion, chat and model endpoints plus the edits API.

Every choice carries ``edit``: the stored edit that shaped it (``edit_id``, ``score``, ``threshold``),
or ``edit_id: null`` when the model answered untouched, so that any answer can be audited.
Errors come in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Query as Param, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from recipe.errors import RecipeError
from recipe.serve.engine import BusyError, Engine, Query, Sampling, render_chat
from recipe.serve.facts import ConflictError, Fact, UnknownEditError
from recipe.serve.schemas import MAX_BODY_BYTES, ChatRequest, CompletionRequest, EditIn, EditsIn
from recipe.serve.security import BodyLimit, require_admin, require_api_key
from recipe.serve.streaming import stream_events


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message (and the first bad field) from pydantic's errors: union branches folded."""
    if any(e["type"] == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    seen: dict[str, str] = {}
    for e in errors:
        where = ".".join(str(p) for p in e["loc"][1:] if isinstance(p, int) or str(p).isidentifier())
        seen.setdefault(where or "body", e["msg"])
    message = "; ".join(f"{where}: {msg}" for where, msg in list(seen.items())[:4])
    return message, next(iter(seen))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _describe(exc.errors())
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        kind = detail.get("type", "invalid_request_error" if exc.status_code < 500 else "server_error")
        return _error(exc.status_code, detail["message"], kind, detail.get("code"), headers=exc.headers)

    statuses = [(UnknownEditError, 404, "not_found"), (ConflictError, 409, "conflict"),
                (BusyError, 503, "overloaded"), (RecipeError, 400, None)]
    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        return _error(500, f"the server failed: {type(exc).__name__}: {exc}", "server_error")

    for cls, status, code in statuses:
        app.add_exception_handler(cls, lambda request, exc, s=status, c=code: _error(s, str(exc), code=c))


def _sampling(body) -> Sampling:
    return Sampling(body.max_tokens, body.temperature, body.top_p, body.seed, body.stops)


def _check_model(request: Request, model: str) -> None:
    served = request.app.state.model_name
    if model != served:
        raise HTTPException(404, {"message": f"model {model!r} is not served here; this server serves {served!r}",
                                  "code": "model_not_found"})


def _usage(completions) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    done = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _record(r) -> dict:
    return {"object": "edit", **r.to_json()}


async def _on_worker(request: Request, fn):
    return await asyncio.wrap_future(request.app.state.engine.call(fn))


def _completion_routes(app: FastAPI) -> None:
    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models(request: Request):
        return {"object": "list", "data": [{"id": request.app.state.model_name, "object": "model",
                                            "created": request.app.state.started, "owned_by": "recipe"}]}

    @app.post("/v1/completions", dependencies=[Depends(require_api_key)])
    async def completions(body: CompletionRequest, request: Request):
        _check_model(request, body.model)
        queries = [Query(p, p) for p in body.prompts for _ in range(body.n)]
        return await _respond(request, body, queries, "text_completion",
                              lambda c: {"text": c.text, "logprobs": None})

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat(body: ChatRequest, request: Request):
        _check_model(request, body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        lm = request.app.state.engine.lm
        if lm.spec.chat_template and len(messages) == 1:  # the model wraps a lone question itself
            query = Query(body.question, body.question)
        else:
            query = Query(render_chat(lm.tokenizer, messages), body.question, rendered=True)
        return await _respond(request, body, [query] * body.n, "chat.completion",
                              lambda c: {"message": {"role": "assistant", "content": c.text}})


async def _respond(request: Request, body, queries: list[Query], kind: str, fields):
    engine: Engine = request.app.state.engine
    head = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": request.app.state.model_name}
    if body.stream:
        events = stream_events(engine, queries[0], _sampling(body), head, kind,
                               include_usage=bool((body.stream_options or {}).get("include_usage")))
        return StreamingResponse(events, media_type="text/event-stream")
    done = await asyncio.wrap_future(engine.generate(queries, _sampling(body)))
    choices = [{"index": i, **fields(c), "finish_reason": c.finish_reason, "edit": c.audit}
               for i, c in enumerate(done)]
    return {**head, "object": kind, "choices": choices, "usage": _usage(done)}


def _edit_routes(app: FastAPI) -> None:
    admin = [Depends(require_admin)]

    @app.post("/v1/edits", dependencies=admin)
    async def add_edits(body: EditsIn, request: Request):
        facts = [Fact(e.prompt, e.target_new, e.subject) for e in body.root]
        records = await _on_worker(request, lambda: request.app.state.engine.facts.add(facts))
        return {"object": "list", "data": [_record(r) for r in records]}

    @app.get("/v1/edits", dependencies=admin)
    async def list_edits(request: Request, limit: int = Param(100, ge=1, le=1000), after: int = Param(0, ge=0),
                         subject: str | None = Param(None, max_length=1000),
                         text: str | None = Param(None, max_length=1000),
                         status: Literal["active", "superseded"] | None = None):
        found = await _on_worker(request, lambda: request.app.state.engine.facts.find(subject, text, status))
        page = [r for r in found if r.id > after][:limit]
        more = bool(page) and found[-1].id > page[-1].id
        return {"object": "list", "data": [_record(r) for r in page], "total": len(found), "has_more": more,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    @app.get("/v1/edits/{edit_id}", dependencies=admin)
    async def get_edit(edit_id: int, request: Request):
        return _record(await _on_worker(request, lambda: request.app.state.engine.facts.get(edit_id)))

    @app.delete("/v1/edits/{edit_id}", dependencies=admin)
    async def delete_edit(edit_id: int, request: Request):
        await _on_worker(request, lambda: request.app.state.engine.facts.remove(edit_id))
        return {"id": edit_id, "object": "edit", "deleted": True}

    @app.put("/v1/edits/{edit_id}", dependencies=admin)
    async def put_edit(edit_id: int, body: EditIn, request: Request):
        fact = Fact(body.prompt, body.target_new, body.subject)
        return _record(await _on_worker(request, lambda: request.app.state.engine.facts.update(edit_id, fact)))


def create_app(engine: Engine, model_name: str, admin_token: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server's app around a started :class:`Engine`; shutting the app down closes the engine."""
    if not admin_token:
        raise RecipeError("the edits API needs an admin token")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="recipe", summary="An OpenAI-compatible server whose facts are edited live",
                  lifespan=lifespan)
    app.state.engine, app.state.model_name, app.state.started = engine, model_name, int(time.time())
    app.state.admin_token, app.state.api_key = admin_token, api_key
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app)
    _completion_routes(app)
    _edit_routes(app)
    return app

"""``stream: true``: text as it is generated, as OpenAI's server-sent events.

The worker thread generates with a ``TextIteratorStreamer``; the event loop reads it from a pool
thread. Text that could be the start of a stop string is held back until it is known not to be one.
The last chunk carries ``finish_reason`` and ``edit`` (the audit), then ``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

import anyio
from transformers import TextIteratorStreamer

from recipe.serve.engine import Engine, Query, Sampling

log = logging.getLogger(__name__)


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _safe_end(text: str, stops: tuple[str, ...]) -> tuple[int, bool]:
    """How much of ``text`` may be sent, and whether a stop string was reached."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    hold = max((len(s) - 1 for s in stops), default=0)
    return max(0, len(text) - hold), False


def _chunk(head: dict, kind: str, delta: str | None, **extra) -> dict:
    if kind == "chat.completion":
        choice = {"index": 0, "delta": {} if delta is None else {"role": "assistant", "content": delta}}
        return {**head, "object": "chat.completion.chunk", "choices": [{**choice, "finish_reason": None, **extra}]}
    return {**head, "object": "text_completion",
            "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": None, **extra}]}


async def stream_events(engine: Engine, query: Query, sampling: Sampling, head: dict, kind: str,
                        include_usage: bool = False) -> AsyncIterator[str]:
    streamer = TextIteratorStreamer(engine.lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    future = engine.generate([query], sampling, streamer=streamer)
    text, sent, stopped = "", 0, False
    while True:
        piece = await anyio.to_thread.run_sync(next, streamer, None)
        if piece is None:
            break
        text += piece
        end, stopped = _safe_end(text, sampling.stop)
        if end > sent:
            yield _event(_chunk(head, kind, text[sent:end]))
            sent = end
        if stopped:
            break
    try:
        done = (await asyncio.wrap_future(future))[0]
    except Exception as e:  # the response has started: report in the stream
        log.exception("generation failed while streaming")
        yield _event({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        return
    end = len(done.text)
    if end > sent:
        yield _event(_chunk(head, kind, done.text[sent:end]))
    yield _event(_chunk(head, kind, None, finish_reason=done.finish_reason, edit=done.audit))
    if include_usage:
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        yield _event({**head, "object": _chunk(head, kind, None)["object"], "choices": [], "usage": usage})
    yield _event("[DONE]")

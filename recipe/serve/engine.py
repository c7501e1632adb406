"""The engine: one worker thread owns the model and the editor; requests reach it through one queue.

Edits and generations are jobs on the same FIFO queue, so an edit is applied between two
generations, never during one, and every generation admitted after an edit's acknowledgement sees it.
Queued generations with the same sampling settings are run as one batch (up to ``max_batch`` rows).
The event loop only waits on futures: it stays responsive while the model works.

Each row retrieves on its own ``retrieval`` text (a completion's prompt, a chat's last user message)
and is generated from its ``text`` (the prompt, or the chat rendered through the template); the
edit (if any) that shaped it is reported in :attr:`Completion.audit`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from recipe.errors import RecipeError
from recipe.lm import EditedLM
from recipe.serve.facts import Facts

log = logging.getLogger(__name__)


class BusyError(RecipeError):
    """The queue is full: the client should retry later."""


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: greedy when ``temperature`` is 0."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generate_kwargs(self, tokenizer) -> dict:
        kw: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        if self.stop:
            kw.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kw


@dataclass(frozen=True)
class Query:
    """One row: ``text`` goes to the model, ``retrieval`` to the editor's retrieval."""

    text: str
    retrieval: str
    rendered: bool = False  # ``text`` is already in the chat template (not wrapped again)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    audit: dict


@dataclass
class _Generate:
    queries: list[Query]
    sampling: Sampling
    future: Future = field(default_factory=Future)
    streamer: Any = None

    def key(self) -> tuple:
        return (self.sampling, self.queries[0].rendered)

    @property
    def batchable(self) -> bool:
        return self.streamer is None and (self.sampling.seed is None or self.sampling.temperature == 0)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


def render_chat(tokenizer, messages: Sequence[dict]) -> str:
    """The chat through the tokenizer's template (plain ``role: content`` lines when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


class Engine:
    """Serialises edits and batches generations on one worker thread."""

    def __init__(self, lm: EditedLM, facts: Facts, *, max_batch: int = 16, max_queue: int = 1024):
        self.lm, self.facts, self.max_batch, self.max_queue = lm, facts, max_batch, max_queue
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="recipe-engine", daemon=True)
        self._thread.start()

    # ---- submitting --------------------------------------------------------------------------
    def _submit(self, job):
        if self._queue.qsize() >= self.max_queue:
            raise BusyError(f"{self.max_queue} requests are queued; retry later")
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker, between generations (edits, snapshots)."""
        return self._submit(_Call(fn))

    def generate(self, queries: list[Query], sampling: Sampling, streamer=None) -> Future:
        """Future of one :class:`Completion` per query."""
        return self._submit(_Generate(queries, sampling, streamer=streamer))

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker and close the store (a final snapshot)."""
        done = self.call(self.facts.close)
        self._queue.put(None)
        self._thread.join()
        done.result()

    # ---- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        held = None
        while True:
            job = held if held is not None else self._queue.get()
            held = None
            if job is None:
                return
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch, rows = [job], len(job.queries)
            while job.batchable and rows < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if (isinstance(nxt, _Generate) and nxt.batchable and nxt.key() == job.key()
                        and rows + len(nxt.queries) <= self.max_batch):
                    batch.append(nxt)
                    rows += len(nxt.queries)
                else:
                    held = nxt  # keep the queue's order: an edit waits for nothing queued after it
                    break
            self._run_generate(batch)

    @staticmethod
    def _run_call(job: _Call) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as e:  # handed to the waiting request
            job.future.set_exception(e)

    def _run_generate(self, batch: list[_Generate]) -> None:
        queries = [q for job in batch for q in job.queries]
        try:
            completions = self._complete(queries, batch[0].sampling, batch[0].streamer)
        except BaseException as e:
            if len(batch) > 1:  # one bad request fails alone, not the requests batched with it
                for job in batch:
                    self._run_generate([job])
                return
            for job in batch:
                if job.streamer is not None:
                    job.streamer.end()
                job.future.set_exception(e)
            return
        start = 0
        for job in batch:
            job.future.set_result(completions[start:start + len(job.queries)])
            start += len(job.queries)

    # ---- generation --------------------------------------------------------------------------
    def _complete(self, queries: list[Query], sampling: Sampling, streamer) -> list[Completion]:
        provider = self.lm.prefix_provider
        prefixes = provider([q.retrieval for q in queries]) if provider is not None else None
        audits = self._audits(len(queries), provider is not None)
        kw = sampling.generate_kwargs(self.lm.tokenizer)
        if streamer is not None:
            kw["streamer"] = streamer
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with self._raw_prompts() if queries[0].rendered else nullcontext():
            texts = self.lm.generate([q.text for q in queries], max_new_tokens=sampling.max_tokens,
                                     prefixes=prefixes, **kw)
            prompt_tokens = [len(self.lm.prompt_ids(q.text)) for q in queries]
        return [self._finish(text, n, sampling, audit) for text, n, audit in zip(texts, prompt_tokens, audits)]

    def _finish(self, text: str, prompt_tokens: int, sampling: Sampling, audit: dict) -> Completion:
        n = len(self.lm.tokenizer(text, add_special_tokens=False).input_ids)
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            return Completion(text[:cut], "stop", prompt_tokens, n, audit)
        return Completion(text, "length" if n >= sampling.max_tokens else "stop", prompt_tokens, n, audit)

    def _audits(self, n: int, retrieved: bool) -> list[dict]:
        """Which edit shaped each row: the retrieved entry (id, score, threshold) or none."""
        editor = self.facts.editor
        retrievals = getattr(editor, "last_retrieval", None)
        if retrievals is None and editor.name != "none":  # a weight editor: every edit is in the weights
            return [{"edit_id": None, "edits_in_weights": len(self.facts.editor_ids)} for _ in range(n)]
        if not retrieved or retrievals is None or len(retrievals) != n:
            return [{"edit_id": None, "score": None, "threshold": None} for _ in range(n)]
        to_store = self.facts.by_editor_id() if any(r.edit_id is not None for r in retrievals) else {}
        return [{"edit_id": to_store.get(r.edit_id), "score": _finite(r.score), "threshold": _finite(r.threshold)}
                for r in retrievals]

    @contextmanager
    def _raw_prompts(self):
        """Prompts already rendered through the chat template are not wrapped in it again."""
        spec = self.lm.spec
        if not spec.chat_template:
            yield
            return
        self.lm.spec = dataclasses.replace(spec, chat_template=False)
        try:
            yield
        finally:
            self.lm.spec = spec

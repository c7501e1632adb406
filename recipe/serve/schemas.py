"""Request bodies in OpenAI's shapes (plus the edits API), with every size a client controls bounded.

Unknown fields are refused (``extra="forbid"``), so a misspelt parameter is a 400, not silently
ignored. ``temperature`` defaults to 0 (greedy), unlike OpenAI's 1: a served fact should come back
the same way every time.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, model_validator

MAX_PROMPT_CHARS = 8_000  # one prompt or chat message
MAX_PROMPTS = 16  # prompts in one completion request
MAX_MESSAGES = 64
MAX_TOKENS = 512  # max_tokens (the model's context may allow fewer)
MAX_N = 8
MAX_STOP = 4
MAX_EDITS = 256  # facts in one edits request
MAX_STATEMENT_CHARS = 1_000  # prompt + target_new of one fact
MAX_BODY_BYTES = 1 << 20  # the whole request body (checked before parsing)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or blank")
    return text


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_STATEMENT_CHARS), AfterValidator(_not_blank)]
Stop = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    model: str = Field(max_length=256)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = Field(None, max_length=256)

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @model_validator(mode="after")
    def _one_stream(self):
        if self.stream and self.n > 1:
            raise ValueError("stream: true needs n = 1")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt or a list of them."""

    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @model_validator(mode="after")
    def _some(self):
        if not self.prompts:
            raise ValueError("prompt: give at least one prompt")
        if self.stream and len(self.prompts) > 1:
            raise ValueError("stream: true needs a single prompt")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
    name: str | None = Field(None, max_length=64)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: retrieval sees the last user message only."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    @property
    def question(self) -> str:
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    @model_validator(mode="after")
    def _has_question(self):
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].content.strip():
            raise ValueError("messages: the last user message must not be empty")
        return self


class EditIn(_Strict):
    """One fact: after the edit, ``prompt`` continues with ``target_new``."""

    prompt: Text
    target_new: Text
    subject: Text | None = None

    @model_validator(mode="after")
    def _short_statement(self):
        if len(self.prompt) + len(self.target_new) + 1 > MAX_STATEMENT_CHARS:
            raise ValueError(f"prompt + target_new is longer than {MAX_STATEMENT_CHARS} characters")
        return self


class EditsIn(RootModel[Annotated[list[EditIn], Field(min_length=1, max_length=MAX_EDITS)]]):
    """``POST /v1/edits``: one fact or a list of them (all stored, or none)."""

    @model_validator(mode="before")
    @classmethod
    def _one_is_a_list(cls, value):
        return [value] if isinstance(value, dict) else value

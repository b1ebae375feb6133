"""The HTTP API's request and response models (OpenAI's chat-completions schema, the subset jaxchat serves) and limits.

The limits are the reference web server's abuse limits. They live in the pydantic models rather than in handler code so
that FastAPI's OpenAPI document states them exactly, which is what schemathesis fuzzes against. The models are strict:
JSON `"0.5"` is not a number here, so a client's type confusion is a 400 rather than a silent coercion.

Extensions to OpenAI's schema: `top_k` (0 = off), and tool calls inside assistant `content` as the literal markers
`<|python_start|>expr<|python_end|>` and `<|output_start|>result<|output_end|>` (the chat CLI prints the same); the
server streams them that way and turns them back into the special tokens when a conversation comes back.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_CONTENT_PARTS = 100  # a list content is joined into one message; this only bounds the work of reading it


class _Strict(BaseModel):
    # Unknown fields (OpenAI clients send logprobs, presence_penalty, user, ...) are ignored, not errors.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(
        description=f"the message text (1 to {MAX_MESSAGE_CHARS:,} characters) or a list of text parts joined together")
    name: str | None = Field(default=None, max_length=256, description="accepted for compatibility and ignored")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @model_validator(mode="after")
    def _content_size(self):
        if isinstance(self.content, list) and len(self.content) > MAX_CONTENT_PARTS:
            raise ValueError(f"content has {len(self.content)} parts; at most {MAX_CONTENT_PARTS} are allowed")
        n = len(self.text)
        if n == 0:
            raise ValueError("content is empty")
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can spell a lone UTF-16 surrogate ("\ud800"); no tokenizer can
            raise ValueError(f"content has a lone surrogate {self.text[e.start]!r} at character {e.start}, "
                             f"which is not a character") from None
        if n > MAX_MESSAGE_CHARS:
            raise ValueError(f"content has {n:,} characters; at most {MAX_MESSAGE_CHARS:,} are allowed per message")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = Field(default=None, max_length=256, description="ignored: this server serves one model")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy")
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K, description="sample among the k likeliest; 0 = off")
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, description="nucleus sampling; 1 = off")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_MAX_TOKENS, description="wins over max_tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="random by default")
    n: int = Field(default=1, ge=1, le=1, description="only 1 completion per request")
    stop: None = Field(default=None, description="stop sequences are not supported; only null is accepted")

    @field_validator("stop", mode="before")
    @classmethod
    def _no_stop_sequences(cls, value):
        if value is not None:
            raise ValueError("stop sequences are not supported by this server; leave stop out or null")
        return value

    @model_validator(mode="after")
    def _total_size(self):
        total = sum(len(m.text) for m in self.messages)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"the messages hold {total:,} characters in all; at most {MAX_TOTAL_CHARS:,} are allowed")
        return self


# ---- responses (documented for the OpenAPI spec; the handlers build plain dicts of the same shape) -------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "warming_up", "failed"]
    ready: bool


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody

"""The HTTP API's request and response models (OpenAI's chat-completions schema, the subset jaxchat serves) and limits.

The limits are the reference web server's abuse limits. They live in the pydantic models rather than in handler code so
that FastAPI's OpenAPI document states them exactly, which is what schemathesis fuzzes against. The models are strict:
JSON `"0.5"` is not a number here, so a client's type confusion is a 400 rather than a silent coercion.

Extensions to OpenAI's schema: `top_k` (0 = off), and tool calls inside assistant `content` as the literal markers
`<|python_start|>expr<|python_end|>` and `<|output_start|>result<|output_end|>` (the chat CLI prints the same); the
server streams them that way and turns them back into the special tokens when a conversation comes back. With
`calculator_format: "text"` they arrive as GSM8K's own annotation instead, `<<expr=result>>` (the text the model's
calculator data was written in), which reads as plain text but does not round-trip.

Fields OpenAI defines that this server does not implement (tools, response formats, penalties, logit bias, ...) are a
400 naming the field unless they hold their neutral value (`presence_penalty: 0`, `tools: []`, ...), which is what
the server does anyway; any other unknown field is a 400 too: nothing a client asks for is silently ignored.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from jaxchat.engine import MAX_TOP_LOGPROBS

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_CONTENT_PARTS = 100  # a list content is joined into one message; this only bounds the work of reading it
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_CHOICES = 8  # n, times the prompts of a completions request: every choice is a row of its own
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit

UNSUPPORTED = {  # OpenAI field -> (what this server lacks, the neutral values it accepts because they change nothing)
    # (each request model declares the ones its OpenAI endpoint has)
    "tools": ("function calling", (None, [])),
    "tool_choice": ("function calling", (None, "none")),
    "functions": ("function calling", (None, [])),
    "function_call": ("function calling", (None, "none")),
    "response_format": ("structured output", (None, {"type": "text"})),
    "presence_penalty": ("repetition penalties", (None, 0)),
    "frequency_penalty": ("repetition penalties", (None, 0)),
    "logit_bias": ("logit bias", (None, {})),
    "echo": ("echoing the prompt", (None, False)),
    "suffix": ("insertion (suffix)", (None,)),
    "best_of": ("best_of", (None, 1)),
}


def check_neutral(value, info: ValidationInfo):
    lacks, neutral = UNSUPPORTED[info.field_name]
    # 0.0 is the neutral 0, but False is not (Python says False == 0) and 0 is not False
    if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
        allowed = " or ".join(json.dumps(v) for v in neutral)  # as the client would write them
        raise ValueError(f"`{info.field_name}` is not supported by this server (no {lacks}); leave it out or send "
                         f"{allowed}")
    return value


class _Strict(BaseModel):
    # Unknown fields are errors (a 400 naming them), never ignored; see UNSUPPORTED for OpenAI's own.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(
        description=f"the message text (1 to {MAX_MESSAGE_CHARS:,} characters) or a list of text parts joined together")
    name: str | None = Field(default=None, max_length=256, description="accepted for compatibility and ignored")
    # What the openai client echoes back with a previous reply (`message.model_dump()`); only null or empty.
    refusal: None = None
    tool_calls: list[None] | None = Field(default=None, max_length=0, description="only null or []")
    function_call: None = None
    audio: None = None
    annotations: list[None] | None = Field(default=None, max_length=0, description="only null or []")

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


_NOT_SUPPORTED = "not supported: only null or its neutral value is accepted"


class TextFormat(_Strict):
    type: Literal["text"]


class _Generation(_Strict):
    """What chat and text completions share: sampling, length, choices, stop strings, streaming."""

    model: str | None = Field(default=None, max_length=256, description="ignored: this server serves one model")
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy")
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K, description="sample among the k likeliest; 0 = off")
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, description="nucleus sampling; 1 = off")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_MAX_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1,
                         description="the same seed and request give the same text; random by default")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices to generate, each a row of its own")
    stop: str | list[str] | None = Field(default=None, description=f"up to {MAX_STOP} strings; the reply ends before "
                                                                    f"the first that appears (not included)")
    user: str | None = Field(default=None, max_length=256, description="an end-user id, written to the request log")
    # OpenAI fields this server does not implement, typed as their neutral values only (so the OpenAPI document says
    # exactly what is accepted); a "before" validator turns any other value into a 400 that names the field.
    presence_penalty: float | None = Field(default=None, ge=0, le=0, description=_NOT_SUPPORTED)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0, description=_NOT_SUPPORTED)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0, description=_NOT_SUPPORTED)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        for s in stops:
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
        return value

    @field_validator(*UNSUPPORTED, mode="before", check_fields=False)
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        return check_neutral(value, info)

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_MAX_TOKENS, description="wins over max_tokens")
    logprobs: bool = Field(default=False, description="return each output token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: this many likeliest alternatives per token")
    calculator_format: Literal["markers", "text"] = Field(
        default="markers", description="calculator calls as <|python_start|>...<|output_end|> markers (they "
                                       "round-trip) or as GSM8K's plain-text <<expr=result>>")
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=0, description=_NOT_SUPPORTED)
    tool_choice: Literal["none"] | None = Field(default=None, description=_NOT_SUPPORTED)
    functions: list[dict[str, Any]] | None = Field(default=None, max_length=0, description=_NOT_SUPPORTED)
    function_call: Literal["none"] | None = Field(default=None, description=_NOT_SUPPORTED)
    response_format: TextFormat | None = Field(default=None, description=_NOT_SUPPORTED)

    @model_validator(mode="after")
    def _total_size(self):
        total = sum(len(m.text) for m in self.messages)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"the messages hold {total:,} characters in all; at most {MAX_TOTAL_CHARS:,} are allowed")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Generation):
    """The legacy text completion: the prompt continued as plain text after <|bos|> (what a base model trained on)."""

    prompt: str | list[str] = Field(description=f"text to continue, or a list of texts (each times n choices: at most "
                                                f"{MAX_CHOICES} in all); \"\" starts from <|bos|> alone")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_MAX_TOKENS, description="16 when left out (OpenAI's)")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                 description="return each token's log-probability and this many alternatives")
    echo: Literal[False] | None = Field(default=None, description=_NOT_SUPPORTED)
    suffix: None = Field(default=None, description=_NOT_SUPPORTED)
    best_of: int | None = Field(default=None, ge=1, le=1, description=_NOT_SUPPORTED)

    @model_validator(mode="after")
    def _sizes(self):
        prompts = self.prompts
        if not prompts:
            raise ValueError("prompt is an empty list: send a string or a list of strings")
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts x n={self.n} is {len(prompts) * self.n} choices; at most "
                             f"{MAX_CHOICES} are allowed")
        total = sum(len(p) for p in prompts)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"the prompt holds {total:,} characters in all; at most {MAX_TOTAL_CHARS:,} are allowed")
        for p in prompts:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"the prompt has a lone surrogate at character {e.start}, which is not a character"
                                 ) from None
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# ---- responses (documented for the OpenAPI spec; the handlers build plain dicts of the same shape) -------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class _Choice(BaseModel):
    """What a choice of either reply has; each kind adds its text and its logprobs."""

    index: int
    finish_reason: Literal["stop", "length"]


class Choice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class _Reply(BaseModel):
    """What a chat or text completion has besides its object name and choices."""

    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Reply):
    object: Literal["chat.completion"]
    choices: list[Choice]


class TextCompletion(_Reply):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "warming_up", "draining", "failed"]
    ready: bool


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody

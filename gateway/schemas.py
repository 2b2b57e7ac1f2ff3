"""OpenAI request bodies as pydantic models. Unknown fields are accepted and ignored; known
fields are checked, and features the fabric does not implement are refused by name.

The sampling fields and their rules come from `proto/messages.py: SamplingFields`; only the
fields whose OpenAI shape differs from the bus's (`stop`, `logit_bias`, `stop_token_ids`) are
typed here, and `sampling()` builds each choice's `SamplingParams` (the gateway validates every
choice's parameters before it publishes anything, so a bad value is a 400 naming its field,
never a 500)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..proto.messages import ChatMessage, ModelName, SamplingFields, SamplingParams, Text, TokenId

MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(SamplingFields):
    """What every OpenAI body has: the model, choices, streaming, and the sampling fields
    (`SamplingFields`; `top_k`, `min_tokens`, `repetition_penalty`, `ignore_eos` and
    `stop_token_ids` are extensions vLLM understands too, sent with the SDK's extra_body)."""

    model_config = ConfigDict(extra="allow")

    model: ModelName
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        for token in value or {}:
            if not token.strip().lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, index: int) -> SamplingParams:
        """Sampling parameters of choice `index` (a seeded request gets seed + index per choice,
        so the choices of one request differ while the whole request stays reproducible).
        Raises pydantic's ValidationError, located at the OpenAI field name."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        shared = {name: getattr(self, name) for name in SamplingFields.model_fields}
        return SamplingParams(**{
            **shared,
            "max_tokens": self.effective_max_tokens(),
            "seed": None if self.seed is None else self.seed + index,
            "stop": tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()},
        })

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Text | None = None


class _InMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[_TextPart] | None = None

    def to_chat(self, index: int) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValueError(
                        f"messages[{index}].content: only text parts are supported, got {part.type!r}"
                    )
            content = "".join(part.text for part in content)
        if content is None:
            raise ValueError(f"messages[{index}].content must be given")
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=content)


class ChatCompletionRequest(_Common):
    messages: list[_InMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.tools or self.functions:
            raise ValueError("tool and function calling are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        self.chat_messages()  # content parts other than text are refused here, with their index
        return self

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(m.to_chat(i) for i, m in enumerate(self.messages))


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16  # the OpenAI default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported by this server")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        prompts = self.prompts()  # refuses empty prompts
        if self.echo and not all(isinstance(p, str) for p in prompts):
            raise ValueError("echo is only supported with text prompts")
        return self

    def prompts(self) -> list[str | tuple[int, ...]]:
        p = self.prompt
        if isinstance(p, str):
            items = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [tuple(p)]
        else:
            items = [x if isinstance(x, str) else tuple(x) for x in p]
        if not items or any(len(x) == 0 for x in items):
            raise ValueError("prompt must not be empty")
        return items

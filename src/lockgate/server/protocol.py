"""OpenAI request bodies as pydantic models (validated strictly from the raw JSON).

Strict JSON validation: "0.5" is not a number and `true` is not an integer, as
with OpenAI. Unknown fields are accepted and ignored (clients send extras). The
limits that depend on server configuration (n, stop count, message count, ...)
are checked in `params.py`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from lockgate.bodies import parse_body
from lockgate.engine.sampling_params import MAX_LOGPROBS


# Every integer a client sends is bounded before anything is registered: Python ints
# are unbounded, the engine's wire format (msgpack) and torch are not.
INT32_MAX = 2**31 - 1
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
NonNegative = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


_M = TypeVar("_M", bound=_Body)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Count | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # vLLM-compatible extensions.
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    min_tokens: NonNegative | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    # A priority class name ("interactive", "standard", "batch", ...) or, as in vLLM, an integer
    # (lower is served first; needs --scheduling-policy priority).
    priority: Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)] | Annotated[str, Field(max_length=64)] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Count | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Count | None = None


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ResponseFormat(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None  # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: Count | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM-compatible extensions.
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


async def read_body(request: Request, model: type[_M]) -> _M:
    """Read the request's raw bytes and validate them strictly (`lockgate.bodies.parse_body`):
    any problem is a 400 in the OpenAI shape."""
    return parse_body(model, await request.body())

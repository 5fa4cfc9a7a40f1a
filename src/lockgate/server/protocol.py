"""OpenAI request bodies as pydantic models (validated strictly from the raw JSON).

Strict JSON validation: "0.5" is not a number and `true` is not an integer, as
with OpenAI. The limits that depend on server configuration (n, stop count,
message count, ...) are checked in `params.py`.

Every field a model declares does something, or is refused:

- the implemented fields change what the engine does or what the answer holds;
- fields marked `Unsupported` are OpenAI and vLLM fields lockgate does not implement: declared so
  the OpenAPI document shows them, and refused with a 400 `unsupported_parameter` naming the field
  for any value but null or one that asks for what lockgate does anyway (`use_beam_search: false`);
- fields marked `Informational` are accepted and change nothing a client could observe (`user`
  only keeps a caller on one version of a traffic split; `metadata` & co. are not stored).

Unknown fields are accepted and ignored (clients send extras; vLLM ignores them too), but named
in the `x-lockgate-ignored-fields` response header and logged (`read_body`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from lockgate.bodies import parse_body
from lockgate.engine.sampling_params import MAX_LOGPROBS
from lockgate.server.state import IGNORED_FIELDS_SCOPE_KEY

log = logging.getLogger("lockgate.server")

# Every integer a client sends is bounded before anything is registered: Python ints
# are unbounded, the engine's wire format (msgpack) and torch are not.
INT32_MAX = 2**31 - 1
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
NonNegative = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]

# Unknown fields, as `read_body` names them (the response header is sent by model_select.py).
MAX_IGNORED_HEADER_CHARS = 512
_MAX_IGNORED_NAMES = 32
_MAX_NAME_CHARS = 64
_MAX_WALKED_ITEMS = 1024
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_LOGGED_MAX = 1024
_logged: set[tuple[str, str]] = set()  # (path, header value) already logged at info level


class _Body(BaseModel):
    # "allow": unknown fields are kept (unvalidated) only so `ignored_fields` can name them.
    model_config = ConfigDict(extra="allow", strict=True)


_M = TypeVar("_M", bound=_Body)


@dataclass(frozen=True, slots=True)
class Unsupported:
    """Marks a known OpenAI / vLLM field lockgate does not implement. `harmless`: the values that ask
    for nothing lockgate does not do (besides null); any other is refused (`params.refuse_unsupported`)."""

    harmless: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Informational:
    """Marks a field accepted with no effect a client could observe."""


def _refused(what: str, accepted: str = "") -> Any:
    also = f" or {accepted}" if accepted else ""
    return Field(default=None, description=f"Not supported ({what}): any value but null{also} is refused with "
                                           "400 `unsupported_parameter`")


def _informational(what: str) -> Any:
    return Field(default=None, description=f"Informational: {what}")


def marked(model: type[BaseModel], marker: type[Unsupported] | type[Informational]) -> dict[str, Any]:
    """The fields of `model` carrying `marker`, with the marker."""
    return {name: m for name, f in model.model_fields.items() for m in f.metadata if isinstance(m, marker)}


class StreamOptions(_Body):
    include_usage: bool | None = False


# Names OpenAI accepts for a response format's schema and for a function.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
MAX_TOOLS = 128


class JsonSchemaFormat(_Body):
    # With `schema`: the schema's label. Without: a registered schema, NAME or NAME@VERSION (gateway/schemas.py).
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}(@[0-9]{1,32})?$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON schema the answer must match (an object)")
    strict: bool | None = Field(
        default=None, description="Accepted either way: the answer is constrained to the schema whether or not "
                                  "`strict` is true")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Body):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json",
                                               description="A JSON schema (an object, or its JSON text)")
    json_object: bool | None = Field(default=None, description="Any JSON object")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(default=None, description="A Lark grammar, or GBNF/EBNF (`root ::= ...`)")
    disable_any_whitespace: bool | None = Field(
        default=None, description="Default true: JSON with no optional whitespace (false allows it)")
    disable_fallback: bool | None = Field(default=None, description="Accepted: there is no fallback backend")
    whitespace_pattern: str | None = Field(
        default=None, description="Only a pattern of whitespace characters (`[\\n\\t ]*`, `\\s*`) is "
                                  "accepted: it allows optional whitespace")
    structural_tag: Annotated[str | None, Unsupported()] = _refused("structural tags")


class FunctionDefinition(_Body):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON schema object; absent: a function without parameters")
    strict: bool | None = Field(default=None, description="Accepted either way: the arguments of a `required` or "
                                                          "named call are constrained to the schema")


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Body):
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the answer gave them")


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


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
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (a decimal string) -> bias in [-100, 100] added to its logit before "
                                  "sampling; at most 1024 entries, ids inside the model's vocabulary")
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    user: Annotated[Annotated[str, Field(max_length=256)] | None, Informational()] = _informational(
        "not stored; keeps the caller on one version of a traffic split")
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
    prompt_logprobs: TopLogprobs | None = Field(
        default=None, description="vLLM: the logprob of every prompt token and its N most likely alternatives "
                                  "(`prompt_logprobs` in the answer, the first entry null); at most the "
                                  "server's max logprobs")
    allowed_token_ids: list[TokenId] | None = Field(
        default=None, description="vLLM: sample only among these token ids")
    bad_words: list[str] | None = Field(
        default=None, description="vLLM: words never generated (at most 128, each 1 to 256 characters)")
    # A priority class name ("interactive", "standard", "batch", ...) or, as in vLLM, an integer
    # (lower is served first; needs --scheduling-policy priority).
    priority: Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)] | Annotated[str, Field(max_length=64)] | None = None
    # Known fields lockgate does not implement.
    use_beam_search: Annotated[bool | None, Unsupported((False,))] = _refused("beam search", "false")
    length_penalty: Annotated[float | None, Unsupported((1.0,))] = _refused("beam search", "1")
    truncate_prompt_tokens: Annotated[int | None, Unsupported()] = _refused("prompts are never truncated")
    # Structured outputs (vLLM's fields; `response_format` is OpenAI's): at most one constraint.
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = Field(default=None, description="vLLM's older form of "
                                                     "`structured_outputs.json`")
    guided_regex: str | None = Field(default=None, description="vLLM's older `structured_outputs.regex`")
    guided_choice: list[str] | None = Field(default=None, description="vLLM's older `structured_outputs.choice`")
    guided_grammar: str | None = Field(default=None, description="vLLM's older `structured_outputs.grammar`")
    guided_whitespace_pattern: str | None = Field(
        default=None, description="Only a pattern of whitespace characters is accepted: it allows optional "
                                  "whitespace in JSON")
    guided_decoding_backend: Annotated[str | None, Unsupported(("auto", "guidance", "llguidance"))] = _refused(
        "one grammar engine (llguidance)", '"auto", "guidance" or "llguidance"')
    logits_processors: Annotated[list[Any] | None, Unsupported(([],))] = _refused("custom logits processors", "[]")
    return_tokens_as_token_ids: Annotated[bool | None, Unsupported((False,))] = _refused(
        "logprobs name tokens by their text", "false")
    return_token_ids: Annotated[bool | None, Unsupported((False,))] = _refused("token ids are not returned", "false")
    prompt_embeds: Annotated[str | list[str] | None, Unsupported()] = _refused("prompts are text or token ids")
    request_id: Annotated[str | None, Unsupported()] = _refused("the server names every request")
    cache_salt: Annotated[str | None, Unsupported()] = _refused("the server salts the prefix cache per tenant")
    kv_transfer_params: Annotated[dict[str, Any] | None, Unsupported()] = _refused("disaggregated prefill")
    vllm_xargs: Annotated[dict[str, Any] | None, Unsupported()] = _refused("vLLM's extra arguments")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: NonNegative | None = Field(
        default=16, description="0 generates nothing: with `echo` and `logprobs` it scores the prompt")
    logprobs: TopLogprobs | None = None
    echo: bool | None = Field(
        default=False, description="Prepend the prompt to the text (and, with `logprobs`, its tokens' logprobs, "
                                   "the first null)")
    suffix: str | None = Field(default=None, description="Not supported: any value but null or \"\" is refused")
    best_of: Count | None = Field(default=None, description="Accepted only equal to `n` (no server-side best-of)")
    response_format: ResponseFormat | None = Field(
        default=None, description="`text`, `json_object` or `json_schema` (the answer constrained to the schema)")
    add_special_tokens: Annotated[bool | None, Unsupported((True,))] = _refused(
        "a text prompt always gets the model's special tokens", "true")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: NonNegative | None = Field(
        default=None, description="Deprecated by OpenAI, still sent by many clients; 0 generates nothing")
    max_completion_tokens: NonNegative | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = Field(
        default=None, description="`text`, `json_object` or `json_schema` (the answer constrained to the schema)")
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description=f"Functions the model may call (at most {MAX_TOOLS}, unique names)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="Default `auto` with tools, `none` without; `required` and a named function are "
                                  "enforced by grammar")
    parallel_tool_calls: bool | None = Field(
        default=None, description="Default true; false: at most one call per answer")
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None,
                        Field(max_length=16), Informational()] = _informational("not stored (at most 16 pairs)")
    safety_identifier: Annotated[Annotated[str, Field(max_length=256)] | None, Informational()] = _informational(
        "not stored")
    prompt_cache_key: Annotated[Annotated[str, Field(max_length=256)] | None, Informational()] = _informational(
        "the prefix cache is shared by every request of a tenant anyway")
    # vLLM-compatible extensions.
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: Annotated[bool | None, Unsupported((False,))] = _refused(
        "the chat template holds the special tokens", "false")
    # Known fields lockgate does not implement.
    audio: Annotated[dict[str, Any] | None, Unsupported()] = _refused("text only")
    modalities: Annotated[list[str] | None, Unsupported((["text"],))] = _refused("text only", '["text"]')
    prediction: Annotated[dict[str, Any] | None, Unsupported()] = _refused("predicted outputs")
    reasoning_effort: Annotated[str | None, Unsupported()] = _refused("no reasoning control")
    verbosity: Annotated[str | None, Unsupported()] = _refused("no verbosity control")
    functions: Annotated[list[dict[str, Any]] | None, Unsupported(([],))] = _refused("function calling", "[]")
    function_call: Annotated[str | dict[str, Any] | None, Unsupported(("none",))] = _refused(
        "function calling", '"none"')
    web_search_options: Annotated[dict[str, Any] | None, Unsupported()] = _refused("no web search")
    store: Annotated[bool | None, Unsupported((False,))] = _refused("completions are not stored", "false")
    service_tier: Annotated[str | None, Unsupported(("auto", "default"))] = _refused(
        "one service tier; see `priority`", '"auto" or "default"')
    echo: Annotated[bool | None, Unsupported((False,))] = _refused("vLLM's echo of the last message", "false")
    documents: Annotated[list[dict[str, Any]] | None, Unsupported()] = _refused("documents in the chat template")
    chat_template: Annotated[str | None, Unsupported()] = _refused("the model's own chat template only")
    mm_processor_kwargs: Annotated[dict[str, Any] | None, Unsupported()] = _refused("text only")


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


def _safe_name(name: str) -> str:
    """A client's field name as a header may show it: ASCII letters, digits, `_` and `-`, bounded."""
    return _UNSAFE_NAME_CHARS.sub("?", name[:_MAX_NAME_CHARS]) or "?"


@cache
def _field_order(model: type[BaseModel]) -> tuple[dict[str, int], frozenset[str]]:
    """The fields' declaration order, and those whose default could hold a model (a default factory or
    a container): only those and the fields a body sets can hold a model, so only they are walked."""
    order = {name: i for i, name in enumerate(model.model_fields)}
    always = frozenset(n for n, f in model.model_fields.items()
                       if f.default_factory is not None or isinstance(f.default, (BaseModel, list, tuple, dict)))
    return order, always


def _walked_fields(model: BaseModel) -> list[str]:
    """The declared fields that may hold a model, in declaration order (a body sets a few of dozens)."""
    order, always = _field_order(type(model))
    names = [n for n in model.model_fields_set if n in order]
    names.extend(n for n in always if n not in model.model_fields_set)
    names.sort(key=order.__getitem__)
    return names


def ignored_fields(body: BaseModel) -> list[str]:
    """The unknown fields of a validated body and of the models inside it, as dotted paths
    (`messages.0.reasoning_content`: the first message that has it), sanitized; at most 33 (one
    more than a header shows), from the first 1024 items of a list (longer lists are refused anyway)."""
    out: list[str] = []
    seen: set[str] = set()

    def walk(model: BaseModel, path: str, shape: str) -> None:
        for name in model.model_extra or ():
            key = f"{shape}{name}"
            if key not in seen and len(out) <= _MAX_IGNORED_NAMES:
                seen.add(key)
                out.append(f"{path}{_safe_name(name)}")
        for name in _walked_fields(model):
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{path}{name}.", f"{shape}{name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value[:_MAX_WALKED_ITEMS]):
                    if isinstance(item, BaseModel):
                        walk(item, f"{path}{name}.{i}.", f"{shape}{name}.*.")

    walk(body, "", "")
    return out


def ignored_header(names: list[str]) -> str:
    """`a,b,c`: at most 32 names and `MAX_IGNORED_HEADER_CHARS`, else ending in `,...`."""
    value = ""
    for i, name in enumerate(names):
        nxt = f"{value},{name}" if value else name
        if i == _MAX_IGNORED_NAMES or len(nxt) > MAX_IGNORED_HEADER_CHARS - 4:
            return f"{value},..."
        value = nxt
    return value


def _note_ignored(request: Request, body: BaseModel) -> None:
    names = ignored_fields(body)
    if not names:
        return
    value = ignored_header(names)
    request.scope[IGNORED_FIELDS_SCOPE_KEY] = value
    path = request.url.path
    # Once per distinct (route, fields) at info level, so a client that always sends an extra field
    # does not fill the log; every time at debug.
    if (path, value) not in _logged and len(_logged) < _LOGGED_MAX:
        _logged.add((path, value))
        log.info("POST %s: ignored unknown fields %s", path, value)
    else:
        log.debug("POST %s: ignored unknown fields %s", path, value)


async def read_body(request: Request, model: type[_M]) -> _M:
    """Read the request's raw bytes and validate them strictly (`lockgate.bodies.parse_body`):
    any problem is a 400 in the OpenAI shape. Unknown fields are ignored, named in the
    `x-lockgate-ignored-fields` header and logged."""
    body = parse_body(model, await request.body())
    _note_ignored(request, body)
    return body

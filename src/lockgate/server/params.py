"""Turn a validated OpenAI request into engine inputs: SamplingParams, prompts, chat messages.

A field the request leaves out takes the model's sampling default (its generation config:
engine/generation_defaults.py, resolved per model version by `model_defaults`), else OpenAI's.
Everything a client controls is bounded here (n, stop strings, messages,
prompts, logprobs, logit_bias) and every refusal is a 400 naming the offending
field; a known field lockgate does not implement is refused (`refuse_unsupported`).
"""
from __future__ import annotations

import json
import logging
import math
import re
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from lockgate.engine.config import EngineConfig
from lockgate.engine.generation_defaults import NONE as NO_DEFAULTS
from lockgate.engine.generation_defaults import GenerationDefaults, resolve
from lockgate.engine.sampling_params import LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, SamplingParams
from lockgate.server.config import ServerConfig
from lockgate.server.errors import APIError, bad_request
from lockgate.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Unsupported,
    _SamplingFields,
    marked,
)
from lockgate.server.structured import Constraint, request_constraint
from lockgate.server.tools import ToolSetup, tool_setup

if TYPE_CHECKING:
    from lockgate.lifecycle.target import Target

log = logging.getLogger("lockgate.server")
_FIELD_RE = re.compile(r"^([a-z_]+)\b")
_EXTRA_FIELDS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                 "allowed_token_ids", "bad_words")
_TOKEN_ID_KEY = re.compile(r"^[0-9]{1,10}$")


def model_defaults(target: Target) -> GenerationDefaults:
    """The routed model version's sampling defaults (its --generation-config applied to its checkpoint's)."""
    config = target.fleet.model_config
    try:
        return resolve(target.engine_config.generation_config, config.sampling_defaults if config else None)
    except ValueError as exc:  # checked at start-up; a version loaded later with a bad path: none, said once
        _warn_once(str(exc))
        return NO_DEFAULTS


@cache
def _warn_once(message: str) -> None:
    log.warning("sampling defaults ignored: %s", message)


def sampling_error(exc: ValueError) -> APIError:
    """SamplingParams / InputProcessor messages start with the field they are about."""
    msg = str(exc)
    m = _FIELD_RE.match(msg)
    param = m.group(1) if m and m.group(1) in SamplingParams.__dataclass_fields__ else None
    return bad_request(msg, param=param, code="invalid_value")


def _shown(value: str) -> str:
    """A client's string inside an error message: short and printable."""
    return repr(value) if len(value) <= 32 and value.isprintable() else f"{value[:32]!r}..."


@cache
def _unsupported(model: type[BaseModel]) -> dict[str, Unsupported]:
    return marked(model, Unsupported)


@cache
def _null_by_default(model: type[BaseModel]) -> bool:
    fields = model.model_fields
    return all(fields[name].default is None and fields[name].default_factory is None for name in _unsupported(model))


def _same(value: object, accepted: object) -> bool:
    return isinstance(value, bool) == isinstance(accepted, bool) and value == accepted


def refuse_unsupported(req: BaseModel) -> None:
    """400 `unsupported_parameter` for a known field lockgate does not implement, set to anything
    but null or a value that asks for nothing more than what lockgate does."""
    marks = _unsupported(type(req))
    if _null_by_default(type(req)) and marks.keys().isdisjoint(req.model_fields_set):
        return  # such fields default to null: only one the body sets can be refused
    for name, mark in marks.items():
        value = getattr(req, name)
        if value is not None and not any(_same(value, ok) for ok in mark.harmless):
            shown = " or ".join(json.dumps(v) for v in mark.harmless)
            also = f" (only {shown} is accepted)" if shown else ""
            raise bad_request(f"{name} is not supported by this server{also}", param=name,
                              code="unsupported_parameter")


def logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` as `{id: bias}`: at most 1024 entries, biases in [-100, 100]
    (the engine checks again; here the messages never echo more than a short key)."""
    if not raw:
        return None
    if len(raw) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries, got {len(raw)}",
                          param="logit_bias", code="invalid_value")
    out: dict[int, float] = {}
    for key, bias in raw.items():
        if not _TOKEN_ID_KEY.match(key) or int(key) > 2**31 - 1:
            raise bad_request(f"logit_bias keys must be token ids (non-negative integers as strings), got "
                              f"{_shown(key)}", param="logit_bias", code="invalid_value")
        if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
            raise bad_request(f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], got {bias} "
                              f"for token {key}",
                              param="logit_bias", code="invalid_value")
        out[int(key)] = float(bias)
    return out


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Token ids the request names (logit_bias, allowed_token_ids) must be in the model's vocabulary
    (the engine checks again; refusing here costs nothing to reserve)."""
    for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=name,
                              code="invalid_value")


def _check_logprobs(value: int | None, name: str, engine: EngineConfig) -> None:
    if value is not None and value > engine.max_logprobs:
        raise bad_request(f"{name} must be <= {engine.max_logprobs}, got {value}", param=name, code="invalid_value")


def _common(req: _SamplingFields, cfg: ServerConfig, engine: EngineConfig, max_tokens: int | None,
            logprobs: int | None, prompt_logprobs: int | None, constraint: Constraint | None,
            defaults: GenerationDefaults = NO_DEFAULTS) -> SamplingParams:
    if isinstance(req.priority, int) and req.priority and engine.scheduling_policy != "priority":
        # Accepting it silently would promise an ordering the scheduler does not give.
        raise bad_request("an integer priority is only accepted when the server runs with --scheduling-policy "
                          "priority (a class name is accepted under any policy)",
                          param="priority", code="unsupported_parameter")
    n = req.n or 1
    if n > cfg.max_n:
        raise bad_request(f"n must be <= {cfg.max_n}, got {n}", param="n", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and len(stop) > cfg.max_stop:
        raise bad_request(f"stop must have at most {cfg.max_stop} strings, got {len(stop)}",
                          param="stop", code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    _check_logprobs(req.prompt_logprobs, "prompt_logprobs", engine)
    kwargs: dict[str, Any] = {
        "n": n,
        "temperature": defaults.get("temperature", 1.0) if req.temperature is None else req.temperature,
        "top_p": defaults.get("top_p", 1.0) if req.top_p is None else req.top_p,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "seed": req.seed,
        "stop": stop or None,
        "max_tokens": _default_max_tokens(defaults, req.min_tokens) if max_tokens is None else max_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "logit_bias": logit_bias(req.logit_bias),
        "structured": constraint.spec if constraint is not None else None,
    }
    for name in _EXTRA_FIELDS:
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
        elif name in defaults.values:  # the model's generation config, for a field the request left out
            kwargs[name] = defaults.values[name]
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise sampling_error(exc) from None


def _default_max_tokens(defaults: GenerationDefaults, min_tokens: int | None) -> int | None:
    """The model's max_tokens, stretched to the request's own min_tokens (never a 400 for a default)."""
    value = defaults.get("max_tokens")
    return value if value is None or min_tokens is None else max(value, min_tokens)


def completion_params(req: CompletionRequest, cfg: ServerConfig, engine: EngineConfig,
                      defaults: GenerationDefaults = NO_DEFAULTS) -> SamplingParams:
    return completion_inputs(req, cfg, engine, defaults)[0]


def completion_inputs(req: CompletionRequest, cfg: ServerConfig, engine: EngineConfig,
                      defaults: GenerationDefaults = NO_DEFAULTS) -> tuple[SamplingParams, Constraint | None]:
    """`echo` with `logprobs: N` asks the engine for the prompt's logprobs with N alternatives (and
    `prompt_logprobs` for its own count: the engine computes the larger, each answer keeps its own)."""
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of must equal n (server-side best-of is not supported)", param="best_of",
                          code="unsupported_parameter")
    refuse_unsupported(req)
    constraint = request_constraint(req, req.response_format)
    _check_logprobs(req.logprobs, "logprobs", engine)
    wanted = [v for v in (req.prompt_logprobs, req.logprobs if req.echo else None) if v is not None]
    # OpenAI's 16 when the body leaves max_tokens out, unless the model's generation config says otherwise.
    max_tokens = req.max_tokens
    if "max_tokens" not in req.model_fields_set and "max_tokens" in defaults.values:
        max_tokens = _default_max_tokens(defaults, req.min_tokens)
    return _common(req, cfg, engine, max_tokens, req.logprobs, max(wanted) if wanted else None,
                   constraint, defaults), constraint


def chat_params(req: ChatCompletionRequest, cfg: ServerConfig, engine: EngineConfig,
                defaults: GenerationDefaults = NO_DEFAULTS) -> SamplingParams:
    return chat_inputs(req, cfg, engine, defaults)[0]


def chat_inputs(req: ChatCompletionRequest, cfg: ServerConfig, engine: EngineConfig,
                defaults: GenerationDefaults = NO_DEFAULTS
                ) -> tuple[SamplingParams, ToolSetup | None, Constraint | None]:
    """The engine's parameters, the request's tools and its output constraint (with the field it
    came from): `required` and a named tool_choice constrain the answer, so they count as one."""
    refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    tools = tool_setup(req)
    constraint = request_constraint(req, req.response_format)
    if tools is not None and tools.constraint is not None:
        if constraint is not None:
            raise bad_request(f"tool_choice {tools.choice} constrains the answer to tool calls: it cannot be "
                              f"combined with {constraint.param}", param="tool_choice", code="invalid_value")
        constraint = tools.constraint
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    _check_logprobs(logprobs if req.top_logprobs is not None else None, "top_logprobs", engine)
    params = _common(req, cfg, engine, max_tokens, logprobs, req.prompt_logprobs, constraint, defaults)
    return params, tools, constraint


def completion_prompts(req: CompletionRequest, cfg: ServerConfig) -> list[str | list[int]]:
    """The request's prompts as a list: one string, token ids, or a batch of either."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [p]  # type: ignore[list-item]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts:
        raise bad_request("prompt must not be empty", param="prompt")
    if len(prompts) > cfg.max_prompts:
        raise bad_request(f"prompt must hold at most {cfg.max_prompts} prompts, got {len(prompts)}",
                          param="prompt")
    for i, one in enumerate(prompts):
        if len(one) == 0:
            where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            raise bad_request(f"{where} must not be empty", param=where)
    return prompts


def chat_messages(messages: list[ChatMessage], cfg: ServerConfig) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: role and plain-text content."""
    if len(messages) > cfg.max_messages:
        raise bad_request(f"messages must hold at most {cfg.max_messages} messages, got {len(messages)}",
                          param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool" and not m.tool_call_id:
            raise bad_request(f"messages.{i}.tool_call_id is required for role 'tool'",
                              param=f"messages.{i}.tool_call_id")
        if m.tool_calls is not None and m.role != "assistant":
            raise bad_request(f"messages.{i}.tool_calls is only allowed for role 'assistant'",
                              param=f"messages.{i}.tool_calls")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"content part type {part.type!r} is not supported (text only)",
                                      param=f"messages.{i}.content.{j}.type", code="unsupported_content")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None:
            if m.role != "assistant":
                raise bad_request(f"messages.{i}.content is required for role {m.role!r}",
                                  param=f"messages.{i}.content")
            content = ""
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:  # OpenAI's shape, arguments as the client's JSON text (tools.template_messages)
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        out.append(msg)
    return out

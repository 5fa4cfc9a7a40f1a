"""A request's output constraint: OpenAI's `response_format` and vLLM's `structured_outputs` /
`guided_*` fields as one `StructuredOutputs` (engine/structured_params.py), and the field it came from.

At most one constraint per request: a second one is a 400 naming it. A schema must be a JSON
object of bounded size; whether it (or a regex, a grammar) compiles is decided by the engine's
grammar engine when the request is submitted, and its error is renamed to the client's field here
(`renamed`). Whitespace inside JSON is bounded by default (vLLM's `disable_any_whitespace`).
A `json_schema` may name a registered schema instead of sending it (`resolve_named_schema`).
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from lockgate.engine.structured.grammar import validate as validate_structured
from lockgate.engine.structured_params import MAX_SPEC_CHARS, StructuredOutputs
from lockgate.errors import APIError, bad_request
from lockgate.gateway import schemas
from lockgate.observability.schema_metrics import INLINE, OutputCheck, schema_metrics
from lockgate.server.protocol import (
    ResponseFormat,
    StructuredOutputsRequest,
    _SamplingFields,
)

# A whitespace pattern we can honour: only whitespace characters, repeated (`[\n\t ]*`, `\s*`, `( |\n)*`).
_WHITESPACE_ONLY = re.compile(r"^(?:\\s|\\n|\\t|\\r| |\[|\]|\(|\)|\||\*|\+|\?|\{\d*,?\d*\})+$")


@dataclass(frozen=True, slots=True)
class Constraint:
    """The constraint and the request field that gave it (for errors that come back from the engine)."""

    spec: StructuredOutputs
    param: str


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def schema_text(schema: Any, param: str) -> str:
    """A client's JSON schema (an object, or its JSON text) as compact JSON text, checked: an
    object, no NaN or infinities, at most `MAX_SPEC_CHARS` characters."""
    if isinstance(schema, str):
        if len(schema) > MAX_SPEC_CHARS:
            raise _too_long(param, len(schema))
        try:
            schema = json.loads(schema, parse_constant=_reject_constant)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise bad_request(f"{param} is not valid JSON: {str(exc)[:120]}", param=param) from None
    return schemas.schema_json(schema, param)  # an object, finite numbers, bounded: the registry's check too


def _too_long(param: str, size: int) -> APIError:
    return bad_request(f"{param} must be at most {MAX_SPEC_CHARS} characters of JSON, got {size}", param=param,
                       code="invalid_value")


def _whitespace_allowed(pattern: str, param: str) -> bool:
    """A whitespace pattern made of whitespace only allows optional whitespace; others are refused."""
    if not pattern or len(pattern) > 64 or not _WHITESPACE_ONLY.match(pattern):
        raise bad_request(f"{param}: only a pattern of whitespace characters (such as \"[\\n\\t ]*\") is "
                          "supported; it allows optional whitespace in JSON", param=param,
                          code="unsupported_parameter")
    return True


def _build(param: str, **kwargs: Any) -> Constraint:
    try:
        return Constraint(StructuredOutputs(**kwargs), param)
    except ValueError as exc:
        message = re.sub(r"^structured_outputs(\.\w+)?", param, str(exc), count=1)
        raise bad_request(message[:300], param=param) from None


def _from_response_format(fmt: ResponseFormat | None) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise bad_request("response_format.json_schema is only allowed with type json_schema",
                              param="response_format.json_schema")
        return None
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise bad_request("response_format.json_schema is only allowed with type json_schema",
                              param="response_format.json_schema")
        return _build("response_format", json_object=True)
    if fmt.json_schema is None:
        raise bad_request("response_format.json_schema is required with type json_schema",
                          param="response_format.json_schema")
    param = "response_format.json_schema.schema"
    if fmt.json_schema.schema_ is None:  # a registered schema by name is filled in by `resolve_named_schema`
        raise bad_request(f"{param} is required (or the name of a registered schema, with the server in keyed "
                          "mode)", param=param)
    return _build(param, json=schema_text(fmt.json_schema.schema_, param))


NAME_PARAM = "response_format.json_schema.name"
INLINE_CHECK_CHARS = 64 * 1024  # inline schemas larger than this are not checked for the metrics


async def resolve_named_schema(p: Any, fmt: ResponseFormat | None) -> None:  # p: server/pipeline.py's Pipeline
    """`response_format.json_schema` with a `name` (`invoice`, `invoice@3`) and no `schema`: the
    registered schema (the tenant's namespace, then global; gateway/schemas.py, cached) is filled
    into the request. Either way a json_schema request's answers are checked against their schema
    when it ends (observability/schema_metrics.py, labelled NAME/VERSION or `inline`)."""
    if fmt is None or fmt.type != "json_schema" or fmt.json_schema is None:
        return
    js = fmt.json_schema
    metrics = schema_metrics(p.app.metrics.registry)
    if js.schema_ is not None:
        if not isinstance(js.schema_, dict):
            return  # refused by the constraint's own checks
        try:
            text = json.dumps(js.schema_, separators=(",", ":"), allow_nan=False)
        except (ValueError, RecursionError):
            return  # the constraint's checks answer the 400
        if len(text) > INLINE_CHECK_CHARS:
            return  # not counted: its compiled validator would crowd the cache out
        check = OutputCheck(metrics, INLINE, "", text)
    else:
        gw = p.app.gateway
        if p.principal is None or gw.store is None or gw.astore is None:
            param = "response_format.json_schema.schema"  # no store of schemas to name one from
            raise bad_request(f"{param} is required: registered schemas (by name) are only available when the "
                              "server runs with keys (--admin-key)", param=param)
        found = await schemas.resolve(gw.astore, gw.store, p.principal.tenant_id, js.name, NAME_PARAM)
        js.schema_ = found.schema
        check = OutputCheck(metrics, found.name, str(found.version), found.text)
    p.record.output_check = check
    p.lease.hold(check.finish)


def _from_structured_outputs(so: StructuredOutputsRequest | None) -> Constraint | None:
    if so is None:
        return None
    base = "structured_outputs"
    given = [name for name, value in (("json", so.json_), ("json_object", so.json_object), ("regex", so.regex),
                                      ("choice", so.choice), ("grammar", so.grammar))
             if value is not None and value is not False]
    if not given:
        raise bad_request(f"{base} must give one of json, json_object, regex, choice, grammar", param=base)
    if len(given) > 1:
        raise bad_request(f"{base}: only one constraint at a time, got {', '.join(given)}",
                          param=f"{base}.{given[1]}")
    if so.structural_tag is not None:
        raise bad_request(f"{base}.structural_tag is not supported by this server", param=f"{base}.structural_tag",
                          code="unsupported_parameter")
    any_ws = so.disable_any_whitespace is False
    if so.whitespace_pattern is not None:
        any_ws = _whitespace_allowed(so.whitespace_pattern, f"{base}.whitespace_pattern")
    kind = given[0]
    param = f"{base}.{kind}"
    if kind == "json":
        return _build(param, json=schema_text(so.json_, param), any_whitespace=any_ws)
    if kind == "json_object":
        return _build(param, json_object=True, any_whitespace=any_ws)
    return _build(param, any_whitespace=any_ws, **{kind: getattr(so, kind)})


def _from_guided(req: _SamplingFields) -> list[Constraint]:
    any_ws = False
    if req.guided_whitespace_pattern is not None:
        any_ws = _whitespace_allowed(req.guided_whitespace_pattern, "guided_whitespace_pattern")
    out = []
    if req.guided_json is not None:
        out.append(_build("guided_json", json=schema_text(req.guided_json, "guided_json"), any_whitespace=any_ws))
    if req.guided_regex is not None:
        out.append(_build("guided_regex", regex=req.guided_regex))
    if req.guided_choice is not None:
        out.append(_build("guided_choice", choice=req.guided_choice))
    if req.guided_grammar is not None:
        out.append(_build("guided_grammar", grammar=req.guided_grammar))
    if req.guided_whitespace_pattern is not None and req.guided_json is None:
        raise bad_request("guided_whitespace_pattern is only allowed with guided_json",
                          param="guided_whitespace_pattern")
    return out


def only_one(constraints: list[Constraint | None]) -> Constraint | None:
    """The one constraint given, or a 400 naming the second."""
    given = [c for c in constraints if c is not None]
    if len(given) > 1:
        raise bad_request(f"only one output constraint per request: {given[0].param} and {given[1].param} were "
                          "both given", param=given[1].param, code="invalid_value")
    return given[0] if given else None


def request_constraint(req: _SamplingFields, response_format: ResponseFormat | None) -> Constraint | None:
    """The request's constraint from `response_format`, `structured_outputs` and `guided_*`."""
    return only_one([_from_response_format(response_format), _from_structured_outputs(req.structured_outputs),
                     *_from_guided(req)])


async def check_compiles(*constraints: Constraint | None) -> None:
    """A 400 naming the client's field for a schema, regex or grammar the grammar engine refuses,
    checked on a worker thread (up to ~0.1 s for a large schema; cached), before anything is
    reserved; the engine's own check at submission is then free."""
    given = [c for c in constraints if c is not None]
    if given:
        await asyncio.to_thread(_check_all, given)


def _check_all(constraints: list[Constraint]) -> None:
    for c in constraints:
        try:
            validate_structured(c.spec)
        except ValueError as exc:
            raise renamed(bad_request(str(exc), code="invalid_value"), c) from None


def renamed(err: APIError, constraint: Constraint | None) -> APIError:
    """An engine's refusal of the constraint (`structured_outputs.<kind> is invalid: ...`), named
    after the client's field."""
    if constraint is None or err.status != 400 or not err.message.startswith("structured"):
        return err
    message = re.sub(r"^structured_outputs(\.\w+)?", constraint.param, err.message, count=1)
    return bad_request(message[:400], param=constraint.param, code=err.code)

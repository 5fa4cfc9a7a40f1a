"""POST /v1/embeddings: OpenAI's embeddings, from any served model.

An input's vector is its pooled last hidden state (the engine's `SamplingParams.embed`): the mean
over the input's positions of the final-normed hidden state, L2-normalized. That is the documented
fallback for chat models, so the embedded default model answers with no embedding model
configured. `dimensions` keeps the first N values, normalized again.

Through the pipeline as generation goes: route, reserve (every input's tokens at the model's prompt
price, no completion), shed, submit, settle (the ledger row, metrics, the lease). Each input is
looked up first in the tenant's embedding cache (gateway/embedding_cache.py): only the inputs it
lacks run in the engine (once each, however often a request repeats one), batched there like
prefills; the found ones are billed as cached prompt tokens and still counted in `prompt_tokens`.
Router models and fallbacks do not apply: vectors of different models are not comparable.
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from lockgate.engine.sampling_params import SamplingParams
from lockgate.errors import bad_request, json_response, unavailable
from lockgate.gateway.embedding_cache import EmbeddingCache, build_embedding_cache, cache_key
from lockgate.server.embedding_protocol import MAX_INPUT_CHARS, MAX_INPUTS, EmbeddingRequest
from lockgate.server.pipeline import Pipeline
from lockgate.server.protocol import read_body
from lockgate.server.state import AppState

POOL = SamplingParams(max_tokens=0, embed=True)
_CACHE_ATTR = "lockgate_embedding_cache"  # on the FastAPI app's state, built on first use


async def create_embedding(request: Request, app: AppState) -> Response:
    p = Pipeline.open(request, app, "embd")
    body = await read_body(request, EmbeddingRequest)
    if body.model is not None and app.models.routers.get(body.model) is not None:
        raise bad_request(f"{body.model!r} is a router model: it does not serve embeddings (vectors of different "
                          "models are not comparable); name a model", param="model", code="invalid_value")
    p.route(body.model, body.user)
    return await p.idempotent(False, lambda: _create(p, body))


def embedding_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str, str | list[int]]]:
    """The request's inputs, each with the field that names it (`input`, or `input.N` in a list of
    several): 400 for none, too many, an empty one, or more text than a request may carry."""
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # type: ignore[list-item]  # one token-id input
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise bad_request("input must not be empty", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"input must hold at most {MAX_INPUTS} inputs, got {len(items)}", param="input")
    names = ["input"] if len(items) == 1 else [f"input.{i}" for i in range(len(items))]
    chars = 0
    for name, item in zip(names, items):
        if len(item) == 0:
            raise bad_request(f"{name} must not be empty", param=name)
        if isinstance(item, str):
            chars += len(item)
    if chars > MAX_INPUT_CHARS:
        raise bad_request(f"input must hold at most {MAX_INPUT_CHARS} characters of text, got {chars}",
                          param="input")
    return list(zip(names, items))


def embedding_cache(request: Request, app: AppState) -> EmbeddingCache | None:
    """The server's embedding cache (None: off): in the store when the gateway has one (every API
    process shares it), else this process's own. Built on first use, once the gateway has started."""
    state = request.app.state
    try:
        return getattr(state, _CACHE_ATTR)
    except AttributeError:
        pass
    cfg, gw = app.config, app.gateway
    cache = build_embedding_cache(cfg.embedding_cache_bytes, cfg.embedding_cache_ttl_s, gw.store, gw.astore)
    setattr(state, _CACHE_ATTR, cache)
    return cache


async def _token_ids(p: Pipeline, inputs: list[tuple[str, str | list[int]]]) -> list[list[int]]:
    """Every input as token ids, each within the vocabulary and the context (400s naming it)."""
    for name, item in inputs:  # every text bounded before any is tokenized
        if isinstance(item, str):
            await p.check_prompt_chars(item, name)
    vocab, limit = p.routed.vocab_size, p.max_model_len
    out = []
    for name, item in inputs:
        if isinstance(item, str):
            ids = await p.encode(item, add_special_tokens=True, param=name)
        else:
            ids = item
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})", param=name,
                                  code="invalid_value")
        if len(ids) > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, however {name} has "
                              f"{len(ids)} tokens. Please reduce the length of the input.", param=name,
                              code="context_length_exceeded")
        out.append(ids)
    return out


def _hidden_size(p: Pipeline) -> int:
    config = p.routed.version.fleet.model_config
    if config is None:
        raise unavailable("the model is still loading", "engine_unavailable", retry_after_s=5)
    return config.hidden_size


def _shorten(embedding: list[float] | None, dimensions: int | None) -> bytes:
    """The engine's unit vector, cut to `dimensions` and normalized again, as little-endian float32."""
    if embedding is None:
        raise RuntimeError("the engine finished a pooling request without its embedding")
    v = np.asarray(embedding, dtype=np.float32)
    if dimensions is not None and dimensions < len(v):
        v = v[:dimensions]
        norm = float(np.linalg.norm(v))
        if norm > 0:
            v = v / np.float32(norm)
    return v.astype("<f4").tobytes()


async def _create(p: Pipeline, body: EmbeddingRequest) -> Response:
    inputs = embedding_inputs(body.input)
    dims = body.dimensions
    hidden = _hidden_size(p)
    if dims is not None and dims > hidden:
        raise bad_request(f"dimensions must be between 1 and {hidden} (the model's hidden size), got {dims}",
                          param="dimensions", code="invalid_value")
    cls, priority = p.classify(None)
    p.note(False, body.input)
    p.check_ready()
    ids_list = await _token_ids(p, inputs)
    p.check_ready()  # again: tokenizing may have awaited
    tenant = (p.principal.tenant_id if p.principal is not None else None) or ""  # open mode: ''
    cache = embedding_cache(p.request, p.app)
    keys = [cache_key(p.model_name, p.routed.version.version, ids, dims) for ids in ids_list]
    found = await cache.get(tenant, list(dict.fromkeys(keys))) if cache is not None else {}
    todo: dict[str, list[int]] = {}  # the inputs to compute, once each
    for key, ids in zip(keys, ids_list):
        if key not in found:
            todo.setdefault(key, ids)
    num_prompt = sum(len(ids) for ids in ids_list)
    cached = sum(len(ids) for key, ids in zip(keys, ids_list) if key in found)
    p.reserve(num_prompt, 0)
    p.bill_cached(cached)
    vectors = dict(found)
    if todo:
        p.shed(len(todo), sum(len(ids) for ids in todo.values()), cls, priority)
        texts = {key: item for key, (_, item) in zip(keys, inputs) if isinstance(item, str)}
        streams = await p.submit(list(todo.values()), [texts.get(k) for k in todo], POOL, priority)
        finals = await p.collect(streams)
        if isinstance(finals, Response):
            return finals
        p.answered()
        fresh = [(key, _shorten(final.embedding, dims)) for key, final in zip(todo, finals)]
        vectors.update(fresh)
        if cache is not None:
            await cache.put(tenant, fresh)
    else:
        await p.serve_without_engine()
        p.answered()
    if cache is not None:
        hits = sum(1 for key in keys if key in found)
        p.app.metrics.embedding_cache(hits, len(keys) - hits, p.record.tenant, cache.nbytes)
    p.settle(["stop"])
    return json_response(_response(p.model_name, [vectors[k] for k in keys], body.encoding_format or "float",
                                   num_prompt, cached))


def _response(model: str, vectors: list[bytes], encoding: str, num_prompt: int, cached: int) -> dict[str, Any]:
    if encoding == "base64":
        data = [base64.b64encode(v).decode("ascii") for v in vectors]
    else:
        data = [np.frombuffer(v, dtype="<f4").tolist() for v in vectors]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": num_prompt, "total_tokens": num_prompt,
                      "prompt_tokens_details": {"cached_tokens": cached}}}

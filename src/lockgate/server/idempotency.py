"""`Idempotency-Key`: a retried request returns the stored result and is billed once.

The first request with a key records (tenant, key, body hash) before it runs and
stores its response when done; a retry with the same key and body gets that
response replayed (`idempotent-replayed: true`) and no new ledger row; a
different body is a 409, as is a retry while the first is still running. A
first request that failed in a way worth retrying (5xx, 429, client gone)
leaves no record, so the retry runs. Non-streaming requests only: a stream
cannot be replayed faithfully.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from lockgate.errors import APIError, bad_request
from lockgate.gateway.accounting import Meter
from lockgate.gateway.gateway import Gateway
from lockgate.store.models import IdempotencyRecord

HEADER = "idempotency-key"
MAX_KEY_LEN = 255


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429, 499)


async def idempotent(request: Request, gw: Gateway, meter: Meter | None, stream: bool, request_id: str,
                     run: Callable[[], Awaitable[Response]]) -> Response:
    key = request.headers.get(HEADER)
    if key is None or meter is None or gw.astore is None:
        return await run()
    if not 1 <= len(key) <= MAX_KEY_LEN or not key.isascii() or not key.isprintable():
        raise bad_request(f"Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters",
                          param="Idempotency-Key", code="invalid_idempotency_key")
    if stream:
        raise bad_request("Idempotency-Key is supported on non-streaming requests only",
                          param="Idempotency-Key", code="unsupported_parameter")
    tenant_id = meter.tenant_id
    body_hash = hashlib.sha256(await request.body()).hexdigest()
    store, astore = gw.store, gw.astore
    assert store is not None
    rec = await astore.call(store.get_idempotency, tenant_id, key)
    if rec is None:
        fresh = IdempotencyRecord(tenant_id, key, body_hash, request_id, None, None, time.time())
        if not await astore.call(store.put_idempotency, fresh):
            rec = await astore.call(store.get_idempotency, tenant_id, key)  # lost a race: treat as a retry
    if rec is not None:
        if rec.body_hash != body_hash:
            raise APIError(409, "this Idempotency-Key was used with a different request body",
                           param="Idempotency-Key", code="idempotency_key_reused")
        if rec.status is None or rec.response is None:
            raise APIError(409, "a request with this Idempotency-Key is still in progress; retry later",
                           param="Idempotency-Key", code="idempotency_in_progress", headers={"Retry-After": "1"})
        meter.skip = True  # already billed by the original request
        return Response(rec.response, status_code=rec.status, media_type="application/json",
                        headers={"idempotent-replayed": "true"})
    try:
        response = await run()
    except APIError as err:  # re-raised after storing: the handlers render and count it
        if _retryable(err.status):
            await astore.call(store.delete_idempotency, tenant_id, key)
        else:
            await astore.call(store.finish_idempotency, tenant_id, key, err.status, bytes(err.response().body))
        raise
    except BaseException:
        await astore.call(store.delete_idempotency, tenant_id, key)
        raise
    if _retryable(response.status_code):
        await astore.call(store.delete_idempotency, tenant_id, key)
    else:
        await astore.call(store.finish_idempotency, tenant_id, key, response.status_code, bytes(response.body))
    return response

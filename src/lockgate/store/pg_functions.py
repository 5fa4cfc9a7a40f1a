"""PostgreSQL functions for the per-request statements of a shared store (store/shared_ops.py).

The same decisions as `SharedOps.charge_requests` and `SharedOps.admit` (SQLite
runs those in Python under its write lock), as one server-side call each: a
tenant's book row is then locked for microseconds, not for the client round
trips of five statements, and concurrent requests of one tenant stop queueing
behind each other (measured: benchmarks/pg_driver.py). tests/store/test_shared_ops.py
runs the same cases on both, so the two stay one behaviour.
"""
from __future__ import annotations

# Check (and with p_apply take) `p_amount` from each (scope, capacity) bucket of one kind, in the order
# given (sorted by the caller: one lock order everywhere). o_scope: the first that cannot give it
# (NULL: all can); o_wait: seconds until it can, -1 when the amount exceeds its capacity.
TAKE = """
CREATE OR REPLACE FUNCTION lockgate_take(p_kind text, p_scopes text[], p_caps float8[], p_amount float8,
    p_now float8, p_apply boolean, OUT o_scope text, OUT o_wait float8, OUT o_levels float8[])
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    v_cap float8;
    v_lvl float8;
    v_have float8;
    v_upd float8;
BEGIN
    o_wait := 0;
    o_levels := '{}';
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        v_cap := p_caps[i];
        INSERT INTO limit_buckets AS b (scope, kind, capacity, level, updated)
            VALUES (p_scopes[i], p_kind, v_cap, v_cap, p_now)
            ON CONFLICT (scope, kind) DO UPDATE SET kind = excluded.kind
            RETURNING b.capacity, b.level, b.updated INTO v_have, v_lvl, v_upd;
        IF v_have <> v_cap THEN
            v_lvl := v_cap;  -- a changed limit starts a full bucket
        ELSE
            v_lvl := least(v_cap, v_lvl + greatest(0, p_now - v_upd) * v_cap / 60.0);
        END IF;
        o_levels := o_levels || v_lvl;
        IF o_scope IS NULL AND p_kind = 'tok' AND p_amount > v_cap THEN
            o_scope := p_scopes[i];
            o_wait := -1;
        ELSIF o_scope IS NULL AND v_lvl < p_amount THEN
            o_scope := p_scopes[i];
            o_wait := (p_amount - v_lvl) / (v_cap / 60.0);
        END IF;
    END LOOP;
    IF o_scope IS NULL AND p_apply THEN
        FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
            o_levels[i] := o_levels[i] - p_amount;
            UPDATE limit_buckets SET capacity = p_caps[i], level = o_levels[i], updated = p_now
                WHERE scope = p_scopes[i] AND kind = p_kind;
        END LOOP;
    END IF;
END $$
"""

# Concurrency, tokens per minute and the budget for one request, then its reservation row and its
# prompt tokens off the tpm buckets: all or nothing. o_kind NULL: admitted.
ADMIT = """
CREATE OR REPLACE FUNCTION lockgate_admit(p_request_id text, p_tenant text, p_key text, p_model text,
    p_cost float8, p_prompt bigint, p_created float8, p_version text, p_instance text,
    p_budget float8, p_period text, p_start float8, p_tconc bigint, p_kconc bigint,
    p_scopes text[], p_caps float8[], p_now float8,
    OUT o_kind text, OUT o_scope text, OUT o_wait float8, OUT o_inflight bigint, OUT o_left float8)
LANGUAGE plpgsql AS $$
DECLARE
    v_period text;
    v_start float8;
    v_spent float8;
    v_n bigint;
    v_held float8;
    v_take record;
BEGIN
    INSERT INTO budget_books AS bb (tenant_id, period, period_start, spent) VALUES (p_tenant, '', NULL, 0)
        ON CONFLICT (tenant_id) DO UPDATE SET tenant_id = excluded.tenant_id
        RETURNING bb.period, bb.period_start, bb.spent INTO v_period, v_start, v_spent;
    IF v_period IS DISTINCT FROM p_period OR v_start IS DISTINCT FROM p_start THEN
        SELECT coalesce(sum(u.cost_usd), 0) INTO v_spent FROM usage u
            WHERE u.tenant_id = p_tenant AND (p_start IS NULL OR u.created_at >= p_start);
        UPDATE budget_books SET period = p_period, period_start = p_start, spent = v_spent
            WHERE tenant_id = p_tenant;
    END IF;
    SELECT count(*), coalesce(sum(r.reserved_usd), 0) INTO v_n, v_held FROM reservations r
        WHERE r.tenant_id = p_tenant;
    IF p_tconc IS NOT NULL AND v_n >= p_tconc THEN
        o_kind := 'concurrency'; o_scope := 't:' || p_tenant; o_inflight := v_n; RETURN;
    END IF;
    IF p_kconc IS NOT NULL AND p_key IS NOT NULL THEN
        SELECT count(*) INTO v_n FROM reservations r WHERE r.key_id = p_key;
        IF v_n >= p_kconc THEN
            o_kind := 'concurrency'; o_scope := 'k:' || p_key; o_inflight := v_n; RETURN;
        END IF;
    END IF;
    SELECT * INTO v_take FROM lockgate_take('tok', p_scopes, p_caps, p_prompt, p_now, false);
    IF v_take.o_scope IS NOT NULL THEN
        o_kind := CASE WHEN v_take.o_wait < 0 THEN 'tpm_too_large' ELSE 'tpm' END;
        o_scope := v_take.o_scope;
        o_wait := CASE WHEN v_take.o_wait < 0 THEN 60.0 ELSE v_take.o_wait END;
        RETURN;
    END IF;
    IF p_budget IS NOT NULL AND v_spent + v_held + p_cost > p_budget + 1e-12 THEN
        o_kind := 'budget'; o_scope := 't:' || p_tenant; o_left := greatest(0, p_budget - v_spent - v_held);
        RETURN;
    END IF;
    INSERT INTO reservations(request_id, tenant_id, key_id, model, reserved_usd, prompt_tokens,
                             completion_tokens, cached_tokens, created_at, updated_at, model_version, instance_id)
        VALUES (p_request_id, p_tenant, p_key, p_model, p_cost, p_prompt, 0, 0, p_created, p_now, p_version,
                p_instance);
    PERFORM lockgate_take('tok', p_scopes, p_caps, p_prompt, p_now, true);
END $$
"""

# Schema 8: the same decisions, and the key's own budget too (store/shared_ops.py `admit`). Migration 7
# created ADMIT (shipped: never edited); migration 8 replaces it with this one (same signature).
ADMIT_V8 = """
CREATE OR REPLACE FUNCTION lockgate_admit(p_request_id text, p_tenant text, p_key text, p_model text,
    p_cost float8, p_prompt bigint, p_created float8, p_version text, p_instance text,
    p_budget float8, p_period text, p_start float8, p_tconc bigint, p_kconc bigint,
    p_scopes text[], p_caps float8[], p_now float8,
    OUT o_kind text, OUT o_scope text, OUT o_wait float8, OUT o_inflight bigint, OUT o_left float8)
LANGUAGE plpgsql AS $$
DECLARE
    v_period text;
    v_start float8;
    v_spent float8;
    v_n bigint;
    v_held float8;
    v_take record;
    v_kbudget float8;
    v_kperiod text;
    v_kstart float8;
    v_kbook text;
    v_kp text;
    v_ks float8;
    v_kspent float8;
    v_kheld float8;
BEGIN
    INSERT INTO budget_books AS bb (tenant_id, period, period_start, spent) VALUES (p_tenant, '', NULL, 0)
        ON CONFLICT (tenant_id) DO UPDATE SET tenant_id = excluded.tenant_id
        RETURNING bb.period, bb.period_start, bb.spent INTO v_period, v_start, v_spent;
    IF v_period IS DISTINCT FROM p_period OR v_start IS DISTINCT FROM p_start THEN
        SELECT coalesce(sum(u.cost_usd), 0) INTO v_spent FROM usage u
            WHERE u.tenant_id = p_tenant AND (p_start IS NULL OR u.created_at >= p_start);
        UPDATE budget_books SET period = p_period, period_start = p_start, spent = v_spent
            WHERE tenant_id = p_tenant;
    END IF;
    -- The key's own budget, as the store has it now; its book (row 'k:<key id>') locked after the tenant's.
    IF p_key IS NOT NULL THEN
        SELECT k.budget_usd, coalesce(k.budget_period, 'month') INTO v_kbudget, v_kperiod FROM api_keys k
            WHERE k.id = p_key;
    END IF;
    IF v_kbudget IS NOT NULL THEN
        v_kstart := CASE v_kperiod WHEN 'total' THEN NULL
            WHEN 'day' THEN floor(p_now / 86400.0) * 86400.0
            ELSE extract(epoch FROM date_trunc('month', to_timestamp(p_now) AT TIME ZONE 'UTC'))::float8 END;
        v_kbook := 'k:' || p_key;
        INSERT INTO budget_books AS bb (tenant_id, period, period_start, spent) VALUES (v_kbook, '', NULL, 0)
            ON CONFLICT (tenant_id) DO UPDATE SET tenant_id = excluded.tenant_id
            RETURNING bb.period, bb.period_start, bb.spent INTO v_kp, v_ks, v_kspent;
        IF v_kp IS DISTINCT FROM v_kperiod OR v_ks IS DISTINCT FROM v_kstart THEN
            SELECT coalesce(sum(u.cost_usd), 0) INTO v_kspent FROM usage u
                WHERE u.key_id = p_key AND (v_kstart IS NULL OR u.created_at >= v_kstart);
            UPDATE budget_books SET period = v_kperiod, period_start = v_kstart, spent = v_kspent
                WHERE tenant_id = v_kbook;
        END IF;
    END IF;
    SELECT count(*), coalesce(sum(r.reserved_usd), 0) INTO v_n, v_held FROM reservations r
        WHERE r.tenant_id = p_tenant;
    IF p_tconc IS NOT NULL AND v_n >= p_tconc THEN
        o_kind := 'concurrency'; o_scope := 't:' || p_tenant; o_inflight := v_n; RETURN;
    END IF;
    IF p_kconc IS NOT NULL AND p_key IS NOT NULL THEN
        SELECT count(*) INTO v_n FROM reservations r WHERE r.key_id = p_key;
        IF v_n >= p_kconc THEN
            o_kind := 'concurrency'; o_scope := 'k:' || p_key; o_inflight := v_n; RETURN;
        END IF;
    END IF;
    SELECT * INTO v_take FROM lockgate_take('tok', p_scopes, p_caps, p_prompt, p_now, false);
    IF v_take.o_scope IS NOT NULL THEN
        o_kind := CASE WHEN v_take.o_wait < 0 THEN 'tpm_too_large' ELSE 'tpm' END;
        o_scope := v_take.o_scope;
        o_wait := CASE WHEN v_take.o_wait < 0 THEN 60.0 ELSE v_take.o_wait END;
        RETURN;
    END IF;
    IF p_budget IS NOT NULL AND v_spent + v_held + p_cost > p_budget + 1e-12 THEN
        o_kind := 'budget'; o_scope := 't:' || p_tenant; o_left := greatest(0, p_budget - v_spent - v_held);
    END IF;
    IF v_kbudget IS NOT NULL THEN
        SELECT coalesce(sum(r.reserved_usd), 0) INTO v_kheld FROM reservations r WHERE r.key_id = p_key;
        IF v_kspent + v_kheld + p_cost > v_kbudget + 1e-12
                AND (o_kind IS NULL OR greatest(0, v_kbudget - v_kspent - v_kheld) < o_left) THEN
            o_kind := 'budget'; o_scope := 'k:' || p_key; o_left := greatest(0, v_kbudget - v_kspent - v_kheld);
        END IF;
    END IF;
    IF o_kind IS NOT NULL THEN  -- the stricter budget: the one with less left
        RETURN;
    END IF;
    INSERT INTO reservations(request_id, tenant_id, key_id, model, reserved_usd, prompt_tokens,
                             completion_tokens, cached_tokens, created_at, updated_at, model_version, instance_id)
        VALUES (p_request_id, p_tenant, p_key, p_model, p_cost, p_prompt, 0, 0, p_created, p_now, p_version,
                p_instance);
    PERFORM lockgate_take('tok', p_scopes, p_caps, p_prompt, p_now, true);
END $$
"""

FUNCTIONS: tuple[str, ...] = (TAKE, ADMIT)

"""Versioned output schemas over HTTP: registration with the compatibility check (409 listing every
difference, `force`, audit records), namespaces (global vs a tenant's, what a tenant admin may not
write or see), requests naming `NAME@VERSION` or `NAME` through the official openai SDK (answers valid against that version), bad input (400 naming the
field), and the validation metrics. One keyed server on the fake engine for the file: which schema
a request was constrained by is the point, not the model's tokens (the fake runner draws grammar-valid
tokens, so an answer shows the version that constrained it); the real model's constrained answers
are tests/server/test_structured_http.py's."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "schemas-root-key"
MODEL = "SmolLM2-135M-Instruct"
INVOICE_V1 = {"type": "object", "properties": {"id": {"type": "string", "maxLength": 8},
                                               "total": {"type": "number", "minimum": 0}},
              "required": ["id", "total"]}
PAL = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
       "additionalProperties": False}


@dataclass
class World:
    srv: ServerProcess
    root: httpx.Client
    a_id: str
    b_id: str
    a_admin: httpx.Client
    b_admin: httpx.Client
    a_inf: str
    b_inf: str

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def _client(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


def _err(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("schemas")
    srv = start_server(tmp, "--load-format", "fake", "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--max-request-body-bytes",
                       "1000000", "--no-slo-admission")
    root = _client(srv, ADMIN)
    try:
        a = _ok(root.post("/admin/tenants", json={"name": "schema-a"}), 201)
        b = _ok(root.post("/admin/tenants", json={"name": "schema-b"}), 201)
        keys = {}
        for t, scopes in ((a, ["admin"]), (a, ["inference"]), (b, ["admin"]), (b, ["inference"])):
            keys[(t["id"], scopes[0])] = _ok(root.post(f"/admin/tenants/{t['id']}/keys",
                                                       json={"scopes": scopes}), 201)["key"]
        yield World(srv, root, a["id"], b["id"], _client(srv, keys[(a["id"], "admin")]),
                    _client(srv, keys[(b["id"], "admin")]), keys[(a["id"], "inference")],
                    keys[(b["id"], "inference")])
    finally:
        root.close()
        srv.stop()


def test_versions_compatibility_force_and_audit(w: World) -> None:
    v1 = _ok(w.root.post("/admin/schemas", json={"name": "invoice", "schema": INVOICE_V1}), 201)
    assert (v1["name"], v1["version"], v1["namespace"], v1["ref"]) == ("invoice", 1, "global", "invoice@1")
    v2_schema = json.loads(json.dumps(INVOICE_V1))
    v2_schema["properties"]["note"] = {"type": "string"}
    v2 = _ok(w.root.post("/admin/schemas", json={"name": "invoice", "schema": v2_schema}), 201)
    assert v2["version"] == 2 and v2["forced"] is False
    assert [(d["path"], d["breaking"]) for d in v2["differences"]] == [("$.properties.note", False)]
    v3_schema = {"type": "object", "properties": {"ident": {"type": "string"}, "total": {"type": "integer"},
                                                  "note": {"type": "string"}},
                 "required": ["ident", "total"], "additionalProperties": False}
    err = _err(w.root.post("/admin/schemas", json={"name": "invoice", "schema": v3_schema}), 409, "schema",
               "incompatible_schema")
    found = {(d["path"], d["change"]) for d in err["differences"] if d["breaking"]}
    assert found == {("$.properties.id", "required_property_removed"),
                     ("$.properties.ident", "required_property_added"),
                     ("$.properties.total.type", "type_narrowed"),
                     ("$.additionalProperties", "additional_properties_refused")}, err
    assert "$.properties.total.type" in err["message"]
    assert _ok(w.root.get("/admin/schemas/invoice"))["latest"] == 2  # nothing written
    v3 = _ok(w.root.post("/admin/schemas", json={"name": "invoice", "schema": v3_schema, "force": True}), 201)
    assert v3["version"] == 3 and v3["forced"] is True
    versions = _ok(w.root.get("/admin/schemas/invoice"))
    assert [v["version"] for v in versions["data"]] == [1, 2, 3] and versions["data"][0]["schema"] == INVOICE_V1
    assert _ok(w.root.get("/admin/schemas/invoice@2"))["schema"] == v2_schema
    assert _ok(w.root.get("/admin/schemas/invoice/versions/1"))["schema"] == INVOICE_V1
    audit = [r for r in _ok(w.root.get("/admin/audit"))["data"] if r["action"] == "schema.register"
             and r["target"].startswith("invoice@")]
    assert [r["target"] for r in audit] == ["invoice@1", "invoice@2", "invoice@3"]
    assert audit[2]["details"]["forced"] is True
    assert {d["path"] for d in audit[2]["details"]["differences"] if d["breaking"]} == {p for p, _ in found}
    assert _ok(w.root.get("/admin/audit/verify"))["ok"] is True


def test_namespaces_and_who_may_write_or_read(w: World) -> None:
    mine = _ok(w.a_admin.post("/admin/schemas", json={"name": "memo", "schema": {"type": "object"}}), 201)
    assert mine["namespace"] == w.a_id and mine["version"] == 1 and mine["created_by"] != "admin"
    _err(w.a_admin.post("/admin/schemas", json={"name": "memo", "schema": {"type": "object"}, "namespace": "global"}),
         403, "namespace", "insufficient_scope")
    _err(w.a_admin.post("/admin/schemas", json={"name": "memo", "schema": {"type": "object"},
                                               "namespace": w.b_id}), 404, "namespace")
    # A global admin may write a tenant's namespace; B's admin does not see A's schema.
    _ok(w.root.post("/admin/schemas", json={"name": "bmemo", "schema": {"type": "object"}, "namespace": w.b_id}), 201)
    names_a = {(s["namespace"], s["name"]) for s in _ok(w.a_admin.get("/admin/schemas"))["data"]}
    assert (w.a_id, "memo") in names_a and ("global", "invoice") in names_a and (w.b_id, "bmemo") not in names_a
    _err(w.b_admin.get("/admin/schemas/memo"), 404, "name")
    _err(w.b_admin.get(f"/admin/schemas/memo?namespace={w.a_id}"), 404, "namespace")
    all_names = {(s["namespace"], s["name"]) for s in _ok(w.root.get("/admin/schemas"))["data"]}
    assert {(w.a_id, "memo"), (w.b_id, "bmemo")} <= all_names
    _err(_client(w.srv, w.a_inf).get("/admin/schemas"), 403, code="insufficient_scope")


def test_requests_name_a_version_or_the_latest_through_the_sdk(w: World) -> None:
    _ok(w.root.post("/admin/schemas", json={"name": "pal", "schema": PAL}), 201)
    blue = {**PAL, "properties": {"color": {"enum": ["blue"]}}}
    _err(w.root.post("/admin/schemas", json={"name": "pal", "schema": blue}), 409, code="incompatible_schema")
    _ok(w.root.post("/admin/schemas", json={"name": "pal", "schema": blue, "force": True}), 201)
    yellow = {**PAL, "properties": {"color": {"enum": ["yellow"]}}}
    _ok(w.a_admin.post("/admin/schemas", json={"name": "pal", "schema": yellow}), 201)  # A's own 'pal'
    ask = [{"role": "user", "content": "Pick a color."}]

    def answer(key: str, name: str, max_tokens: int = 16) -> Any:
        r = w.sdk(key).chat.completions.create(model=MODEL, messages=ask, max_tokens=max_tokens, temperature=0,
                                               response_format={"type": "json_schema", "json_schema": {"name": name}})
        return r.choices[0]

    c = answer(w.b_inf, "pal@1")
    jsonschema.validate(json.loads(c.message.content), PAL)
    assert json.loads(c.message.content)["color"] in ("red", "green")
    assert json.loads(answer(w.b_inf, "pal").message.content) == {"color": "blue"}  # the latest, global
    assert json.loads(answer(w.a_inf, "pal").message.content) == {"color": "yellow"}  # A's namespace first
    assert json.loads(answer(w.a_inf, "pal@1").message.content) == {"color": "yellow"}
    assert answer(w.b_inf, "pal@1", max_tokens=2).finish_reason == "length"  # counted as a failure
    # The completions route resolves names too; an inline schema is counted as "inline".
    r = httpx.post(f"{w.srv.base_url}/v1/completions", headers={"Authorization": f"Bearer {w.b_inf}"}, json={
        "model": MODEL, "prompt": "Color:", "max_tokens": 16, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "pal@2"}}}, timeout=60)
    assert json.loads(_ok(r)["choices"][0]["text"]) == {"color": "blue"}
    w.sdk(w.b_inf).chat.completions.create(model=MODEL, messages=ask, max_tokens=16, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": PAL}})

    def counts() -> dict[tuple[str, str, str], float]:
        text = _ok_text(w.root.get("/metrics"))
        out = {}
        for m in re.finditer(r'^lockgate:structured_output_(validations|validation_failures)_total\{([^}]*)\} (\S+)$',
                             text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), labels["schema"], labels["version"])] = float(m.group(3))
        return out

    # pal@1: B twice (one cut by max_tokens) and A twice (its own pal@1: the labels name no namespace).
    want = {("validations", "pal", "1"): 4.0, ("validation_failures", "pal", "1"): 1.0,
            ("validations", "pal", "2"): 2.0, ("validations", "inline", ""): 1.0}
    assert wait_for(lambda: all(counts().get(k) == v for k, v in want.items()), 10), counts()
    assert counts().get(("validation_failures", "pal", "2"), 0.0) == 0.0


def _ok_text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.text


@pytest.mark.parametrize("name, param", [
    ("nosuch", "response_format.json_schema.name"),
    ("pal@99", "response_format.json_schema.name"),
    (f"pal@{2**70}", "response_format.json_schema.name"),
    ("pal@0", "response_format.json_schema.name"),
])
def test_a_request_naming_an_unknown_schema_is_a_400(w: World, name: str, param: str) -> None:
    r = httpx.post(f"{w.srv.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {w.b_inf}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                         "response_format": {"type": "json_schema", "json_schema": {"name": name}}}, timeout=60)
    _err(r, 400, param)


def test_bad_registrations_are_400s_naming_the_field(w: World) -> None:
    post = w.root.post
    _err(post("/admin/schemas", json={"name": "bad@1", "schema": {"type": "object"}}), 400, "name")
    _err(post("/admin/schemas", json={"name": "x" * 65, "schema": {"type": "object"}}), 400, "name")
    _err(post("/admin/schemas", json={"name": "", "schema": {"type": "object"}}), 400, "name")
    _err(post("/admin/schemas", json={"name": "ok", "schema": [1, 2]}), 400, "schema")
    _err(post("/admin/schemas", json={"name": "ok", "schema": "{}"}), 400, "schema")
    _err(post("/admin/schemas", json={"name": "ok"}), 400, "schema")
    _err(post("/admin/schemas", json={"name": "ok", "schema": {}, "force": "yes"}), 400, "force")
    _err(post("/admin/schemas", json={"name": "ok", "schema": {}, "extra": 1}), 400, "extra")
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 300}
                                            for i in range(1000)}}
    _err(post("/admin/schemas", json={"name": "big", "schema": big}), 400, "schema", "invalid_value")
    _err(post("/admin/schemas", content=b'{"name": "nan", "schema": {"maximum": NaN}}',
              headers={"content-type": "application/json"}), 400)
    _err(post("/admin/schemas", json={"name": "rx", "schema": {"type": "string", "pattern": "(("}}), 400, "schema")
    _err(w.root.get(f"/admin/schemas/pal@{2**70}"), 400, "name")
    _err(w.root.get("/admin/schemas/pal/versions/abc"), 400, "name")
    _err(w.root.get("/admin/schemas/nosuch"), 404, "name")
    assert "big" not in {s["name"] for s in _ok(w.root.get("/admin/schemas"))["data"]}

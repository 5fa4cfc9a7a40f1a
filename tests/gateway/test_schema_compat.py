"""The compatibility check between two versions of an output schema (gateway/schema_compat.py): every
breaking kind is found with its JSON path, compatible changes are listed as such, and the answers it
calls compatible really stay valid (checked with jsonschema on sample answers)."""
from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from lockgate.gateway.schema_compat import MAX_DIFFERENCES, breaking, differences

BASE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "maxLength": 20},
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "note": {"type": ["string", "null"]},
        "status": {"enum": ["open", "paid", "void"]},
        "lines": {"type": "array", "maxItems": 5, "items": {
            "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku"]}},
    },
    "required": ["id", "total"],
}
SAMPLE = {"id": "A1", "total": 12.5, "note": None, "status": "void",
          "lines": [{"sku": "x", "qty": 1, "extra": True}], "more": 1}


def _changed(edit: Any) -> dict[str, Any]:
    new = copy.deepcopy(BASE)
    edit(new)
    return new


def _kinds(old: Any, new: Any) -> set[tuple[str, str, bool]]:
    return {(d.path, d.change, d.breaking) for d in differences(old, new)}


def test_identical_schemas_have_no_differences() -> None:
    assert differences(BASE, copy.deepcopy(BASE)) == []


def test_adding_an_optional_property_is_compatible() -> None:
    new = _changed(lambda s: s["properties"].update(memo={"type": "string"}))
    assert _kinds(BASE, new) == {("$.properties.memo", "property_added", False)}
    jsonschema.validate({k: v for k, v in SAMPLE.items() if k != "more"}, new)


@pytest.mark.parametrize("edit, path, change", [
    (lambda s: (s["properties"].pop("total"), s["required"].remove("total")), "$.properties.total",
     "required_property_removed"),
    (lambda s: s["required"].append("note"), "$.properties.note", "property_now_required"),
    (lambda s: s["required"].append("memo") or s["properties"].update(memo={"type": "string"}),
     "$.properties.memo", "required_property_added"),
    (lambda s: s["properties"]["note"].update(type="string"), "$.properties.note.type", "type_narrowed"),
    (lambda s: s["properties"]["total"].update(type="integer"), "$.properties.total.type", "type_narrowed"),
    (lambda s: s["properties"]["status"].update(enum=["open", "paid"]), "$.properties.status.enum", "enum_narrowed"),
    (lambda s: s["properties"]["id"].update(maxLength=10), "$.properties.id.maxLength", "bound_tightened"),
    (lambda s: s["properties"]["total"].update(maximum=999), "$.properties.total.maximum", "bound_tightened"),
    (lambda s: s["properties"]["total"].update(minimum=1), "$.properties.total.minimum", "bound_tightened"),
    (lambda s: s["properties"]["id"].update(minLength=3), "$.properties.id.minLength", "bound_added"),
    (lambda s: s["properties"]["id"].update(pattern="^[A-Z]"), "$.properties.id.pattern", "pattern_changed"),
    (lambda s: s["properties"]["id"].update(const="A1"), "$.properties.id.const", "const_changed"),
    (lambda s: s.update(additionalProperties=False), "$.additionalProperties", "additional_properties_refused"),
    (lambda s: s.update(additionalProperties={"type": "string"}), "$.additionalProperties",
     "additional_properties_narrowed"),
    (lambda s: s["properties"]["lines"].update(maxItems=2), "$.properties.lines.maxItems", "bound_tightened"),
    (lambda s: s["properties"]["lines"].update(uniqueItems=True), "$.properties.lines.uniqueItems",
     "unique_items_added"),
    (lambda s: s["properties"]["lines"]["items"]["required"].append("qty"),
     "$.properties.lines.items.properties.qty", "property_now_required"),
    (lambda s: s["properties"]["lines"]["items"]["properties"]["qty"].update(type="string"),
     "$.properties.lines.items.properties.qty.type", "type_narrowed"),
    (lambda s: s["properties"]["lines"]["items"].update(additionalProperties=False),
     "$.properties.lines.items.additionalProperties", "additional_properties_refused"),
    (lambda s: s["properties"].update(status={"type": "string", "enum": ["open", "paid", "void"]}),
     "$.properties.status.type", "type_narrowed"),
    (lambda s: s.update(allOf=[{"required": ["status"]}]), "$.allOf", "keyword_changed"),
])
def test_each_breaking_change_is_found_with_its_path(edit: Any, path: str, change: str) -> None:
    new = _changed(edit)
    found = breaking(differences(BASE, new))
    assert (path, change) in {(d.path, d.change) for d in found}, found
    assert all(d.detail for d in found)


def test_a_rename_of_a_required_property_is_a_removal_and_an_addition() -> None:
    def rename(s: dict[str, Any]) -> None:
        s["properties"]["ident"] = s["properties"].pop("id")
        s["required"] = ["ident", "total"]
    assert {(d.path, d.change) for d in breaking(differences(BASE, _changed(rename)))} == {
        ("$.properties.id", "required_property_removed"), ("$.properties.ident", "required_property_added")}


def test_every_difference_of_a_big_change_is_listed() -> None:
    def many(s: dict[str, Any]) -> None:
        s["properties"]["note"]["type"] = "string"
        s["properties"]["total"]["type"] = "integer"
        s["properties"]["status"]["enum"] = ["open"]
        s["additionalProperties"] = False
        s["properties"]["memo"] = {"type": "string"}
    diffs = differences(BASE, _changed(many))
    assert {d.path for d in breaking(diffs)} == {"$.properties.note.type", "$.properties.total.type",
                                                 "$.properties.status.enum", "$.additionalProperties"}
    assert [d.change for d in diffs if not d.breaking] == ["property_added"]


@pytest.mark.parametrize("edit, change", [
    (lambda s: s["properties"]["id"].update(type=["string", "null"]), "type_widened"),
    (lambda s: s["properties"]["total"].update(maximum=5000), "bound_loosened"),
    (lambda s: s["properties"]["total"].pop("minimum"), "bound_removed"),
    (lambda s: s["properties"]["status"].update(enum=["open", "paid", "void", "draft"]), "enum_widened"),
    (lambda s: s["properties"]["status"].pop("enum"), "enum_removed"),
    (lambda s: s["required"].remove("total"), "property_now_optional"),
    (lambda s: (s["properties"].pop("note")), "property_removed"),  # optional, extras still allowed
    (lambda s: s["properties"]["lines"]["items"]["properties"]["qty"].update(type="number"), "type_widened"),
])
def test_widening_changes_are_compatible_and_keep_old_answers_valid(edit: Any, change: str) -> None:
    new = _changed(edit)
    diffs = differences(BASE, new)
    assert diffs and not breaking(diffs) and change in {d.change for d in diffs}, diffs
    jsonschema.validate(SAMPLE, BASE)
    jsonschema.validate(SAMPLE, new)  # what was valid stays valid


def test_an_optional_property_removed_where_extras_are_refused_is_breaking() -> None:
    old = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
           "additionalProperties": False}
    new = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    assert _kinds(old, new) == {("$.properties.b", "property_removed", True)}


def test_local_refs_are_followed_and_recursive_schemas_end() -> None:
    def tree(leaf: str) -> dict[str, Any]:
        return {"$defs": {"node": {"type": "object", "properties": {
            "value": {"type": leaf}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"}
    assert differences(tree("number"), tree("number")) == []
    assert {(d.path, d.change) for d in differences(tree("number"), tree("integer"))} == {
        ("$.properties.value.type", "type_narrowed")}
    # A ref on one side, the same schema inline on the other: no difference.
    inline = {"type": "object", "properties": {"a": {"type": "string"}}}
    by_ref = {"definitions": {"A": {"type": "string"}}, "type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}}
    assert differences(inline, by_ref) == []


def test_a_remote_ref_that_changes_is_breaking_because_it_cannot_be_checked() -> None:
    old = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}
    new = {"type": "object", "properties": {"a": {"$ref": "https://example.com/b.json"}}}
    assert [(d.path, d.change, d.breaking) for d in differences(old, new)] == [
        ("$.properties.a", "ref_changed", True)]
    assert differences(old, copy.deepcopy(old)) == []


def test_any_of_branches_and_prefix_items() -> None:
    old = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert {(d.path, d.change, d.breaking) for d in differences(old, {"anyOf": [{"type": "string"}]})} == {
        ("$.anyOf", "branches_removed", True)}
    assert not breaking(differences(old, {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}))
    old_t = {"type": "array", "prefixItems": [{"type": "string"}]}
    new_t = {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "integer"}]}
    assert {(d.path, d.change) for d in breaking(differences(old_t, new_t))} == {
        ("$.prefixItems[0].maxLength", "bound_added"), ("$.prefixItems", "prefix_items_added")}


def test_boolean_schemas_and_odd_values_never_crash() -> None:
    assert differences(True, {"type": "string"})[0].change == "narrowed"
    assert differences({"type": "string"}, False)[0].breaking
    assert differences({"type": "string"}, True) == []
    assert differences(False, {"type": "string"}) == []
    weird = {"type": 7, "properties": [], "required": "x", "enum": "no", "maximum": "big", "items": 3,
             "anyOf": {}, "additionalProperties": 2**70}
    differences(weird, BASE)
    differences(BASE, weird)
    assert differences({"maximum": float("nan")}, {"maximum": 1.0}) is not None


def test_huge_and_deep_schemas_are_bounded() -> None:
    old = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)},
           "required": [f"p{i}" for i in range(1000)]}
    new = {"type": "object", "properties": {}}
    assert len(differences(old, new)) == MAX_DIFFERENCES
    deep_old: dict[str, Any] = {"type": "string"}
    deep_new: dict[str, Any] = {"type": "integer"}
    for _ in range(500):
        deep_old = {"type": "object", "properties": {"x": deep_old}}
        deep_new = {"type": "object", "properties": {"x": deep_new}}
    assert differences(deep_old, deep_new) == []  # below MAX_DEPTH nothing is compared (documented limit)

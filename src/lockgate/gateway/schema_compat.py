"""Is a new version of an output schema compatible with the previous one? (pure)

`differences(old, new)` lists every difference between two JSON schemas, each with its JSON path
(`$.properties.total.maximum`), a `change` kind, whether it is `breaking`, and a short `detail`.
The rule: a new version is compatible when every answer valid under the previous version is
still valid under it (clients and stored answers keep working); anything that can refuse such
an answer is breaking:
- a property removed that was required, a required property added (a rename is both), an optional
  property made required, an optional property removed where extra properties are now refused;
- a type narrowed (`["string","null"]` -> `"string"`, `number` -> `integer`), enum values removed
  or an enum/const added, a bound tightened (`maxLength`, `maxItems`, `maxProperties`, `maximum`,
  `exclusiveMaximum` lowered or added; their `min*` counterparts raised or added), a `pattern`,
  `format` or `multipleOf` added or changed, `uniqueItems` turned on;
- `additionalProperties` going from allowed to `false` (or to a schema where it was allowed);
- fewer `anyOf`/`oneOf` branches or `prefixItems` entries.
Compatible changes are listed too (`breaking: false`): an optional property added, a bound
loosened, a type or an enum widened, a property made optional.

Recursion: nested `properties`, `items`, `prefixItems`, `additionalProperties` schemas,
`anyOf`/`oneOf` branch by branch (by position), and local `$ref`s (`#/$defs/...`,
`#/definitions/...`, `#`) resolved in each schema's own document, each pair of refs compared once
(recursive schemas end). Limits: other references (remote URLs, `$id`-relative) and the keywords
`allOf`, `not`, `if`/`then`/`else`, `patternProperties`, `dependentRequired`, `dependentSchemas`,
`propertyNames`, `contains` are compared as text: any change there is reported as breaking
(conservative). Branches of `anyOf`/`oneOf` are matched by position, so reordering them reports
differences. At most `MAX_DIFFERENCES` are listed and the walk stops at `MAX_DEPTH` levels.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

MAX_DIFFERENCES = 200
MAX_DEPTH = 64
ALL_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
# Bounds whose lowering narrows (upper bounds) and whose raising narrows (lower bounds).
UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties", "maximum", "exclusiveMaximum", "maxContains")
LOWER_BOUNDS = ("minLength", "minItems", "minProperties", "minimum", "exclusiveMinimum", "minContains")
EXACT_KEYWORDS = ("pattern", "format", "multipleOf")
TEXT_KEYWORDS = ("allOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
                 "dependentSchemas", "propertyNames", "contains", "unevaluatedProperties", "unevaluatedItems")


@dataclass(frozen=True, slots=True)
class Difference:
    path: str
    change: str
    breaking: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def differences(old: Any, new: Any) -> list[Difference]:
    """Every difference from `old` to `new` (both JSON schemas: objects or booleans)."""
    walk = _Walk(old, new)
    walk.compare(old, new, "$", 0)
    return walk.out


def breaking(diffs: list[Difference]) -> list[Difference]:
    return [d for d in diffs if d.breaking]


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _shown(value: Any) -> str:
    text = _text(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _types(schema: dict[str, Any]) -> frozenset[str]:
    t = schema.get("type")
    if t is None:
        return ALL_TYPES
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    if "number" in types:
        types.add("integer")  # every integer is a number
    return frozenset(types)


def _allows_extra(value: Any) -> bool:
    """`additionalProperties` lets any extra property through (absent, true or {})."""
    return value is None or value is True or value == {}


class _Walk:
    def __init__(self, old_root: Any, new_root: Any) -> None:
        self.roots = (old_root, new_root)
        self.out: list[Difference] = []
        self.seen_refs: set[tuple[str, str]] = set()

    def add(self, path: str, change: str, is_breaking: bool, detail: str) -> None:
        if len(self.out) < MAX_DIFFERENCES:
            self.out.append(Difference(path, change, is_breaking, detail))

    def resolve(self, schema: Any, side: int) -> tuple[Any, str | None]:
        """A local `$ref` followed (with its target's path), or the schema itself."""
        seen = 0
        ref = None
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 16:
            ref = schema["$ref"]
            target = _pointer(self.roots[side], ref)
            if target is _MISSING:
                return schema, ref
            schema, seen = target, seen + 1
        return schema, ref

    def compare(self, old: Any, new: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH or len(self.out) >= MAX_DIFFERENCES:
            return
        old_r, old_ref = self.resolve(old, 0)
        new_r, new_ref = self.resolve(new, 1)
        if old_ref is not None or new_ref is not None:
            pair = (old_ref or _text(old), new_ref or _text(new))
            if pair in self.seen_refs:
                return  # a recursive schema: this pair is being (or was) compared
            self.seen_refs.add(pair)
            for r, side in ((old_r, "old"), (new_r, "new")):
                if isinstance(r, dict) and isinstance(r.get("$ref"), str) and _pointer(
                        self.roots[0 if side == "old" else 1], r["$ref"]) is _MISSING:
                    if old_r != new_r:
                        self.add(path, "ref_changed", True, f"a reference that is not local ({_shown(r['$ref'])}) "
                                                            "changed: cannot be checked, counted as breaking")
                    return
        old, new = old_r, new_r
        if old is False or new is True:
            return  # nothing was valid before, or everything is valid now
        if old is True or old == {}:
            if new == {}:
                return
            self.add(path, "narrowed", True, f"anything was allowed; now {_shown(new)}")
            return
        if new is False:
            self.add(path, "narrowed", True, "nothing is allowed any more (false)")
            return
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                self.add(path, "changed", True, f"{_shown(old)} -> {_shown(new)}")
            return
        self.types(old, new, path)
        self.values(old, new, path)
        self.bounds(old, new, path)
        self.objects(old, new, path, depth)
        self.arrays(old, new, path, depth)
        self.branches(old, new, path, depth)
        for kw in TEXT_KEYWORDS:
            if kw in old or kw in new:
                if _text(old.get(kw)) != _text(new.get(kw)):
                    self.add(f"{path}.{kw}", "keyword_changed", True,
                             f"{kw} changed (compared as text, not checked in depth)")

    def types(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        ot, nt = _types(old), _types(new)
        lost = ot - nt
        if lost:
            self.add(f"{path}.type", "type_narrowed", True,
                     f"{_shown(old.get('type', 'any'))} -> {_shown(new.get('type', 'any'))}: "
                     f"{', '.join(sorted(lost))} no longer allowed")
        elif nt - ot:
            self.add(f"{path}.type", "type_widened", False,
                     f"{_shown(old.get('type', 'any'))} -> {_shown(new.get('type', 'any'))}")

    def values(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        if "enum" in new and isinstance(new["enum"], list):
            if "enum" not in old or not isinstance(old["enum"], list):
                self.add(f"{path}.enum", "enum_added", True, f"now limited to {_shown(new['enum'])}")
            else:
                new_values = {_text(v) for v in new["enum"]}
                removed = [v for v in old["enum"] if _text(v) not in new_values]
                added = [v for v in new["enum"] if _text(v) not in {_text(x) for x in old["enum"]}]
                if removed:
                    self.add(f"{path}.enum", "enum_narrowed", True, f"values removed: {_shown(removed)}")
                if added:
                    self.add(f"{path}.enum", "enum_widened", False, f"values added: {_shown(added)}")
        elif "enum" in old:
            self.add(f"{path}.enum", "enum_removed", False, "no longer limited to a list of values")
        if "const" in new and ("const" not in old or _text(old["const"]) != _text(new["const"])):
            self.add(f"{path}.const", "const_changed", True,
                     f"{_shown(old.get('const', '(none)'))} -> {_shown(new['const'])}")
        elif "const" in old and "const" not in new:
            self.add(f"{path}.const", "const_removed", False, "no longer a constant")

    def bounds(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        for kw, upper in [(k, True) for k in UPPER_BOUNDS] + [(k, False) for k in LOWER_BOUNDS]:
            o, n = old.get(kw), new.get(kw)
            if not _number(n):
                if _number(o):
                    self.add(f"{path}.{kw}", "bound_removed", False, f"{kw} {o} removed")
                continue
            if not _number(o):
                self.add(f"{path}.{kw}", "bound_added", True, f"{kw} {n} added")
            elif (n < o) if upper else (n > o):
                self.add(f"{path}.{kw}", "bound_tightened", True, f"{kw} {o} -> {n}")
            elif n != o:
                self.add(f"{path}.{kw}", "bound_loosened", False, f"{kw} {o} -> {n}")
        for kw in EXACT_KEYWORDS:
            if kw in new and (kw not in old or _text(old[kw]) != _text(new[kw])):
                self.add(f"{path}.{kw}", f"{kw}_changed", True,
                         f"{_shown(old.get(kw, '(none)'))} -> {_shown(new[kw])}")
            elif kw in old and kw not in new:
                self.add(f"{path}.{kw}", f"{kw}_removed", False, f"{kw} removed")
        if new.get("uniqueItems") is True and old.get("uniqueItems") is not True:
            self.add(f"{path}.uniqueItems", "unique_items_added", True, "items must now be unique")

    def objects(self, old: dict[str, Any], new: dict[str, Any], path: str, depth: int) -> None:
        op = old.get("properties") if isinstance(old.get("properties"), dict) else {}
        np = new.get("properties") if isinstance(new.get("properties"), dict) else {}
        oreq = {r for r in old.get("required", []) if isinstance(r, str)} if isinstance(old.get("required"), list) \
            else set()
        nreq = {r for r in new.get("required", []) if isinstance(r, str)} if isinstance(new.get("required"), list) \
            else set()
        extra_old, extra_new = old.get("additionalProperties"), new.get("additionalProperties")
        for name in sorted(set(op) | set(np) | oreq | nreq):
            p = f"{path}.properties.{_key(name)}"
            if name in op and name not in np:
                if name in oreq:
                    self.add(p, "required_property_removed", True, f"required property {name!r} removed")
                elif not _allows_extra(extra_new):
                    self.add(p, "property_removed", True,
                             f"property {name!r} removed and additional properties are not allowed")
                else:
                    self.add(p, "property_removed", False, f"optional property {name!r} removed")
                continue
            if name in nreq and name not in oreq:
                if name in op or name in oreq:
                    self.add(p, "property_now_required", True, f"optional property {name!r} is now required")
                elif name in np:
                    self.add(p, "required_property_added", True, f"required property {name!r} added")
                else:
                    self.add(p, "required_property_added", True, f"{name!r} is now required")
                if name not in op:
                    continue
            elif name in oreq and name not in nreq:
                self.add(p, "property_now_optional", False, f"required property {name!r} is now optional")
            if name in np and name not in op:
                if _allows_extra(extra_old):
                    self.add(p, "property_added", False, f"optional property {name!r} added")
                else:
                    self.add(p, "property_added", False, f"optional property {name!r} added (extra properties "
                                                          "were not allowed before)")
                continue
            if name in op and name in np:
                self.compare(op[name], np[name], p, depth + 1)
        ap = f"{path}.additionalProperties"
        if extra_new is False and extra_old is not False:
            self.add(ap, "additional_properties_refused", True, "additional properties were allowed; now false")
        elif _allows_extra(extra_old) and not _allows_extra(extra_new) and extra_new is not False:
            self.add(ap, "additional_properties_narrowed", True,
                     f"additional properties were allowed; now they must match {_shown(extra_new)}")
        elif isinstance(extra_old, dict) and isinstance(extra_new, dict) and extra_old != {}:
            self.compare(extra_old, extra_new, ap, depth + 1)
        elif extra_old is False and extra_new is not False:
            self.add(ap, "additional_properties_allowed", False, "additional properties are now allowed")

    def arrays(self, old: dict[str, Any], new: dict[str, Any], path: str, depth: int) -> None:
        oi, ni = old.get("items"), new.get("items")
        if isinstance(oi, (dict, bool)) or isinstance(ni, (dict, bool)):
            self.compare({} if oi is None else oi, {} if ni is None else ni, f"{path}.items", depth + 1)
        op, np = old.get("prefixItems"), new.get("prefixItems")
        if isinstance(op, list) or isinstance(np, list):
            op, np = op if isinstance(op, list) else [], np if isinstance(np, list) else []
            for i in range(min(len(op), len(np))):
                self.compare(op[i], np[i], f"{path}.prefixItems[{i}]", depth + 1)
            if len(np) > len(op):
                self.add(f"{path}.prefixItems", "prefix_items_added", True,
                         f"{len(np) - len(op)} positional item schema(s) added")
            elif len(np) < len(op):
                self.add(f"{path}.prefixItems", "prefix_items_removed", False,
                         f"{len(op) - len(np)} positional item schema(s) removed")

    def branches(self, old: dict[str, Any], new: dict[str, Any], path: str, depth: int) -> None:
        for kw in ("anyOf", "oneOf"):
            ob, nb = old.get(kw), new.get(kw)
            if not isinstance(ob, list) and not isinstance(nb, list):
                continue
            if not isinstance(ob, list):
                self.add(f"{path}.{kw}", f"{kw}_added", True, f"{kw} with {len(nb)} branch(es) added")
                continue
            if not isinstance(nb, list):
                self.add(f"{path}.{kw}", f"{kw}_removed", False, f"{kw} removed")
                continue
            for i in range(min(len(ob), len(nb))):
                self.compare(ob[i], nb[i], f"{path}.{kw}[{i}]", depth + 1)
            if len(nb) < len(ob):
                self.add(f"{path}.{kw}", "branches_removed", True, f"{len(ob) - len(nb)} branch(es) removed")
            elif len(nb) > len(ob):
                self.add(f"{path}.{kw}", "branches_added", kw == "oneOf",
                         f"{len(nb) - len(ob)} branch(es) added" + (" (oneOf: an answer matching two branches "
                                                                     "is refused)" if kw == "oneOf" else ""))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _key(name: str) -> str:
    """A property name in a path: plain when it is an identifier, else quoted."""
    return name if name.isidentifier() else json.dumps(name)


_MISSING = object()


def _pointer(root: Any, ref: str) -> Any:
    """A local reference (`#`, `#/$defs/x`, `#/definitions/x`, any JSON pointer from the root)."""
    if not ref.startswith("#"):
        return _MISSING
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node

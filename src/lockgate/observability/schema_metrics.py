"""Are answers valid against the schema they were asked for? Counted per schema version.

`lockgate:structured_output_validations_total{schema, version, constrained}` and
`lockgate:structured_output_validation_failures_total{...}`: after a request ends, each finished
choice of a request whose `response_format` named a registered schema (`schema` = its name,
`version` = its number) or sent one inline (`schema="inline"`, `version=""`) is checked with
`jsonschema` (validators compiled once per schema and cached, LRU). A choice cut by `max_tokens`
(`finish_reason: "length"`) counts as a failure; one that never finished (client gone, engine
error) is not counted. `constrained` is "true" when the grammar constrained the answer (every
`response_format` schema today; "false" is kept for answers checked without a constraint).

Labels are bounded: the first `MAX_NAMES` schema names this process sees get their own series, the
rest count under `schema="other", version=""`. The check runs when the request's lease is
released (after the last byte), in this process, and never raises.
"""
from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

import jsonschema
from prometheus_client import CollectorRegistry, Counter

from lockgate.engine.outputs import RequestOutput

log = logging.getLogger(__name__)
MAX_NAMES = 100
MAX_VALIDATORS = 256
INLINE = "inline"
OTHER = "other"


class SchemaMetrics:
    def __init__(self, registry: CollectorRegistry, max_names: int = MAX_NAMES) -> None:
        labels = ["schema", "version", "constrained"]
        self.validations = Counter("lockgate:structured_output_validations", "Answers checked against the JSON "
                                   "schema their request named or sent (per finished choice).", labels,
                                   registry=registry)
        self.failures = Counter("lockgate:structured_output_validation_failures", "Checked answers that did not "
                                "parse or did not validate against their schema (a max_tokens cut included).",
                                labels, registry=registry)
        self.max_names = max_names
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._validators: OrderedDict[str, Any] = OrderedDict()

    def labels(self, schema: str, version: str, constrained: bool) -> tuple[str, str, str]:
        if schema != INLINE and schema not in self._names:
            if len(self._names) >= self.max_names:
                return OTHER, "", str(constrained).lower()
            self._names.add(schema)
        return schema, version, str(constrained).lower()

    def validator(self, text: str) -> Any:
        """A compiled validator for a schema's JSON text (cached; None: jsonschema cannot build one)."""
        with self._lock:
            v = self._validators.get(text)
            if v is not None:
                self._validators.move_to_end(text)
                return v
        try:
            schema = json.loads(text)
            cls = jsonschema.validators.validator_for(schema)
            v = cls(schema, format_checker=cls.FORMAT_CHECKER)
        except Exception:  # noqa: BLE001 - a schema the grammar engine took but jsonschema cannot: not counted
            log.debug("no jsonschema validator for a schema", exc_info=True)
            v = False
        with self._lock:
            self._validators[text] = v
            while len(self._validators) > MAX_VALIDATORS:
                self._validators.popitem(last=False)
        return v

    def count(self, labels: tuple[str, str, str], ok: bool) -> None:
        self.validations.labels(*labels).inc()
        if not ok:
            self.failures.labels(*labels).inc()


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, SchemaMetrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def schema_metrics(registry: CollectorRegistry) -> SchemaMetrics:
    """The one `SchemaMetrics` of a registry (made on first use)."""
    with _METRICS_LOCK:
        m = _METRICS.get(registry)
        if m is None:
            m = _METRICS[registry] = SchemaMetrics(registry)
        return m


def valid(validator: Any, text: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    try:
        return validator.is_valid(value)
    except Exception:  # noqa: BLE001 - a pathological schema/answer pair counts as a failure, never raises
        return False


class OutputCheck:
    """One request's answers, checked against its schema once it ends (`observe` every output,
    `finish` once)."""

    __slots__ = ("metrics", "schema", "version", "constrained", "text", "_last", "_done")

    def __init__(self, metrics: SchemaMetrics, schema: str, version: str, text: str, constrained: bool = True) -> None:
        self.metrics, self.schema, self.version, self.text = metrics, schema, version, text
        self.constrained = constrained
        self._last: dict[tuple[str, int], tuple[str, str | None]] = {}  # (engine request, choice) -> text, reason
        self._done = False

    def observe(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self._last[(out.request_id, c.index)] = (c.text, c.finish_reason)  # cumulative text

    def finish(self, _outcome: str = "") -> None:
        if self._done:
            return
        self._done = True
        try:
            finished = [(t, r) for t, r in self._last.values() if r is not None]
            if not finished:
                return
            validator = self.metrics.validator(self.text)
            if validator is False:
                return
            labels = self.metrics.labels(self.schema, self.version, self.constrained)
            for text, reason in finished:
                self.metrics.count(labels, reason != "length" and valid(validator, text))
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            log.exception("checking answers against their schema failed")
        finally:
            self._last.clear()

"""What a PromQL expression refers to: kmsguard metric names, and the labels it uses on them.

A reader for the expressions kmsguard generates (selectors with matchers, ``by (...)``
clauses, Grafana's ``$variables``), not a PromQL parser: enough to check that every
metric and label a rule or panel names is one kmsguard exports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SELECTOR = re.compile(r"\b(kmsguard_[a-z0-9_]+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_GRAFANA_VARS = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*", "$classification": ".*"}


@dataclass
class References:
    #: metric -> labels its own selectors match on
    selectors: dict[str, set[str]] = field(default_factory=dict)
    #: labels of ``by (...)`` clauses: every metric of the expression must have them
    grouped_by: set[str] = field(default_factory=set)


def grafana_to_promql(expr: str) -> str:
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def references(expr: str) -> References:
    refs = References()
    for name, matchers in _SELECTOR.findall(expr):
        refs.selectors.setdefault(name, set()).update(_MATCHER.findall(matchers or ""))
    for labels in _BY.findall(expr):
        refs.grouped_by.update(label.strip() for label in labels.split(",") if label.strip())
    return refs


def missing(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """What ``expr`` refers to that ``exported`` (metric -> its labels) does not have."""
    refs = references(expr)
    problems = []
    for name, labels in refs.selectors.items():
        if name not in exported:
            problems.append(f"metric {name}")
            continue
        problems += [f"label {label} of {name}" for label in sorted(labels - exported[name])]
    for name in refs.selectors:
        if name in exported:
            problems += [f"label {label} (by) of {name}" for label in sorted(refs.grouped_by - exported[name])]
    return problems

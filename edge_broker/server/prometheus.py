"""Prometheus text exposition (format 0.0.4) without a client library.

A `Family` is one metric: name, type, help and its samples (label values -> number). The
broker builds its families from the core's, the server's and the store's counters in
`server/observe.py`; this module only renders them, following the format's rules: `# HELP`
and `# TYPE` once per family, counters named `*_total`, label values escaped, histograms as
cumulative `_bucket{le=...}` lines plus `_sum` and `_count`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Family:
    name: str
    type: MetricType
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((tuple(labels.items()), value))
        return self


@dataclass(slots=True)
class Histogram:
    """Cumulative buckets, as Prometheus wants them. `bounds` are upper bounds, ascending."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break

    def family(self, name: str, help_text: str) -> Family:
        family = Family(name, "histogram", help_text)
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            family.samples.append(((("le", _number(bound)),), running))
        family.samples.append(((("le", "+Inf"),), self.count))
        family.samples.append(((("__suffix__", "_sum"),), self.total))
        family.samples.append(((("__suffix__", "_count"),), self.count))
        return family


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            name = family.name
            if family.type == "histogram":
                suffix = dict(labels).get("__suffix__")
                if suffix is not None:
                    name += suffix
                    labels = ()
                else:
                    name += "_bucket"
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    lines.append("")
    return "\n".join(lines)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels)
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
